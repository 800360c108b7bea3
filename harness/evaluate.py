"""The engine: config -> model + task -> records (resumable) -> metrics -> leaderboard rows.

It never branches on task or model type: a task yields samples and scores chunks of them into
records; the model is whatever `LM` the model config builds.
"""
from __future__ import annotations

import fcntl
import logging
import os
import random
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from harness.cli import UserError
from harness.data_parallel import broadcast, rank_world, sample_cost, score_chunk
from harness.io import read_json, write_json
from harness.records import RecordWriter, load_records

log = logging.getLogger("harness")


class NothingScored(UserError):
    """Every sample ended unscored (a judge outage, say): no metric rows are appended."""


@dataclass
class EvalResult:
    metrics: dict                # name -> tasks.base.Metric
    wall_s: float                # seconds spent scoring, summed over every invocation of this run dir
    n_samples: int
    n_reused: int                # records taken from an earlier, interrupted invocation
    run_id: str


def seed_everything(seed: int) -> None:
    """Python's, numpy's and (when installed) torch's generators: the engine itself needs no torch,
    so a backend without it (models/protocol.py) runs too."""
    import numpy as np   # lazy: the CLI's argument check stays fast

    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)


@contextmanager
def run_dir_lock(run_dir: Path):
    """Hold `run_dir` for this process (flock on run_dir/.lock); a second process is refused at once,
    before it loads a model, instead of mixing its records into ours."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"run directory {run_dir} is in use by another harness process; wait for it "
                            "or pass another hydra.run.dir") from None
        yield
    finally:
        os.close(fd)


def read_state(run_dir: Path) -> dict | None:
    path = run_dir / "run.json"
    if not path.exists():
        return None
    return read_json(path, "move the run folder aside or pass another hydra.run.dir")


def _open_run(run_dir: Path, key: dict) -> dict:
    """run.json for `key`; a run dir left by a different task version / model starts over, its
    records moved aside (never mixed into this run's metrics)."""
    rec_path = run_dir / "records.jsonl"
    state = read_state(run_dir)
    if state is None or state.get("key") != key:
        if rec_path.exists():
            stale = run_dir / f"records.stale-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.jsonl"
            log.warning("%s was made with %s, not %s: starting over (old records kept as %s)",
                        rec_path, state and state.get("key"), key, stale.name)
            os.replace(rec_path, stale)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        state = {"key": key, "run_id": f"{stamp}-{os.urandom(3).hex()}", "scoring_s": 0.0}
        write_json(run_dir / "run.json", state)
    return state


def finished(records: list) -> dict:
    """sample id -> its newest record, leaving out records marked for retry (`Record.retryable`:
    a judge that timed out, say), so those samples are scored again."""
    done: dict = {}
    for r in records:
        if r.retryable:
            done.pop(r.sample_id, None)
        else:
            done[r.sample_id] = r
    return done


def evaluate(task, lm, run_dir, seed: int = 1234, chunk_size: int = 256,
             run_key: dict | None = None, locked: bool = False) -> EvalResult:
    """Score every sample of `task` with `lm`, reusing records a killed run left in `run_dir`.
    locked=True: the caller already holds run_dir_lock(run_dir)."""
    run_dir = Path(run_dir)
    rank, world = rank_world()
    if rank:                                       # torchrun: rank 0 owns the run folder
        return _score_share(task, lm, seed, chunk_size)
    if not locked:
        with run_dir_lock(run_dir):
            return evaluate(task, lm, run_dir, seed, chunk_size, run_key, locked=True)
    from tqdm import tqdm

    seed_everything(seed)
    key = {"task": task.name, "task_version": task.version, "seed": seed, **(run_key or {})}
    state = _open_run(run_dir, key)
    samples = _samples(task)
    ids = [s.id for s in samples]
    rec_path = run_dir / "records.jsonl"
    records = load_records(rec_path)
    done = finished(records)
    latest = {r.sample_id: r for r in records}     # the retryable ones too, until rescored
    todo = [s for s in samples if s.id not in done]
    broadcast([s.id for s in todo])                # what the other ranks share out (data_parallel.py)
    n_reused = len(samples) - len(todo)
    if n_reused:
        log.info("resuming: reusing %d finished records of %d from %s", n_reused, len(samples), rec_path)
    if world > 1:
        log.info("data parallel: %d ranks share each chunk of %d samples", world, chunk_size)
    step = max(1, int(chunk_size))
    with RecordWriter(rec_path) as writer, tqdm(total=len(samples), initial=n_reused,
                                                desc=task.name, unit="sample") as bar:
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            t0 = time.perf_counter()
            new = score_chunk(lambda part: task.score(lm, part), chunk, _costs(lm, chunk, world))
            got, want = sorted(r.sample_id for r in new), sorted(s.id for s in chunk)
            if got != want:
                raise RuntimeError(f"task {task.name} returned {len(new)} records for {len(chunk)} "
                                   "samples; every sample needs exactly one record")
            writer.write(new)
            state["scoring_s"] += time.perf_counter() - t0
            write_json(run_dir / "run.json", state)
            latest.update((r.sample_id, r) for r in new)
            bar.update(len(chunk))
    final = [latest[i] for i in ids]
    metrics = task.metrics(final)
    _check_something_scored(task, final, metrics, rec_path)
    retry = sum(r.retryable for r in final)
    if retry:
        log.warning("%d of %d samples are unscored for a passing reason (see records.jsonl); run the same "
                    "hydra.run.dir again to retry them", retry, len(final))
    return EvalResult(metrics, state["scoring_s"], len(samples), n_reused, state["run_id"])


def _samples(task) -> list:
    samples = list(task.samples())
    ids = [s.id for s in samples]
    if not ids:
        raise UserError(f"task {task.name} has no samples to score (limit=0 or empty data?)")
    if len(set(ids)) != len(ids):
        dup = Counter(ids).most_common(1)[0][0]
        raise RuntimeError(f"task {task.name} yields sample id {dup!r} more than once")
    return samples


def _costs(lm, chunk: list, world: int) -> list[int]:
    return [sample_cost(lm, s) for s in chunk] if world > 1 else []


def _score_share(task, lm, seed: int, chunk_size: int) -> None:
    """A rank other than 0: score this rank's share of every chunk rank 0 names; write nothing."""
    seed_everything(seed)
    by_id = {s.id: s for s in _samples(task)}
    todo = [by_id[i] for i in broadcast(None)]
    step = max(1, int(chunk_size))
    for start in range(0, len(todo), step):
        chunk = todo[start:start + step]
        score_chunk(lambda part: task.score(lm, part), chunk, _costs(lm, chunk, rank_world()[1]))
    return None


def _check_something_scored(task, records: list, metrics: dict, rec_path: Path) -> None:
    """A run in which no metric got a single sample has no number to report: stop with the task's
    reason (`unscored_reason(records)`, when the task has one) instead of appending NaN rows."""
    if any(m.n > 0 for m in metrics.values()):
        return
    explain = getattr(task, "unscored_reason", None)
    reason = explain(records) if explain else None
    raise NothingScored(reason or f"no sample of {task.name} could be scored ({len(records)} unscored; "
                                  f"the reasons are in {rec_path}); nothing appended to the leaderboard")


def judge_reliability(task) -> dict:
    """The judge's reliability on this run, as a judged task measured it in metrics() (empty cells
    for tasks without a judge, or a measure the task did not take)."""
    from harness.report.store import RELIABILITY

    measured = getattr(task, "judge_reliability", None) or {}
    return {k: measured.get(k) for k in RELIABILITY}


def rows_for(task, lm, result: EvalResult, seed: int, contamination: float | str = "") -> list[dict]:
    import harness
    from harness.provenance import summarise

    info = dict(getattr(lm, "info", None) or {})
    keys = getattr(task, "judge_keys", None)     # judged tasks: the judge behind the records (tasks/judged.py)
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
        wall_s=round(result.wall_s, 3), judge_model=keys.model if keys else "", judge_digest=keys.digest if keys else "",
        split=getattr(task, "split", "") or "", parent=lineage["parent"], trained_on=lineage["trained_on"],
        contamination=contamination, **judge_reliability(task))
    return [dict(common, metric=name, value=m.value, stderr=m.stderr, n=m.n, n_unscored=m.n_unscored)
            for name, m in result.metrics.items()]
