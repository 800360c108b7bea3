"""Small file helpers every module shares: atomic writes, JSON files, the cache folder.

Written once here so that a fix (fsync of the folder, cleanup of temp files on every failure path,
permissions kept) reaches every caller: the leaderboard migration, run.json / metrics.json, the judge
and contamination caches, the ladder's ledger, training's run.json and provenance.json.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Where the harness keeps derived data it can rebuild (token, judge, contamination caches):
    $HARNESS_CACHE, default ~/.cache/harness."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache/harness").expanduser()


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (a single write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` all at once (temp file in the same folder, fsync, rename): a reader
    sees the old file or the new one, never half of it. Keeps an existing file's permissions. On any
    failure (a folder in the way, a full disk) the temp file is removed and the target untouched."""
    p = Path(path)
    if p.is_dir():   # checked first: os.replace would fail only after the data was written
        raise IsADirectoryError(f"{p} is a folder; name a file to write")
    p.parent.mkdir(parents=True, exist_ok=True)
    mode = os.stat(p).st_mode & 0o777 if p.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(p.parent)


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> None:
    """`obj` as indented JSON (non-JSON values through str), written atomically."""
    text = json.dumps(obj, indent=1, sort_keys=sort_keys, default=str, ensure_ascii=False) + "\n"
    write_atomic(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike, fix: str, error: type[Exception] | None = None) -> dict:
    """The JSON object in `path`, or `error` (a UserError by default) naming the file and `fix`:
    a corrupt or truncated file the harness wrote (run.json, provenance.json, config.json) is one
    line saying what to do, never a JSONDecodeError traceback."""
    from harness.cli import UserError

    error = error or UserError
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"cannot read {p}: {e} (corrupt or truncated?); {fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{p} holds a JSON {type(obj).__name__}, not an object; {fix}")
    return obj
