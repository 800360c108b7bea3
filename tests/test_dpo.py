"""DPO (`train=dpo`): the loss and rewards against hand computations, sequence log-probs against a
manual gather, that DPO moves a tiny policy towards the chosen responses, and the recipe end to end
through the CLI from an instruct checkpoint.

Needs HARNESS_DATA (defaults to ../shared/data beside the repo) for the ch07 preference data.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HARNESS_DATA", str(ROOT.parent / "shared" / "data"))

from harness.train.dpo import PREFERENCE_FIELDS, encode_pairs, make_loss  # noqa: E402
from harness.train.sft_data import IGNORE, collate_pairs, dpo_loss, sequence_logprobs  # noqa: E402
from models.registry import load_model  # noqa: E402
from tasks.instruction_data import instruction_file, instruction_split  # noqa: E402

from clitools import ENV, run_module  # noqa: E402

from harness.cli import UserError
SMOKE = ["progress=false", "train.limit_train=16", "train.limit_val=4", "train.batch_size=4", "train.max_steps=2",
         "train.limit_test=2", "train.max_new_tokens=8", "train.sample_max_new_tokens=4"]


def train_cli(*args, timeout=300):
    # in this process (clitools.run_module): a fresh interpreter would add only a torch import
    return run_module("harness.train", *args, env=ENV)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.fixture(scope="module")
def pref_split():
    return instruction_split(instruction_file("instruction-data-with-preference.json"), required=PREFERENCE_FIELDS)


# --- the loss --------------------------------------------------------------------------------------

# Per-token log-probs of the response tokens of two pairs, for policy and reference.
TOKENS = {
    "pi_c": [[-0.5, -1.5], [-2.0, -1.0, -3.0]],
    "pi_r": [[-1.0, -1.0, -1.0], [-0.5]],
    "ref_c": [[-0.7, -1.5], [-2.0, -1.0, -2.4]],
    "ref_r": [[-1.0, -0.8, -1.0], [-1.0]],
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dpo_loss_rewards_and_accuracy_by_hand(reduction):
    reduce = (lambda xs: sum(xs) / len(xs)) if reduction == "mean" else sum
    seq = {k: [reduce(row) for row in v] for k, v in TOKENS.items()}
    beta = 0.1
    out = dpo_loss(*(torch.tensor(seq[k], dtype=torch.float64) for k in ("pi_c", "pi_r", "ref_c", "ref_r")), beta)
    if reduction == "mean":
        # pair 0: chosen (-1.0 vs -1.1) +0.1 -> reward 0.01; rejected (-1.0 vs -0.9333) -> -0.00667
        # pair 1: chosen (-2.0 vs -1.8) -> -0.02; rejected (-0.5 vs -1.0) -> +0.05
        chosen, rejected = [0.01, -0.02], [-0.1 * (1 / 15), 0.05]
    else:
        # pair 0: chosen -2.0 vs -2.2 -> 0.02; rejected -3.0 vs -2.8 -> -0.02
        # pair 1: chosen -6.0 vs -5.4 -> -0.06; rejected -0.5 vs -1.0 -> 0.05
        chosen, rejected = [0.02, -0.06], [-0.02, 0.05]
    loss = -(log_sigmoid(chosen[0] - rejected[0]) + log_sigmoid(chosen[1] - rejected[1])) / 2
    assert math.isclose(float(out["loss"]), loss, rel_tol=1e-9)
    assert math.isclose(float(out["chosen_reward"]), sum(chosen) / 2, abs_tol=1e-12)
    assert math.isclose(float(out["rejected_reward"]), sum(rejected) / 2, abs_tol=1e-12)
    assert math.isclose(float(out["reward_margin"]), (chosen[0] - rejected[0] + chosen[1] - rejected[1]) / 2,
                        abs_tol=1e-12)
    assert float(out["reward_accuracy"]) == 0.5      # pair 0 prefers chosen, pair 1 does not


def test_dpo_loss_when_policy_equals_reference_and_its_gradient():
    same = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    out = dpo_loss(same, same * 2, same.detach(), (same * 2).detach(), beta=0.5)
    assert math.isclose(out["loss"].item(), math.log(2), rel_tol=1e-6)
    assert float(out["reward_margin"]) == 0 and float(out["reward_accuracy"]) == 0   # ties are not wins
    out["loss"].backward()
    # x = beta * (same - 2 * same) + const: d loss / d same_i = -sigmoid(-0) * beta * (1 - 2) / n
    assert torch.allclose(same.grad, torch.full((3,), -0.5 * 0.5 * (1 - 2) / 3))


def test_sequence_logprobs_equal_a_manual_gather(pref_split):
    model, tok, _ = load_model("llama-tiny")
    pairs, dropped = encode_pairs(pref_split.train[:3], tok, "alpaca", max_length=256)
    assert dropped == 0
    batch = collate_pairs(pairs, tok.eos_id)
    inputs, targets = batch["inputs"], batch["targets"]
    assert inputs.shape[0] == 6
    with torch.no_grad():
        logp = model(inputs).double().log_softmax(-1)
        got = {r: sequence_logprobs(model, inputs, targets, r) for r in ("mean", "sum")}
    rows = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]   # collate_pairs' order
    for r, (ids, n) in enumerate(rows):
        # response tokens (and EOS) are ids[n:], predicted at positions n - 1 .. len - 2
        manual = [float(logp[r, j - 1, ids[j]]) for j in range(n, len(ids))]
        assert (targets[r] != IGNORE).sum() == len(manual)
        assert math.isclose(float(got["sum"][r]), sum(manual), rel_tol=1e-5)
        assert math.isclose(float(got["mean"][r]), sum(manual) / len(manual), rel_tol=1e-5)
    with pytest.raises(UserError, match="logprob_reduction"):
        sequence_logprobs(model, inputs, targets, "max")


def test_dpo_steps_move_the_policy_towards_chosen(pref_split):
    torch.manual_seed(0)
    policy, tok, _ = load_model("gpt-tiny")
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    pairs, _ = encode_pairs(pref_split.train[:4], tok, "alpaca", max_length=256)
    batch = collate_pairs(pairs, tok.eos_id)
    loss_fn = make_loss(reference, beta=0.1, reduction="mean")
    first = {k: v.item() for k, v in loss_fn(policy, batch).items()}
    assert first["reward_margin"] == 0 and math.isclose(first["loss"], math.log(2), rel_tol=1e-6)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for _ in range(5):
        loss_fn(policy, batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    after = {k: v.item() for k, v in loss_fn(policy, batch).items()}
    assert after["loss"] < first["loss"] and after["reward_margin"] > 0 and after["reward_accuracy"] == 1.0


# --- the recipe through the CLI --------------------------------------------------------------------

@pytest.fixture(scope="module")
def instruct_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "sft"
    p = train_cli("train=instruct", "model=gpt-tiny", *SMOKE, "train.test_responses=false", f"output_dir={out}")
    assert p.returncode == 0, p.stdout + p.stderr
    return out


def test_dpo_from_an_instruct_checkpoint_with_lora(tmp_path, instruct_checkpoint, pref_split):
    out = tmp_path / "dpo"
    p = train_cli("train=dpo", f"model={instruct_checkpoint}", *SMOKE, "train.lr=1e-3",
                  "train.lora={rank: 2, alpha: 4}", "train.logprob_reduction=sum", f"output_dir={out}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "validation before training: loss 0.6931" in p.stdout and "reward_margin" in p.stdout
    prov = json.loads((out / "provenance.json").read_text())
    sft = json.loads((instruct_checkpoint / "provenance.json").read_text())
    assert prov["complete"] and prov["recipe"] == "dpo" and prov["steps"] == 2
    parent_prov = prov["parent"]["provenance"]   # the parent's id, or its whole record (full lineage)
    assert sft["id"] in (parent_prov, parent_prov.get("id") if isinstance(parent_prov, dict) else None)
    assert prov["split"] == pref_split.signature
    assert prov["beta"] == 0.1 and prov["logprob_reduction"] == "sum" and prov["train_pairs"] == 16
    # before training the policy is the reference (LoRA's B starts at zero): every reward is exactly 0
    assert prov["val_before"] == {"loss": pytest.approx(math.log(2)), "reward_margin": 0.0,
                                  "reward_accuracy": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}
    assert set(prov["val_after"]) == set(prov["val_before"]) and prov["val_after"]["loss"] == prov["val_loss"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 2
    assert {"train_reward_margin", "train_reward_accuracy", "val_reward_margin", "val_reward_accuracy"} <= set(rows[-1])
    keys = load_file(str(out / "model.safetensors")).keys()
    assert not [k for k in keys if "lora_" in k] and prov["trainable"]["lora_layers"] == 8
    responses = json.loads((out / "test_responses.json").read_text())
    assert [r["instruction"] for r in responses] == [e["instruction"] for e in pref_split.test[:2]]
    _, _, info = load_model(str(out))
    assert info["provenance"] in (prov["id"], prov)


def test_bad_reduction_is_one_error_line(tmp_path):
    out = tmp_path / "bad"
    p = train_cli("train=dpo", "model=gpt-tiny", *SMOKE, "train.logprob_reduction=max", f"output_dir={out}")
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "logprob_reduction" in errors[0] and "Traceback" not in p.stderr
    assert not out.exists()
