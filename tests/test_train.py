"""The training loop and the pretraining recipe, end to end through `python -m harness.train` on
gpt-tiny (seconds per run). One thread per process: the machines running these are small and shared."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clitools import run_module
from harness.train.data import EvalBatches, ShuffledBatches, Windows
from harness.train.state import LAST, last_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
for var, sub in (("HARNESS_DATA", "data"), ("HARNESS_MODELS", "models")):
    if (SHARED / sub).is_dir():
        ENV.setdefault(var, str(SHARED / sub))
TINY = ["train=pretrain_tiny", "progress=false"]


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "cache"
    ENV["HARNESS_CACHE"] = str(cache)


def train_cli(*args, launcher=None, timeout=300):
    """`python -m harness.train <TINY> args`: in this process (clitools.run_module: a fresh interpreter
    would add only a torch import), or under `launcher` (torchrun) in real processes."""
    if launcher is None:
        return run_module("harness.train", *TINY, *args, env=ENV)
    return subprocess.run([*launcher, *TINY, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_ok(p):
    assert p.returncode == 0, p.stdout + p.stderr


def assert_one_error(p, *needles):
    assert p.returncode == 2, p.stdout + p.stderr
    errs = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errs) == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in errs[0], errs[0]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- data ------------------------------------------------------------------------------------------

def test_windows_and_batches_are_disjoint_deterministic_and_resumable():
    w = Windows(np.arange(100, dtype=np.uint16), length=8, stride=4)
    assert len(w) == 23  # starts 0, 4, ..., 88: the last window needs tokens up to 88 + 8
    x, y = w[22]
    assert x.tolist() == list(range(88, 96)) and y.tolist() == list(range(89, 97))
    ranks = [ShuffledBatches(w, batch_size=3, seed=7, rank=r, world=2) for r in range(2)]
    assert ranks[0].per_epoch == 3
    for pos in range(6):  # two epochs
        a, b = ranks[0].indices(pos), ranks[1].indices(pos)
        assert len(a) == len(b) == 3 and not set(a) & set(b)
    one = ShuffledBatches(w, batch_size=6, seed=7)  # one process, the same global batch
    assert one.indices(4) == ranks[0].indices(4) + ranks[1].indices(4)
    assert one.indices(1) != one.indices(4)        # another permutation in epoch 1
    fresh = ShuffledBatches(w, batch_size=6, seed=7)
    assert torch.equal(fresh.batch(4)[0], one.batch(4)[0])   # a pure function of the position
    ev = [list(EvalBatches(w, 10, rank=r, world=2)) for r in range(2)]
    assert [len(b[0]) for b in ev[0]] == [10, 3] and [len(b[0]) for b in ev[1]] == [10]


# --- training --------------------------------------------------------------------------------------

def test_loss_decreases_and_checkpoint_is_evaluable(tmp_path):
    out = tmp_path / "run"
    p = train_cli(f"output_dir={out}", "train.max_steps=30", "train.lr=3e-3", "train.eval_every=10",
                  "train.sample_every=30")
    assert_ok(p)
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.5
    assert np.mean([r["train_loss"] for r in rows[-5:]]) < np.mean([r["train_loss"] for r in rows[:5]]) - 0.5
    assert rows[-1]["sample"].startswith("Every effort moves you")
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and not (out / LAST).exists()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["complete"] and prov["steps"] == 30 and prov["parent"] is None and prov["seed"] == 123
    assert prov["data"][0]["sha256"] and prov["config"]["train"]["lr"] == 3e-3 and prov["harness_version"]
    assert abs(prov["val_loss"] - evals[-1]) < 1e-9

    from models.registry import load_lm
    lm = load_lm(str(out), progress=False)
    assert lm.info["provenance"] == prov   # the whole record (harness/provenance.py walks it)
    assert np.isfinite(lm.loglikelihood_rolling(["I had always thought Jack Gisburn rather a cheap genius"])[0])

    board = tmp_path / "lb.csv"
    e = run_module("harness", "task=perplexity", "task.path=pretrain/the-verdict.txt", f"model={out}",
                   f"leaderboard={board}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path, env=ENV)
    assert e.returncode == 0, e.stderr
    assert prov["id"] in board.read_text()


def test_resume_is_bit_identical(tmp_path):
    # dropout and gradient accumulation: the RNG stream and the data position must both resume
    args = ["+train.model.overrides.dropout=0.1", "train.grad_accum=2", "train.max_steps=10",
            "train.checkpoint_every=3"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert_ok(train_cli(*args, f"output_dir={full}"))
    p = train_cli(*args, f"output_dir={parts}", "stop_at_step=5")
    assert_ok(p)
    assert (parts / LAST / "trainer_state.pt").exists() and not (parts / "model.safetensors").exists()
    assert_ok(train_cli(*args, f"output_dir={parts}", "resume=true"))
    a, b = weights(full), weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(metrics(full)) == strip(metrics(parts))


def test_sigterm_writes_a_checkpoint_that_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "harness.train", *TINY, f"output_dir={out}",
                             "train.max_steps=5000", "train.eval_every=0", "train.checkpoint_every=0"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    state = torch.load(out / LAST / "trainer_state.pt", weights_only=True)
    step = state["loop"]["step"]
    assert 3 <= step < 5000 and metrics(out)[-1]["step"] == step
    p = train_cli(f"output_dir={out}", "train.max_steps=5000", "train.eval_every=0", "train.checkpoint_every=0",
                  "resume=true", f"stop_at_step={step + 2}")
    assert_ok(p)
    assert f"resuming at step {step}" in p.stdout
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 3))


def test_kill9_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "harness.train", *TINY, f"output_dir={out}",
                             "train.max_steps=5000", "train.eval_every=0", "train.checkpoint_every=2"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / LAST / "trainer_state.pt").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    proc.kill()
    proc.wait(timeout=60)
    last = last_checkpoint(out)
    assert last is not None
    step = torch.load(last / "trainer_state.pt", weights_only=True)["loop"]["step"]
    p = train_cli(f"output_dir={out}", "train.max_steps=5000", "train.eval_every=0", "train.checkpoint_every=2",
                  "resume=true", f"stop_at_step={step + 1}")
    assert_ok(p)
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 2))
    assert not [p.name for p in out.iterdir() if p.name.startswith((".", "last.old"))]


def test_two_process_ddp_matches_one_process_with_the_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(train_cli(f"output_dir={one}", "train.batch_size=4", "train.max_steps=6"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "harness.train"]
    p = train_cli(f"output_dir={two}", "train.batch_size=2", "train.max_steps=6", launcher=torchrun)
    assert_ok(p)
    assert p.stdout.count("done: 6 steps") == 1           # only rank 0 reports and writes
    assert sorted(x.name for x in two.iterdir()) == sorted(x.name for x in one.iterdir())
    assert json.loads((two / "provenance.json").read_text())["world_size"] == 2
    # each rank took its own half of every global batch: the same updates as one process with 4
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# --- bad input -------------------------------------------------------------------------------------

def test_corpus_too_short(tmp_path):
    (corpus := tmp_path / "short.txt").write_text("Every effort moves you.")
    out = tmp_path / "run"
    assert_one_error(train_cli(f"output_dir={out}", f"train.data=[{corpus}]"), "too short", "short.txt")
    assert not out.exists()
    assert_one_error(train_cli(f"output_dir={out}", f"train.data=[{tmp_path / 'missing.txt'}]"), "not found")


def test_output_dir_holding_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    assert_ok(train_cli(f"output_dir={out}", "train.max_steps=2"))
    before = snapshot(out)
    assert_one_error(train_cli(f"output_dir={out}", "train.max_steps=2", "train.lr=0.01"),
                     "holds a different run", "train.lr")
    assert_one_error(train_cli(f"output_dir={out}", "train.max_steps=2"), "resume=true", "overwrite=true")
    assert_one_error(train_cli(f"output_dir={out}", "train.max_steps=2", "resume=true"), "completed run")
    assert snapshot(out) == before
    (other := tmp_path / "other").mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_error(train_cli(f"output_dir={other}"), "holds no training run")
    assert_ok(train_cli(f"output_dir={out}", "train.max_steps=2", "train.lr=0.01", "overwrite=true"))
    assert json.loads((out / "provenance.json").read_text())["config"]["train"]["lr"] == 0.01


def test_init_from_another_architecture_is_refused(tmp_path):
    out = tmp_path / "run"
    assert_one_error(train_cli(f"output_dir={out}", "train.init_from=llama-tiny"), "llama", "model.arch")
    assert not out.exists()
    assert_one_error(train_cli("train=nope"), "unknown train")


def test_continue_from_a_checkpoint_records_its_parent(tmp_path):
    base, cont = tmp_path / "base", tmp_path / "cont"
    assert_ok(train_cli(f"output_dir={base}", "train.max_steps=2"))
    assert_ok(train_cli(f"output_dir={cont}", "train.max_steps=2", f"train.init_from={base}", "train.model.arch=null"))
    parent = json.loads((cont / "provenance.json").read_text())["parent"]
    assert parent["name"] == str(base) and parent["provenance"] == json.loads((base / "provenance.json").read_text())


def test_validation_metrics_are_per_example_means(tmp_path):
    """A short last validation batch counts per example: 3 examples in batches of 2 average over 3
    (2/3 here), not over the 2 batch means (0.5)."""
    from harness.train.loop import TrainSettings, train
    from harness.train.state import check_output
    from models.registry import load_model

    model, tokenizer, _ = load_model("gpt-tiny")
    rows = [torch.tensor([1, 5, 6, 7]), torch.tensor([1, 8, 9, 10]), torch.tensor([0, 11, 12, 13])]

    def loss_fn(m, batch):
        logits = m(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        return {"loss": loss, "starts_with_1": (batch[:, 0] == 1).double().mean()}

    run = check_output(tmp_path / "out", {"test": "per-example validation"}, resume=False, overwrite=False)
    settings = TrainSettings(max_steps=1, eval_every=1, progress=False, lr=1e-4)
    result = train(model, loss_fn, ShuffledBatches(rows, 2, seed=0), EvalBatches(rows, 2), settings, run,
                   tokenizer=tokenizer)
    assert result["val_metrics"]["starts_with_1"] == pytest.approx(2 / 3)


def test_a_run_made_before_strategy_and_auto_resumes(tmp_path):
    # Run folders written before `strategy`, `activation_checkpointing` and device/precision=auto
    # existed record device=cpu, precision=fp32 and neither new key: they resume unchanged.
    from harness.train.state import RUN_FILE

    out = tmp_path / "run"
    assert_ok(train_cli(f"output_dir={out}", "train.max_steps=4", "stop_at_step=2"))
    run = json.loads((out / RUN_FILE).read_text())
    assert (run["config"]["device"], run["config"]["precision"]) == ("cpu", "fp32")    # resolved, not "auto"
    for key in ("strategy", "activation_checkpointing"):
        del run["config"][key]
    (out / RUN_FILE).write_text(json.dumps(run))
    assert_ok(train_cli(f"output_dir={out}", "train.max_steps=4", "resume=true"))
    assert (out / "model.safetensors").exists()
