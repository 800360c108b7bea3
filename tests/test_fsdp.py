"""strategy=fsdp (harness/train/fsdp.py) end to end: `torchrun --nproc_per_node=2 -m harness.train`
on gloo with gpt-tiny, against the DDP path that test_train.py checks against one process. One
thread per process, as in test_train.py."""
import json
import sys

import numpy as np
import torch
from test_train import LAST, assert_ok, assert_one_error, metrics, train_cli, weights
from test_train import _token_cache  # noqa: F401  (autouse: a per-session token cache)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "harness.train"]


def test_fsdp_losses_match_ddp_step_by_step_and_the_checkpoint_evaluates(tmp_path):
    # activation checkpointing on the FSDP side only: recomputation must not change a number;
    # 16 validation windows in batches of 6: 2 batches on rank 0, 1 on rank 1 (evaluation must not
    # need a collective per batch)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    common = ["train.batch_size=6", "train.max_steps=6", "train.eval_every=3", "train.eval_batches=null"]
    assert_ok(train_cli(f"output_dir={ddp}", *common, launcher=TORCHRUN))
    p = train_cli(f"output_dir={fsdp}", *common, "strategy=fsdp", "activation_checkpointing=true",
                  launcher=TORCHRUN)
    assert_ok(p)
    assert p.stdout.count("done: 6 steps") == 1             # rank 0 alone reports and writes
    a, b = metrics(ddp), metrics(fsdp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss", "lr"):
            assert (key in ra) == (key in rb)
            if key in ra:
                np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, err_msg=f"{key} at step {ra['step']}")
    # the final checkpoint is the usual single folder, gathered on rank 0, and nothing sharded is left
    assert sorted(x.name for x in fsdp.iterdir()) == sorted(x.name for x in ddp.iterdir())
    prov = json.loads((fsdp / "provenance.json").read_text())
    assert prov["complete"] and prov["world_size"] == 2 and prov["config"]["strategy"] == "fsdp"
    wa, wb = weights(ddp), weights(fsdp)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)

    from models.registry import load_lm
    lm = load_lm(str(fsdp), progress=False)
    assert np.isfinite(lm.loglikelihood_rolling(["I had always thought Jack Gisburn rather a cheap genius"])[0])


def test_fsdp_resume_is_bit_identical(tmp_path):
    # dropout and gradient accumulation: each rank's RNG stream and the data position must resume;
    # checkpoint_every=2 then stop at 4: the sharded last/ is replaced once before it is resumed
    args = ["strategy=fsdp", "train.batch_size=2", "+train.model.overrides.dropout=0.1", "train.grad_accum=2",
            "train.max_steps=6", "train.checkpoint_every=2", "train.eval_every=3"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert_ok(train_cli(*args, f"output_dir={full}", launcher=TORCHRUN))
    assert_ok(train_cli(*args, f"output_dir={parts}", "stop_at_step=4", launcher=TORCHRUN))
    last = parts / LAST
    # sharded: each rank wrote its own part; no gathered weights in the resumable state
    assert (last / "trainer_state.pt").exists() and (last / "dcp" / ".metadata").exists()
    assert len(list((last / "dcp").glob("*.distcp"))) == 2 and not (last / "model.safetensors").exists()
    assert not (parts / "model.safetensors").exists()
    p = train_cli(*args, f"output_dir={parts}", "resume=true", launcher=TORCHRUN)
    assert_ok(p)
    assert "resuming at step 4" in p.stdout
    a, b = weights(full), weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(metrics(full)) == strip(metrics(parts))


def test_unknown_strategy_is_one_error_line(tmp_path):
    p = train_cli(f"output_dir={tmp_path / 'run'}", "strategy=zero3")
    assert_one_error(p, "strategy", "ddp", "fsdp", "zero3")
    assert not (tmp_path / "run").exists()


def test_fsdp_in_one_process_trains_as_usual(tmp_path):
    p = train_cli(f"output_dir={tmp_path / 'run'}", "strategy=fsdp", "train.max_steps=1")
    assert_ok(p)
    assert "strategy=fsdp with one process" in p.stdout + p.stderr and "done: 1 steps" in p.stdout
