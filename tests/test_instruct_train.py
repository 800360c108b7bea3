"""Instruction finetuning (`train=instruct`): tokenization, the book's collate, the SFT loss, that a
trained model stops at EOS, and the recipe end to end through the CLI on gpt-tiny.

Needs HARNESS_DATA (defaults to ../shared/data beside the repo) for the ch07 instruction data.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HARNESS_DATA", str(ROOT.parent / "shared" / "data"))

from harness.train.instruct import Responder  # noqa: E402
from harness.train.sft_data import IGNORE, collate_sft, encode_example, has_target, sft_loss  # noqa: E402
from models.registry import load_model  # noqa: E402
from tasks.instruction_data import alpaca_prompt, build_prompt, chat_renderer, instruction_split  # noqa: E402

from clitools import ENV, run_module  # noqa: E402
SMOKE = ["train=instruct", "model=gpt-tiny", "progress=false", "train.limit_train=16", "train.limit_val=4",
         "train.batch_size=4", "train.max_steps=2", "train.limit_test=2", "train.max_new_tokens=8",
         "train.sample_max_new_tokens=4"]


def train_cli(*args, timeout=300):
    # in this process (clitools.run_module): a fresh interpreter would add only a torch import
    return run_module("harness.train", *args, env=ENV)


def assert_ok(p):
    assert p.returncode == 0, p.stdout + p.stderr


# --- tokenization and collate ----------------------------------------------------------------------

def test_collate_pads_ignores_padding_but_keeps_the_first_eos():
    eos = 9   # the pad id is EOS, as in the book: masking goes by position, not by value
    items = [([1, 2, 3, 9], 2), ([4, 5, 9], 1), ([6, 9], 1)]
    b = collate_sft(items, pad_id=eos)
    assert b["inputs"].tolist() == [[1, 2, 3], [4, 5, 9], [6, 9, 9]]
    assert b["targets"].tolist() == [[2, 3, 9], [5, 9, IGNORE], [9, IGNORE, IGNORE]]
    assert b["lengths"].tolist() == [3, 2, 1]
    masked = collate_sft(items, pad_id=eos, mask_prompt=True)
    assert masked["inputs"].tolist() == b["inputs"].tolist()
    # item 0's prompt is [1, 2]: the target 2 (predicted from 1) is a prompt token
    assert masked["targets"].tolist() == [[IGNORE, 3, 9], [5, 9, IGNORE], [9, IGNORE, IGNORE]]
    cut = collate_sft(items, pad_id=eos, max_length=2, mask_prompt=True)
    assert cut["inputs"].tolist() == [[1, 2], [4, 5], [6, 9]]
    assert cut["targets"].tolist() == [[IGNORE, 3], [5, 9], [9, IGNORE]]
    assert has_target([1, 2, 3, 9], 2, max_length=2, mask_prompt=True)
    assert not has_target([1, 2, 3, 9], 3, max_length=2, mask_prompt=True)   # only prompt targets left


def test_gpt2_example_is_prompt_prefix_plus_response_plus_endoftext():
    _, tok, _ = load_model("gpt-tiny")
    entry = {"instruction": "Rewrite the sentence.", "input": "The cat sat.", "output": "The cat was sitting."}
    prompt = build_prompt(entry, chat_renderer(tok), "auto")
    assert prompt == alpaca_prompt(entry)                  # no chat template: the book's format
    ids, n = encode_example(tok, prompt, entry["output"])
    assert ids[:n] == tok.encode(prompt) and ids[-1] == tok.eos_id == 50256
    assert tok.decode(ids) == prompt + entry["output"] + "<|endoftext|>"


def test_chat_example_ends_with_the_end_of_turn_generation_stops_at(smollm2_path):
    from models.tokenizer import gguf_tokenizer
    tok = gguf_tokenizer(smollm2_path)
    entry = {"instruction": "Name a primary color.", "input": "", "output": "Red."}
    prompt = build_prompt(entry, chat_renderer(tok), "auto")
    ids, n = encode_example(tok, prompt, entry["output"])
    assert ids[:n] == tok.encode(prompt) and ids[-1] == tok.eos_id
    assert tok.decode([tok.eos_id]) == "<|im_end|>"
    # exactly the template's rendering of the whole conversation, up to its end-of-turn
    full = tok.apply_chat_template([{"role": "user", "content": "Name a primary color."},
                                    {"role": "assistant", "content": "Red."}], add_generation_prompt=False)
    assert tok.decode(ids) == full[: full.rindex("<|im_end|>") + len("<|im_end|>")]


# --- loss and stopping -----------------------------------------------------------------------------

def test_sft_loss_is_cross_entropy_over_the_unmasked_targets_only():
    model, tok, _ = load_model("llama-tiny")
    entries = instruction_split().train[:3]
    items = [encode_example(tok, alpaca_prompt(e), e["output"]) for e in entries]
    for mask_prompt in (False, True):
        batch = collate_sft(items, tok.eos_id, mask_prompt=mask_prompt)
        with torch.no_grad():
            loss = sft_loss(model, batch)
            logits = model(batch["inputs"]).double()
        terms = [-logits[r, j].log_softmax(-1)[t] for r, row in enumerate(batch["targets"].tolist())
                 for j, t in enumerate(row) if t != IGNORE]
        expected = float(sum(terms) / len(terms))
        n_real = sum(len(ids) - 1 for ids, _ in items)
        assert len(terms) == (n_real if not mask_prompt else n_real - sum(p - 1 for _, p in items))
        assert math.isclose(float(loss), expected, rel_tol=1e-5)
        full = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE)
        assert math.isclose(float(loss), float(full), rel_tol=1e-5)


def test_a_model_trained_on_eos_targets_answers_and_stops():
    torch.manual_seed(0)
    model, tok, _ = load_model("gpt-tiny")
    entries = [e for e in instruction_split().train if len(e["output"]) < 50][:4]
    batch = collate_sft([encode_example(tok, alpaca_prompt(e), e["output"]) for e in entries], tok.eos_id,
                        mask_prompt=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        sft_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    responses, at_limit = Responder(tok, "alpaca", max_new_tokens=40)(model, entries)
    assert responses == [e["output"] for e in entries]
    assert at_limit == [False] * 4                       # each stopped on its own EOS


# --- the recipe through the CLI --------------------------------------------------------------------

def test_instruct_end_to_end(tmp_path):
    out = tmp_path / "sft"
    p = train_cli(*SMOKE, f"output_dir={out}")
    assert_ok(p)
    assert "validation before training: loss" in p.stdout
    split = instruction_split()
    responses = json.loads((out / "test_responses.json").read_text())
    assert [r["instruction"] for r in responses] == [e["instruction"] for e in split.test[:2]]
    assert all(set(r) == {"instruction", "input", "output", "model_response"} for r in responses)
    assert all(isinstance(r["model_response"], str) for r in responses)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["complete"] and prov["recipe"] == "instruct" and prov["steps"] == 2
    assert prov["split"] == split.signature and prov["prompt_style"] == "alpaca" and prov["mask_prompt"] is False
    assert prov["parent"]["name"] == "gpt-tiny" and len(prov["split_file"]["sha256"]) == 64
    assert prov["train_examples"] == 16 and prov["val_examples"] == 4
    assert prov["val_before"]["loss"] > 0 and prov["val_after"]["loss"] == prov["val_loss"]
    assert prov["test_responses"]["n"] == 2 and prov["wall_s"] > 0 and prov["cpu_s"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "val_loss": prov["val_before"]["loss"]} and rows[-1]["step"] == 2
    assert "sample" in rows[-1]
    model, tok, info = load_model(str(out))
    assert info["provenance"] in (prov["id"], prov) and model.config.num_classes == 0


def test_resume_gives_the_same_weights(tmp_path):
    args = [*SMOKE, "train.max_steps=3", "train.test_responses=false", "train.sample_every=0"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert_ok(train_cli(*args, f"output_dir={full}"))
    assert_ok(train_cli(*args, f"output_dir={parts}", "stop_at_step=1"))
    assert not (parts / "model.safetensors").exists()
    assert_ok(train_cli(*args, f"output_dir={parts}", "resume=true"))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(parts / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = [json.loads((d / "provenance.json").read_text())["val_before"] for d in (full, parts)]
    assert before[0] == before[1]   # measured once, carried through the checkpoint


def test_lora_run_saves_merged_plain_weights(tmp_path):
    out = tmp_path / "lora"
    assert_ok(train_cli(*SMOKE, "train.lora={rank: 2, alpha: 4}", "train.test_responses=false",
                        "train.mask_prompt=true", f"output_dir={out}"))
    keys = load_file(str(out / "model.safetensors")).keys()
    assert not [k for k in keys if "lora_" in k or ".base." in k]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["trainable"]["lora_layers"] == 8 and prov["lora"] == {"rank": 2, "alpha": 4}
    assert prov["trainable"]["trainable_params"] < prov["trainable"]["total_params"] / 10
    load_model(str(out))


@pytest.mark.parametrize("args, needle", [
    (["train.prompt_style=chat"], "no chat template"),
    (["train.limit_train=3"], "make no batch"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "bad"
    p = train_cli(*SMOKE, *args, f"output_dir={out}")
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in p.stderr, p.stderr
    assert not out.exists()
