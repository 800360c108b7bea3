"""records.jsonl: one JSON line per scored sample, appended a chunk at a time, readable after a kill.

A run that is killed can leave at most one torn (unterminated, unparsable) line at the end of the
file: `load_records` ignores it and `RecordWriter` cuts it off before appending, so a resumed run
rescores that sample and the file stays one record per line.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

from harness.cli import UserError
from tasks.base import Record

log = logging.getLogger(__name__)


def _parse(line: bytes) -> Record:
    return Record.from_json(line.decode("utf-8"))


def _is_record(line: bytes) -> bool:
    try:
        _parse(line)
        return True
    except (ValueError, TypeError):
        return False


def load_records(path: str | os.PathLike) -> list[Record]:
    """All records in `path` ([] when it does not exist). A torn last line is skipped with a
    warning; a corrupt line anywhere else raises UserError naming the file and line."""
    p = Path(path)
    if not p.exists():
        return []
    lines = p.read_bytes().split(b"\n")
    out: list[Record] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(_parse(line))
        except (ValueError, TypeError) as e:
            if i == len(lines) - 1:  # no newline after it: a write cut short by a kill
                log.warning("%s: ignoring torn last line (%d bytes)", p, len(line))
                break
            raise UserError(f"{p}:{i + 1}: corrupt record ({type(e).__name__}: {e})") from None
    return out


class RecordWriter:
    """Appends records to a JSONL file; each `write` is one write call, flushed and fsynced. The
    file is opened at the first record, so a run refused while scoring its first chunk (a model
    that cannot answer the task, say) leaves no empty records file behind."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._f = None

    def _repair_tail(self) -> None:
        """Make the file end at a line boundary: cut a torn last line, or terminate a whole one."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "r+b") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1
            if _is_record(data[cut:]):
                f.write(b"\n")
            else:
                f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())

    def write(self, records: Iterable[Record]) -> None:
        data = "".join(r.to_json() + "\n" for r in records).encode("utf-8")
        if not data:
            return
        if self._f is None:
            self._f = open(self.path, "ab")
        self._f.write(data)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
