"""The run folder on disk: which run it holds, resumable checkpoints, the final checkpoint, metrics.

    output_dir/run.json          the run's id and resolved config (a different config is refused)
    output_dir/last/             the resumable checkpoint: a normal checkpoint folder + trainer_state.pt
    output_dir/model.safetensors, config.json, tokenizer files, provenance.json   the final checkpoint
    output_dir/metrics.jsonl, loss.png

Every checkpoint is written into a temporary sibling and renamed into place, so a kill -9 at any
moment leaves the previous checkpoint intact. trainer_state.pt holds only tensors and primitives and
is read back with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from harness.cli import UserError, bool_option
from harness.io import read_json, write_atomic, write_json
from models.checkpoint import load_native, load_weights, save_checkpoint

RUN_FILE, LAST, STATE_FILE, METRICS = "run.json", "last", "trainer_state.pt", "metrics.jsonl"
TMP = ".tmp-"
log = logging.getLogger("harness.train")
# Keys that do not change what a run computes: they may differ between a run and its resumption.
OPERATIONAL_KEYS = ("resume", "overwrite", "stop_at_step", "progress", "logger")
# Keys added after runs were already being made, with the value such a run had: an older run folder
# lacks them and must still resume when they are left at that value.
ADDED_KEYS = {"strategy": "ddp", "activation_checkpointing": False, "compile": False}


class RunError(UserError):
    """The output folder cannot be used as asked. The message is user-facing."""


@dataclass
class Run:
    out_dir: Path
    id: str
    config: dict
    resume_from: Path | None = None    # the `last/` checkpoint to continue from
    clear: bool = False                # overwrite=true: delete the old run before starting


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in OPERATIONAL_KEYS}


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys(), key=str) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}={b!r} (run has {a!r})"]


def last_checkpoint(out_dir: Path) -> Path | None:
    """`last/`, or `last.old/` when a kill landed between the two renames of a checkpoint swap."""
    for name in (LAST, LAST + ".old"):
        if (out_dir / name / STATE_FILE).exists():
            return out_dir / name
    return None


def check_output(out_dir: str | Path, config: dict, resume: bool | str, overwrite: bool, name: str = "run") -> Run:
    """Decide what to do with `out_dir` without writing anything (every DDP rank calls this).
    resume: true (continue the run there, or start one with a warning when there is none), false,
    or "must" (refuse when there is nothing to continue)."""
    if resume not in (True, False, "must"):
        raise RunError(f"resume={resume!r}: expected true, false or must")
    overwrite = bool_option(overwrite, "overwrite")
    out_dir = Path(out_dir).expanduser().resolve()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    fresh = Run(out_dir, f"{name}-{stamp}-{os.urandom(3).hex()}", config)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"output_dir {out_dir} is a file, not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        if resume == "must":
            raise RunError(f"resume=must, but output_dir {out_dir} holds no run to continue; check the path "
                           "or drop resume to start a new run")
        if resume and not overwrite:
            log.warning("resume=true, but output_dir %s holds no run: starting from scratch "
                        "(resume=must refuses instead)", out_dir)
        return fresh
    if not (out_dir / RUN_FILE).exists():
        raise RunError(f"output_dir {out_dir} is not empty and holds no training run; choose another output_dir")
    old = read_json(out_dir / RUN_FILE, "pass overwrite=true to start over, or choose another output_dir", RunError)
    if overwrite:
        fresh.clear = True
        return fresh
    changed = _diff({**ADDED_KEYS, **_comparable(old["config"])}, _comparable(config))
    if changed:
        raise RunError(f"output_dir {out_dir} holds a different run ({'; '.join(changed[:3])}"
                       f"{' …' if len(changed) > 3 else ''}); choose another output_dir or pass overwrite=true")
    if not resume:
        raise RunError(f"output_dir {out_dir} already holds this run; pass resume=true to continue it "
                       "or overwrite=true to start over")
    final = out_dir / "provenance.json"
    if final.exists() and read_json(final, "pass overwrite=true to start over", RunError).get("complete"):
        raise RunError(f"output_dir {out_dir} holds a completed run; nothing to resume")
    return Run(out_dir, old["id"], config, resume_from=last_checkpoint(out_dir))


def start_run(run: Run, resume_step: int) -> None:
    """Rank 0, after every rank has checked the folder: claim it and drop what a killed run left."""
    if run.clear:
        shutil.rmtree(run.out_dir)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    for p in run.out_dir.iterdir():  # staging folders of checkpoints that a kill interrupted
        if p.name.startswith((TMP, "." + TMP)):
            shutil.rmtree(p, ignore_errors=True)
    write_json(run.out_dir / RUN_FILE, {"id": run.id, "config": run.config})
    metrics = run.out_dir / METRICS
    if metrics.exists():  # rows logged after the checkpoint we resume from are recomputed
        rows = [r for r in read_metrics(run.out_dir) if r["step"] <= resume_step]
        write_text(metrics, "".join(json.dumps(r) + "\n" for r in rows))


# --- RNG and trainer state -------------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(out_dir: Path, model, tokenizer, provenance: dict, trainer_state: dict, labels=None) -> Path:
    """Write `last/` atomically: a complete staging folder, then two renames (last -> last.old,
    staging -> last); `last_checkpoint` finds last.old if a kill lands between them."""
    staging = out_dir / f"{TMP}last-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(staging, model, tokenizer, provenance, labels=labels)
    torch.save(trainer_state, staging / STATE_FILE)
    return swap_in(out_dir, staging)


def swap_in(out_dir: Path, staging: Path) -> Path:
    """A complete staging folder becomes `last/`: last -> last.old, staging -> last, drop last.old."""
    last, old = out_dir / LAST, out_dir / (LAST + ".old")
    if last.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(last, old)
    os.replace(staging, last)
    shutil.rmtree(old, ignore_errors=True)
    return last


def load_state(folder: Path, model) -> dict:
    """Weights into `model` (strict: another architecture's checkpoint is refused); the trainer state.
    `model`'s shapes are checked against the file's header before the tensors are read."""
    arch, _, weights = load_native(folder, expect=model)
    if arch != model.architecture:
        raise RunError(f"{folder} holds a {arch} checkpoint, not {model.architecture}")
    load_weights(model, weights, str(folder))
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


def publish_final(out_dir: Path, model, tokenizer, provenance: dict, labels=None, state: dict | None = None) -> None:
    """The final checkpoint into out_dir itself, file by file (each rename atomic), provenance.json
    last: it marks the run complete. `state`: gathered weights of a sharded model (fsdp.full_state)."""
    staging = out_dir / f"{TMP}final-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(staging, model, tokenizer, provenance, labels=labels, state=state)
    for name in sorted(os.listdir(staging), key=lambda n: n == "provenance.json"):
        os.replace(staging / name, out_dir / name)
    staging.rmdir()


# --- metrics and the loss curve --------------------------------------------------------------------

def write_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))


def append_metrics(out_dir: Path, row: dict) -> None:
    with open(out_dir / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(out_dir: Path) -> list[dict]:
    path = out_dir / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            pass
    return rows


def plot_losses(out_dir: Path, title: str = "") -> None:
    """loss.png: train loss per logged step and validation loss at each eval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out_dir)
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", ms=3)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_dir / f"{TMP}loss.png"
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, out_dir / "loss.png")
