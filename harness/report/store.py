"""results/leaderboard.csv: append-only, one row per (run, metric), safe under concurrent runs.

Every append takes an exclusive `fcntl.flock` on a sidecar file, `<csv>.lock` (not on the CSV: a
header migration replaces the CSV's inode, and a lock held on the old inode would not exclude a
writer that opened the new one), checks the header (written only when the file is new or empty),
writes all rows of the run in one write call, then flushes and fsyncs before the lock is released,
so rows from parallel processes never tear or interleave.

A file written before columns were added (its header is a strict prefix of COLUMNS) is migrated on
the next append: rewritten under the same lock, old rows given empty new cells, to a temporary
file that atomically replaces it. A foreign header is refused with one clear error.

    python -m harness.leaderboard [leaderboard=...] [out_dir=...]   # render it (harness/report/render.py)
"""
from __future__ import annotations

import csv
import fcntl
import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping

from harness.cli import UserError
from harness.io import write_all, write_atomic

COLUMNS = [
    "time", "run_id", "model", "checkpoint_sha", "provenance", "task", "task_version",
    "num_fewshot", "metric", "value", "stderr", "n", "n_unscored", "seed", "dtype", "device",
    "batch_size", "harness_version", "wall_s", "judge_model", "judge_digest",
    "split", "parent", "trained_on", "contamination",   # added later: older files are migrated
    "judge_unscored_rate", "judge_swap_consistency", "judge_agreement",   # judged rows: how far to trust the judge
]
RELIABILITY = ("judge_unscored_rate", "judge_swap_consistency", "judge_agreement")
NUMERIC = ["num_fewshot", "value", "stderr", "n", "n_unscored", "seed", "wall_s", *RELIABILITY]


class LeaderboardError(UserError):
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


def _migrated(p: Path, header: list[str]) -> bytes:
    """The whole file re-encoded under COLUMNS: old rows keep their cells, new cells are empty."""
    with open(p, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for row in rows:   # validate() has checked that no row is wider than its header
        if row:
            w.writerow(row + [""] * (len(COLUMNS) - len(row)))
    return buf.getvalue().encode("utf-8")


@contextmanager
def locked(path: str | os.PathLike):
    """Exclusive lock for reading-and-rewriting the leaderboard at `path` (sidecar `<path>.lock`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p.with_name(p.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_appendable(path: str | os.PathLike) -> None:
    """Refuse, before any scoring, a leaderboard that an append would fail on: a folder, a path
    through a file, a folder or file we may not write, a foreign header or an unreadable body.
    Creates nothing."""
    p = Path(path)
    hint = "pass leaderboard=<a writable .csv file>"
    if p.is_dir():
        raise LeaderboardError(f"leaderboard={p} is a folder; {hint}")
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise LeaderboardError(f"leaderboard={p}: {base} is a file, not a folder; {hint}")
    lock = p.with_name(p.name + ".lock")
    for target, need in ((p, os.W_OK), (lock, os.W_OK)):
        if target.exists() and not os.access(target, need):
            raise LeaderboardError(f"leaderboard={p}: {target} is not writable; {hint}")
    if not (p.exists() and lock.exists()) and not os.access(base, os.W_OK | os.X_OK):
        raise LeaderboardError(f"leaderboard={p}: cannot create files in {base} (no write permission); {hint}")
    if p.exists() and p.stat().st_size:
        validate(p)


def validate(p: Path) -> None:
    """The whole file parses as a leaderboard (header and every row), or LeaderboardError naming the
    row: an append must never turn a readable file into an unreadable one, nor add to a broken one."""
    import pandas as pd

    with open(p, newline="", encoding="utf-8", errors="replace") as f:
        found = f.readline().rstrip("\r\n")
    header = next(csv.reader([found]), [])
    if header != COLUMNS and not (0 < len(header) < len(COLUMNS) and header == COLUMNS[:len(header)]):
        raise LeaderboardError(f"{p} has header {found[:200]!r}, not this harness's columns "
                               f"({','.join(COLUMNS)}); move it aside or pass leaderboard=<new file>")
    try:
        pd.read_csv(p, dtype=str, keep_default_na=False, engine="c")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise LeaderboardError(f"{p} cannot be read as a leaderboard ({' '.join(str(e).split())}); repair "
                               "that row by hand (or move the file aside) before appending") from None


def append_rows(path: str | os.PathLike, rows: list[Mapping[str, Any]]) -> None:
    """Append `rows` (dicts keyed by COLUMNS; missing keys are empty) to the CSV at `path`."""
    p = Path(path)
    data_rows = list(rows)
    _encode(data_rows, header=False)   # unknown columns fail before the file is touched
    with locked(p):
        fd = os.open(p, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)   # opened under the lock: the current inode
        try:
            size = os.fstat(fd).st_size
            migrate = False
            if size:
                validate(p)
                found = _first_line(fd).decode("utf-8", "replace").rstrip("\r")
                header = next(csv.reader([found]), [])
                migrate = header != COLUMNS
            data = _encode(data_rows, header=size == 0)
            if migrate:
                write_atomic(p, _migrated(p, header) + data)
                return
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # never glue our first row onto a line someone left unfinished
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def read_leaderboard(path: str | os.PathLike):
    """The leaderboard as a pandas DataFrame: identifiers as strings, numbers as numbers."""
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns) == COLUMNS[:len(df.columns)]:
        for c in COLUMNS[len(df.columns):]:
            df[c] = ""   # a file from before these columns existed (migrated on its next append)
    for c in NUMERIC:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df
