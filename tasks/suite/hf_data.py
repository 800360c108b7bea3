"""One split of a Hugging Face dataset as a list of row dicts: a local copy first, else `datasets`.

The canonical source of every suite benchmark is its HF dataset at a pinned revision, the one
lm-eval loads. A local copy under `$HARNESS_DATA/<folder>/` in the dataset's own row schema
(`<split>.jsonl` or `<split>.parquet`) wins, so an offline machine or a test runs on staged rows;
without one, `datasets.load_dataset(repo, name, revision=..., split=...)` downloads (and caches) it.
Neither possible -> one MissingFileError line naming the dataset, what was looked for, and both fixes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.download import MissingFileError, data_root, sha256_file
from tasks.base import TaskError, text_hash
from tasks.multiple_choice import read_rows

LOCAL_FORMATS = ("jsonl", "parquet")


def local_split(folder: str, split: str) -> Path | None:
    for fmt in LOCAL_FORMATS:
        path = data_root() / folder / f"{split}.{fmt}"
        if path.exists():
            return path
    return None


def read_local(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for one cause: not parquet
            raise TaskError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from None
    return [row for _, row in read_rows(path, "jsonl")]


def load_split(folder: str, repo: str, name: str | None, revision: str | None,
               split: str) -> tuple[list[dict[str, Any]], str]:
    """(rows, provenance) where provenance names the exact source: a local file's sha256, or the
    repo, config, revision and a hash of the rows (part of the task version: other rows, other scores)."""
    path = local_split(folder, split)
    if path is not None:
        return read_local(path), f"{path.name}:{sha256_file(path)}"
    source = f"{repo}{'/' + name if name else ''}@{revision or 'main'}"
    try:
        import datasets
    except ImportError:
        raise MissingFileError(
            f"dataset {source} split {split!r}: no {data_root() / folder}/{split}.jsonl (or .parquet), and the "
            f"`datasets` library that downloads it is not installed; fix: pip install 'harness[suite]' (then run once "
            f"with internet access), or put the split's rows in the HF schema there") from None
    try:
        rows = datasets.load_dataset(repo, name, revision=revision, split=split).to_list()
    except Exception as e:  # noqa: BLE001 - offline, bad revision, hub errors: one line for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingFileError(
            f"dataset {source} split {split!r} is not available: no {data_root() / folder}/{split}.jsonl "
            f"(or .parquet) and the download failed ({type(e).__name__}: {reason[:200]}); fix: run once "
            f"with internet access (the datasets library caches it), or put the split's rows in the HF "
            f"schema at {data_root() / folder}/{split}.jsonl") from None
    # the rows' own hash too: with no revision pinned, the hub's main may change under the same name
    return rows, f"{source}:{text_hash(json.dumps(rows, sort_keys=True, default=str))}"
