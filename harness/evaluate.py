"""The engine: config -> model + task -> records (resumable) -> metrics -> leaderboard rows.

It never branches on task or model type: a task yields samples and scores chunks of them into
records; the model is whatever `LM` the model config builds.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import re
import sys
import time
import traceback
from collections import Counter
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.leaderboard import append_rows, write_atomic
from harness.records import RecordWriter, load_records

log = logging.getLogger("harness")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class UsageError(ValueError):
    """A bad command line; printed as one `error:` line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input, not a bug: the CLI prints them as one line and exits 2."""
    from omegaconf.errors import MissingMandatoryValue

    from models.checkpoint import CheckpointError   # ValueErrors today; named in case that changes
    from models.download import MissingFileError
    from models.registry import UnknownModelError
    from tasks.base import TaskError

    return (ValueError, FileNotFoundError, MissingMandatoryValue, CheckpointError, MissingFileError,
            UnknownModelError, TaskError)


def _options(group: str, dirs: list[Path]) -> list[str]:
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def _looks_like_path(v: str) -> bool:
    return os.path.exists(v) or "/" in v or os.sep in v or v.endswith(".gguf")


def _quote(v: str) -> str:
    return v if re.fullmatch(r"[\w./~+@-]+", v) else "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rewrite_argv(argv: list[str], conf_dir: Path = CONF_DIR) -> list[str]:
    """`model=<path>` -> `model=checkpoint model.name=<path>`; an unknown task/model -> UsageError.

    Comma lists (multirun sweeps) are checked element by element; extra config dirs given with
    `--config-dir/-cd` count as options too. Sweep functions like `glob(...)` are left to Hydra."""
    dirs, it = [conf_dir], iter(argv)
    for a in it:
        if a in ("-cd", "--config-dir"):
            dirs.append(Path(next(it, "")))
        elif a.startswith("--config-dir="):
            dirs.append(Path(a.split("=", 1)[1]))
    out = []
    for arg in argv:
        m = re.fullmatch(r"(task|model)=(.*)", arg, re.S)
        if not m or "(" in m.group(2):
            out.append(arg)
            continue
        group, value = m.groups()
        valid = _options(group, dirs)
        values = value.split(",")
        bad = [v for v in values if v not in valid and not (group == "model" and _looks_like_path(v))]
        if bad:
            names = [v for v in valid if v != "checkpoint"]
            hint = " (or a path to a checkpoint folder or .gguf file)" if group == "model" else ""
            raise UsageError(f"unknown {group} '{bad[0]}'; valid {group}s: {', '.join(names)}{hint}")
        if group == "model" and any(v not in valid for v in values):
            out += ["model=checkpoint", "model.name=" + ",".join(_quote(v) for v in values)]
        else:
            out.append(arg)
    return out


def rewrite_sys_argv() -> None:
    """rewrite_argv on this process's command line; a bad one prints one `error:` line, exit 2."""
    try:
        sys.argv[1:] = rewrite_argv(sys.argv[1:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


@dataclass
class EvalResult:
    metrics: dict                # name -> tasks.base.Metric
    wall_s: float                # seconds spent scoring, summed over every invocation of this run dir
    n_samples: int
    n_reused: int                # records taken from an earlier, interrupted invocation
    run_id: str


def seed_everything(seed: int) -> None:
    import numpy as np, torch  # noqa: E401  (lazy: the CLI's argument check stays fast)

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def _locked(run_dir: Path):
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"run directory {run_dir} is in use by another harness process") from None
        yield
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode("utf-8"))


def _open_run(run_dir: Path, key: dict) -> dict:
    """run.json for `key`; a run dir left by a different task version / model starts over, its
    records moved aside (never mixed into this run's metrics)."""
    state_path, rec_path = run_dir / "run.json", run_dir / "records.jsonl"
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    if state is None or state.get("key") != key:
        if rec_path.exists():
            stale = run_dir / f"records.stale-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.jsonl"
            log.warning("%s was made with %s, not %s: starting over (old records kept as %s)",
                        rec_path, state and state.get("key"), key, stale.name)
            os.replace(rec_path, stale)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        state = {"key": key, "run_id": f"{stamp}-{os.urandom(3).hex()}", "scoring_s": 0.0}
        _write_json(state_path, state)
    return state


def evaluate(task, lm, run_dir, seed: int = 1234, chunk_size: int = 256,
             run_key: dict | None = None) -> EvalResult:
    """Score every sample of `task` with `lm`, reusing records a killed run left in `run_dir`."""
    from tqdm import tqdm

    seed_everything(seed)
    (run_dir := Path(run_dir)).mkdir(parents=True, exist_ok=True)
    with _locked(run_dir):
        key = {"task": task.name, "task_version": task.version, "seed": seed, **(run_key or {})}
        state = _open_run(run_dir, key)
        samples = list(task.samples())
        ids = [s.id for s in samples]
        if not ids:
            raise ValueError(f"task {task.name} has no samples to score (limit=0 or empty data?)")
        if len(set(ids)) != len(ids):
            dup = Counter(ids).most_common(1)[0][0]
            raise RuntimeError(f"task {task.name} yields sample id {dup!r} more than once")
        done: dict = {}
        for r in load_records(rec_path := run_dir / "records.jsonl"):
            done.setdefault(r.sample_id, r)
        todo = [s for s in samples if s.id not in done]
        n_reused = len(samples) - len(todo)
        if n_reused:
            log.info("resuming: reusing %d finished records of %d from %s", n_reused, len(samples), rec_path)
        step = max(1, int(chunk_size))
        with RecordWriter(rec_path) as writer, tqdm(total=len(samples), initial=n_reused,
                                                    desc=task.name, unit="sample") as bar:
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                t0 = time.perf_counter()
                records = task.score(lm, chunk)
                got, want = sorted(r.sample_id for r in records), sorted(s.id for s in chunk)
                if got != want:
                    raise RuntimeError(f"task {task.name} returned {len(records)} records for {len(chunk)} "
                                       "samples; every sample needs exactly one record")
                writer.write(records)
                state["scoring_s"] += time.perf_counter() - t0
                _write_json(run_dir / "run.json", state)
                done.update((r.sample_id, r) for r in records)
                bar.update(len(chunk))
        metrics = task.metrics([done[i] for i in ids])
    return EvalResult(metrics, state["scoring_s"], len(samples), n_reused, state["run_id"])


def _instantiate(node, what: str):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, TypeError):  # a misspelt or missing key in the config
            raise UsageError(f"bad {what} config: {cause}") from cause
        if isinstance(cause, _user_errors()):
            raise cause from None
        raise


def rows_for(task, lm, result: EvalResult, seed: int, contamination: float | str = "") -> list[dict]:
    import harness
    from harness.provenance import summarise

    info = dict(getattr(lm, "info", None) or {})
    record = info.get("provenance") or {}
    lineage = summarise(record)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    common = dict(
        time=now, run_id=result.run_id, model=info.get("model") or lm.name,
        checkpoint_sha=info.get("checkpoint_sha", ""),
        provenance=record.get("id", "") if isinstance(record, dict) else str(record),
        task=task.name, task_version=task.version, num_fewshot=getattr(task, "num_fewshot", 0),
        seed=seed, dtype=info.get("dtype", ""), device=info.get("device", ""),
        batch_size=info.get("batch_size", ""), harness_version=harness.__version__,
        wall_s=round(result.wall_s, 3), judge_model=getattr(task, "judge_model", "") or "",
        judge_digest=getattr(task, "judge_digest", "") or "",
        split=getattr(task, "split", "") or "", parent=lineage["parent"], trained_on=lineage["trained_on"],
        contamination=contamination)
    return [dict(common, metric=name, value=m.value, stderr=m.stderr, n=m.n, n_unscored=m.n_unscored)
            for name, m in result.metrics.items()]


def run_job(cfg) -> bool:
    """One Hydra job: evaluate, append to the leaderboard. Bad input -> one `error:` line, False."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import to_absolute_path

    from harness.contamination import DEFAULT_NGRAM, contamination_cell

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        ngram = cfg.get("contamination_ngram", DEFAULT_NGRAM) or 0   # null / 0: off
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 0:
            raise UsageError(f"contamination_ngram must be a whole number of words (13, GPT-3's choice; "
                             f"0 disables the check), not {ngram!r}")
        task = _instantiate(cfg.task, "task")
        lm = _instantiate(cfg.model, "model")
        log.info("task %s (version %s), model %s, run dir %s", task.name, task.version, lm.name, run_dir)
        info = getattr(lm, "info", None) or {}
        run_key = {k: info.get(k, "") for k in ("model", "checkpoint_sha", "dtype", "device")}
        result = evaluate(task, lm, run_dir, int(cfg.seed), int(cfg.chunk_size), run_key)
        # Share of the task's samples found in the checkpoint's training data (harness/contamination.py).
        contamination = contamination_cell(info.get("provenance"), task, ngram)
        rows = rows_for(task, lm, result, int(cfg.seed), contamination)
        _write_json(run_dir / "metrics.json", rows)
        board = Path(to_absolute_path(str(cfg.leaderboard)))
        append_rows(board, rows)
    except _user_errors() as e:
        with suppress(OSError):
            (run_dir / "error.log").write_text(traceback.format_exc())
        msg = f"missing value for {e.full_key}" if type(e).__name__ == "MissingMandatoryValue" else str(e)
        msg = " ".join(msg.split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return False
    for r in rows:
        err = "" if r["stderr"] is None else f" ± {r['stderr']:.4f}"
        log.info("%s %s = %.4f%s (n=%d, unscored %d)", r["task"], r["metric"], r["value"], err, r["n"],
                 r["n_unscored"])
    log.info("appended %d rows to %s (%.1f s scoring)", len(rows), board, result.wall_s)
    return True
