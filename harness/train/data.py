"""Training data: text -> cached token memmap -> sliding windows -> deterministic, resumable batches.

The token cache is keyed by the sha256 of every corpus file plus the tokenizer, so the same corpus is
tokenized once per tokenizer and any edit to a file makes a new cache. Batches are addressed by a
*position* (micro-batches since the start of training) rather than drawn from an iterator: the
shuffle of each epoch is a pure function of (seed, epoch), so a resumed run needs only that integer.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from harness.cli import UserError
from harness.io import cache_root
from models.download import data_root, sha256_file

TEXT_SUFFIXES = (".txt", ".md", ".text")
CHUNK_CHARS = 1 << 20   # texts are encoded in ~1 MB runs of whole lines (tokenizer threads, bounded memory)


class DataError(UserError):
    """Unusable training data (missing, empty, too short, not text). The message is user-facing."""


def resolve_files(specs: Sequence[str]) -> list[Path]:
    """Files and folders (absolute, or relative to the cwd, then to $HARNESS_DATA) -> text files."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    files: list[Path] = []
    for spec in specs:
        cands = [Path(spec).expanduser()] + ([] if Path(spec).is_absolute() else [data_root() / spec])
        path = next((p for p in cands if p.exists()), None)
        if path is None:
            raise DataError(f"corpus {spec!r} not found (looked at {' and '.join(str(c.absolute()) for c in cands)})")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"corpus folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
            files += found
        else:
            files.append(path)
    if not files:
        raise DataError("no corpus files given")
    return files


def _chunks(text: str) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def token_cache(files: Sequence[Path], tokenizer, cache_dir: str | Path | None = None,
                write: bool = True) -> tuple[np.ndarray, list[dict]]:
    """All files tokenized and joined (EOS between documents) as a read-only uint16/uint32 array,
    plus [{path, sha256, tokens}] for provenance. `write=False` (DDP ranks > 0) never writes."""
    infos = [{"path": str(f.resolve()), "sha256": sha256_file(f)} for f in files]
    key = hashlib.sha256(json.dumps([tokenizer.name, tokenizer.vocab_size, tokenizer.eos_id,
                                     [i["sha256"] for i in infos]]).encode()).hexdigest()[:24]
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root() / "tokens"
    path, meta_path = folder / f"{key}.{np.dtype(dtype).name}", folder / f"{key}.json"
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        for info, n in zip(infos, meta["tokens"]):
            info["tokens"] = n
        return np.memmap(path, dtype=dtype, mode="r"), infos
    parts = []
    for i, (f, info) in enumerate(zip(files, infos)):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        ids = [t for chunk in tokenizer.encode_batch(_chunks(text)) for t in chunk]
        if i and ids:
            ids.insert(0, tokenizer.eos_id)   # documents are separated the way GPT-2 was trained
        info["tokens"] = len(ids)
        parts.append(np.asarray(ids, dtype=dtype))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    if write and len(tokens):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.")
        with os.fdopen(fd, "wb") as out:
            tokens.tofile(out)
        os.replace(tmp, path)
        meta_path.write_text(json.dumps({"files": infos, "tokenizer": tokenizer.name,
                                         "tokens": [i["tokens"] for i in infos]}, indent=1))
    return tokens, infos


def split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first (1 - val_fraction) of the tokens for training, the rest for validation."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(tokens) * val_fraction))
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


class Windows:
    """Sliding windows: item i is (tokens[s:s+L], tokens[s+1:s+L+1]) with s = i * stride."""

    def __init__(self, tokens: np.ndarray, length: int, stride: int):
        if length < 1 or stride < 1:
            raise DataError(f"context length and stride must be >= 1 (got {length}, {stride})")
        self.tokens, self.length, self.stride = tokens, length, stride
        self.n = max(0, (len(tokens) - length - 1) // stride + 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * self.stride
        chunk = torch.from_numpy(np.asarray(self.tokens[s: s + self.length + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]


def stack(items: list) -> Any:
    """Default collate: a list of equal-shape tensors or tuples of them -> stacked tensors."""
    if isinstance(items[0], torch.Tensor):
        return torch.stack(items)
    return tuple(torch.stack(col) for col in zip(*items))


class ShuffledBatches:
    """The batch source the training loop reads: `batch(position)` is micro-batch `position`
    (counting across epochs). Each epoch is a fresh permutation from (seed, epoch); a global batch of
    batch_size * world items is cut into one slice per rank, so ranks see disjoint data and the
    global batch equals a single process with batch_size * world. Incomplete batches are dropped."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, collate: Callable[[list], Any] = stack):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.shuffle, self.collate = rank, world, shuffle, collate
        self.per_epoch = len(dataset) // (batch_size * world)
        self._order: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)  # never the global RNG
                self._order = (epoch, torch.randperm(n, generator=g))
            else:
                self._order = (epoch, torch.arange(n))
        return self._order[1]

    def indices(self, position: int) -> list[int]:
        epoch, i = divmod(position, self.per_epoch)
        start = (i * self.world + self.rank) * self.batch_size
        return self.order(epoch)[start: start + self.batch_size].tolist()

    def batch(self, position: int) -> Any:
        return self.collate([self.dataset[j] for j in self.indices(position)])


class EvalBatches:
    """Every item once, in order, as batches; rank r takes batches r, r + world, ... (the loop sums
    losses over ranks). Iterable any number of times."""

    def __init__(self, dataset, batch_size: int, rank: int = 0, world: int = 1,
                 collate: Callable[[list], Any] = stack):
        self.dataset, self.batch_size, self.rank, self.world, self.collate = dataset, batch_size, rank, world, collate
        self.n_batches = -(-len(dataset) // batch_size)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        for b in range(self.rank, self.n_batches, self.world):
            items = range(b * self.batch_size, min(len(self.dataset), (b + 1) * self.batch_size))
            yield self.collate([self.dataset[j] for j in items])
