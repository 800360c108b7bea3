"""results/leaderboard.csv: append-only, one row per (run, metric), safe under concurrent runs.

Every append takes an exclusive `fcntl.flock` on the CSV itself, checks the header (written only
when the file is new or empty), writes all rows of the run in one write call, then flushes and
fsyncs before the lock is released, so rows from parallel processes never tear or interleave.
"""
from __future__ import annotations

import csv
import fcntl
import io
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

COLUMNS = [
    "time", "run_id", "model", "checkpoint_sha", "provenance", "task", "task_version",
    "num_fewshot", "metric", "value", "stderr", "n", "n_unscored", "seed", "dtype", "device",
    "batch_size", "harness_version", "wall_s", "judge_model", "judge_digest",
]
NUMERIC = ["num_fewshot", "value", "stderr", "n", "n_unscored", "seed", "wall_s"]


class LeaderboardError(ValueError):
    """The leaderboard file cannot be appended to safely (foreign header, bad row)."""


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _encode(rows: Iterable[Mapping[str, Any]], header: bool) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(COLUMNS)
    for row in rows:
        extra = set(row) - set(COLUMNS)
        if extra:
            raise LeaderboardError(f"unknown leaderboard columns: {', '.join(sorted(extra))}")
        w.writerow([_cell(row.get(c)) for c in COLUMNS])
    return buf.getvalue().encode("utf-8")


def _first_line(fd: int) -> bytes:
    chunks, pos = [], 0
    while True:
        block = os.pread(fd, 65536, pos)
        if not block:
            break
        chunks.append(block)
        if b"\n" in block:
            break
        pos += len(block)
    return b"".join(chunks).split(b"\n", 1)[0]


def append_rows(path: str | os.PathLike, rows: list[Mapping[str, Any]]) -> None:
    """Append `rows` (dicts keyed by COLUMNS; missing keys are empty) to the CSV at `path`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size:
            found = _first_line(fd).decode("utf-8", "replace").rstrip("\r")
            if next(csv.reader([found]), []) != COLUMNS:
                raise LeaderboardError(
                    f"{p} has header {found[:200]!r}, not this harness's columns "
                    f"({','.join(COLUMNS)}); move it aside or pass leaderboard=<new file>")
        data = _encode(rows, header=size == 0)
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # never glue our first row onto a line someone left unfinished
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def read_leaderboard(path: str | os.PathLike):
    """The leaderboard as a pandas DataFrame: identifiers as strings, numbers as numbers."""
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for c in NUMERIC:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df
