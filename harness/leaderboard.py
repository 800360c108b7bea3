"""results/leaderboard.csv: append-only, one row per (run, metric), safe under concurrent runs.

Every append takes an exclusive `fcntl.flock` on a sidecar file, `<csv>.lock` (not on the CSV: a
header migration replaces the CSV's inode, and a lock held on the old inode would not exclude a
writer that opened the new one), checks the header (written only when the file is new or empty),
writes all rows of the run in one write call, then flushes and fsyncs before the lock is released,
so rows from parallel processes never tear or interleave.

A file written before columns were added (its header is a strict prefix of COLUMNS) is migrated on
the next append: rewritten under the same lock, old rows given empty new cells, to a temporary
file that atomically replaces it. A foreign header is refused with one clear error.

    python -m harness.leaderboard [leaderboard=...] [out_dir=...]   # render it: see harness/render.py
"""
from __future__ import annotations

import csv
import fcntl
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping

COLUMNS = [
    "time", "run_id", "model", "checkpoint_sha", "provenance", "task", "task_version",
    "num_fewshot", "metric", "value", "stderr", "n", "n_unscored", "seed", "dtype", "device",
    "batch_size", "harness_version", "wall_s", "judge_model", "judge_digest",
    "split", "parent", "trained_on", "contamination",   # added later: older files are migrated
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _migrated(p: Path, header: list[str]) -> bytes:
    """The whole file re-encoded under COLUMNS: old rows keep their cells, new cells are empty."""
    with open(p, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for i, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) > len(header):
            raise LeaderboardError(f"{p}: record {i} has {len(row)} cells but the header has {len(header)}; "
                                   "repair it by hand before appending")
        w.writerow(row + [""] * (len(COLUMNS) - len(row)))
    return buf.getvalue().encode("utf-8")


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` all at once (temp file in the same folder, fsync, rename): a reader
    sees the old file or the new one, never half of it. Keeps an existing file's permissions."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    mode = os.stat(p).st_mode & 0o777 if p.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, mode)
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, p)
    dir_fd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)   # make the rename itself durable
    finally:
        os.close(dir_fd)


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


def append_rows(path: str | os.PathLike, rows: list[Mapping[str, Any]]) -> None:
    """Append `rows` (dicts keyed by COLUMNS; missing keys are empty) to the CSV at `path`."""
    p = Path(path)
    with locked(p):
        fd = os.open(p, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)   # opened under the lock: the current inode
        try:
            size = os.fstat(fd).st_size
            migrate = False
            if size:
                found = _first_line(fd).decode("utf-8", "replace").rstrip("\r")
                header = next(csv.reader([found]), [])
                migrate = 0 < len(header) < len(COLUMNS) and header == COLUMNS[:len(header)]
                if header != COLUMNS and not migrate:
                    raise LeaderboardError(
                        f"{p} has header {found[:200]!r}, not this harness's columns "
                        f"({','.join(COLUMNS)}); move it aside or pass leaderboard=<new file>")
            data = _encode(rows, header=size == 0)
            if migrate:
                write_atomic(p, _migrated(p, header) + data)
                return
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # never glue our first row onto a line someone left unfinished
            _write_all(fd, data)
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


if __name__ == "__main__":   # python -m harness.leaderboard: render the table (harness/render.py)
    import sys

    import hydra

    _exit = [0]

    @hydra.main(version_base="1.3", config_path="../conf", config_name="leaderboard")
    def _render(cfg) -> None:
        from hydra.utils import to_absolute_path

        from harness.render import render
        try:
            markdown, written = render(to_absolute_path(str(cfg.leaderboard)), to_absolute_path(str(cfg.out_dir)),
                                       cfg.models, cfg.tasks, cfg.metrics, str(cfg.select), str(cfg.interval),
                                       bool(cfg.plot))
        except (ValueError, OSError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            _exit[0] = 2
            return
        print(markdown, end="")
        print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)

    _render()
    sys.exit(_exit[0])
