"""Test-set contamination: the fraction of a task's samples that share an n-gram with the data a
checkpoint (and every ancestor in its provenance) was trained on.

The GPT-3 paper's definition (Brown et al. 2020, appendix C): text is normalized -- lowercased,
punctuation removed, split on whitespace -- and a sample is *dirty* when any run of n consecutive
words of it also occurs in the training data; GPT-3 used n = 13 for its long-form tasks. Here:

- normalize(text): lowercase, delete every character that is neither a word character nor
  whitespace (Unicode-aware, so "don't" -> "dont", "(with answers)" -> "with answers"), split.
- a sample's text is every string value of Sample.data (nested dicts/lists included) joined by
  newlines, so tasks stay unaware of this check; for MMLU that is the rendered prompt (description,
  few-shot examples, question, lettered choices) and the answer letters. A sample with fewer than
  n words holds no n-gram and counts as clean.
- an n-gram is the 64-bit blake2b digest of its words joined by single spaces.

The training side comes from the provenance chain: pretrain records its corpus files (path +
sha256); classify / instruct / DPO record a split signature, which is mapped back to its data file
and re-cut, and only the *train* part counts (one document per entry; n-grams never cross entries).
Each training source's n-gram set (sorted unique uint64) is built once and cached, keyed by the
source's sha256, under $HARNESS_CACHE/contamination (default ~/.cache/harness/contamination); the
fraction per (training sources, n, task name + version + sample ids) is cached too. A file is
checked against its recorded sha256 while it is hashed; a missing or changed file means "not
measured" (a warning and an empty cell), never an error. (N-grams already cached under the recorded
sha256 are those of the data trained on, so they are used even when the file has gone since.) Pretraining data of named models
(SmolLM2, GPT-2) is unknown: models without provenance get an empty cell.

    python -m harness task=mmlu model=out/ckpt                 # rows carry `contamination`
    python -m harness task=mmlu model=out/ckpt contamination_ngram=8   # 0 disables the check
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from harness.cli import UserError
from harness.io import cache_root, write_atomic
from harness.provenance import lineage, parse_split, split_data_file

log = logging.getLogger("harness")
DEFAULT_NGRAM = 13
NORMALIZATION = "gpt3-v1"      # part of every cache key: change it when normalize() changes
CHUNK_BYTES = 1 << 20          # files are read in ~1 MB runs of whole lines
_NOT_WORD = re.compile(r"[^\w\s]|_")


class Unavailable(Exception):
    """The training data cannot be reconstructed (gone, changed, unknown): contamination is ''."""


def cache_dir() -> Path:
    return cache_root() / "contamination"


def normalize(text: str) -> list[str]:
    """GPT-3's normalization: lowercase, punctuation deleted, whitespace split."""
    return _NOT_WORD.sub("", text.lower()).split()


def ngram_hashes(words: Sequence[str], n: int) -> np.ndarray:
    """The 64-bit blake2b hashes of every n-gram of `words` (in order, with repeats)."""
    count = len(words) - n + 1
    if n < 1 or count < 1:
        return np.zeros(0, np.uint64)
    digest = hashlib.blake2b
    return np.fromiter((int.from_bytes(digest(" ".join(words[i:i + n]).encode(), digest_size=8).digest(), "little")
                        for i in range(count)), dtype=np.uint64, count=count)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def sample_text(sample) -> str:
    """Every string value of a Sample's data, joined: the text that is checked."""
    return "\n".join(_strings(sample.data))


# --- the training side -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    key: str                                   # cache key: the file's sha256, or the split's hash
    label: str                                 # for log lines
    documents: Callable[[], Iterable[str]]     # its text, in chunks that never split a word


def _file_chunks(path: Path, sha256: str) -> Iterator[str]:
    """The file in runs of whole lines; Unavailable at the end when its sha256 is not the recorded one
    (so a changed file never gets cached under the old hash)."""
    from tqdm import tqdm

    if not path.is_file():
        raise Unavailable(f"training file {path} is gone")
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, leave=False,
                                     desc=f"n-grams {path.name}") as bar:
        while block := f.read(CHUNK_BYTES) + f.readline():   # "\n" never sits inside a UTF-8 sequence
            h.update(block)
            bar.update(len(block))
            yield block.decode("utf-8", errors="replace")
    if h.hexdigest() != sha256:
        raise Unavailable(f"training file {path} changed since training (sha256 {h.hexdigest()[:12]}, "
                          f"recorded {sha256[:12]})")


def _hash_document(chunks: Iterable[str], n: int) -> list[np.ndarray]:
    """n-grams of one document fed in chunks: the last n-1 words carry over to the next chunk."""
    out, carry = [], []
    for chunk in chunks:
        words = carry + normalize(chunk)
        out.append(ngram_hashes(words, n))
        carry = words[len(words) - (n - 1):] if n > 1 else []
    return out


def _split_documents(step: dict, signature: str, limit: int | None) -> Callable[[], Iterable[str]]:
    split = parse_split(signature)

    def documents() -> Iterator[str]:
        path = split_data_file(step, split)
        if path is None:
            raise Unavailable(f"no data file with sha256 {split.sha256[:12]} for split '{signature}'")
        if split.dataset == "sms_spam":
            from tasks.sms_spam import spam_split
            p = split.params
            cut = spam_split(int(p["seed"]), p["dedupe"] == "True", p["balance"] == "True",
                             [float(f) for f in p["fractions"].split(",")], path)
            train = [text for text, _ in cut.train]
        elif split.dataset == "instruction":
            from tasks.instruction_data import instruction_split
            cut = instruction_split(path, int(split.params["seed"]),
                                    [float(f) for f in split.params["fractions"].split(",")])
            train = ["\n".join(_strings(entry)) for entry in cut.train]
        else:
            raise Unavailable(f"unknown split dataset {split.dataset!r} in '{signature}'")
        if cut.signature != signature:   # the re-cut must be the recorded one
            raise Unavailable(f"re-cutting {path} gives '{cut.signature}', not the recorded '{signature}'")
        yield from train[:limit]
    return documents


def _train_limit(step: dict) -> int | None:
    """`train.limit_train` of the recording run (smoke runs train on the first N entries only)."""
    limit = ((step.get("config") or {}).get("train") or {}).get("limit_train")
    return int(limit) if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 else None


def sources(provenance: Any) -> list[Source]:
    """Every training source of the lineage, root first. Unavailable when a step's data is unknown."""
    out: list[Source] = []
    for step in lineage(provenance).steps:
        data = step.get("data")
        for d in data if isinstance(data, list) else []:
            if not isinstance(d, dict):
                raise Unavailable(f"unreadable training data record {d!r}")
            path, sha = Path(str(d.get("path", ""))), str(d.get("sha256", ""))
            if not sha:
                raise Unavailable(f"training file {path} has no recorded sha256")
            out.append(Source(sha, path.name, lambda p=path, s=sha: [_file_chunks(p, s)]))
        signature = step.get("split")
        if isinstance(signature, str) and signature:
            if parse_split(signature) is None:
                raise Unavailable(f"unrecognised split signature '{signature}'")
            limit = _train_limit(step)
            key = hashlib.sha256(f"{signature}\ntrain[:{limit}]".encode()).hexdigest()
            docs = _split_documents(step, signature, limit)
            out.append(Source(key, signature.split(" ", 1)[0],
                              lambda docs=docs: ([doc] for doc in docs())))
    return out


def training_ngrams(source: Source, n: int) -> np.ndarray:
    """The source's sorted unique n-gram hashes, from the cache or built (then cached) once."""
    path = cache_dir() / f"ngrams-{source.key[:32]}-n{n}-{NORMALIZATION}.npy"
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            log.warning("contamination cache %s is unreadable (%s); rebuilding it", path, e)
    log.info("contamination: hashing the %d-grams of %s (once; cached in %s)", n, source.label, path.parent)
    parts = [a for doc in source.documents() for a in _hash_document(doc, n)]
    grams = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
    buf = io.BytesIO()
    np.save(buf, grams, allow_pickle=False)
    write_atomic(path, buf.getvalue())
    return grams


# --- the eval side ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Contamination:
    fraction: float
    n_contaminated: int
    n_samples: int
    ngram: int
    cached: bool                 # the fraction came from the cache (nothing was hashed)


def measure(provenance: Any, samples: Sequence, task_key: str, n: int = DEFAULT_NGRAM) -> Contamination:
    """Fraction of `samples` sharing an n-gram with the lineage's training data. `task_key` names the
    samples for the fraction cache (task name + version). Raises Unavailable when it cannot be known."""
    srcs = sources(provenance)
    if not srcs:
        raise Unavailable("the provenance records no training data")
    ids = hashlib.sha256("\n".join(str(s.id) for s in samples).encode()).hexdigest()
    key = hashlib.sha256(json.dumps([sorted(s.key for s in srcs), n, NORMALIZATION, task_key, ids]).encode())
    path = cache_dir() / f"fraction-{key.hexdigest()[:32]}.json"
    if path.exists():
        try:
            hit = json.loads(path.read_text())
            return Contamination(hit["fraction"], hit["n_contaminated"], hit["n_samples"], n, cached=True)
        except (OSError, ValueError, KeyError):
            pass   # rebuilt below
    train = [training_ngrams(s, n) for s in srcs]
    per_sample = [ngram_hashes(normalize(sample_text(s)), n) for s in samples]
    grams = np.concatenate(per_sample) if per_sample else np.zeros(0, np.uint64)
    owner = np.repeat(np.arange(len(per_sample)), [len(g) for g in per_sample])
    hit = np.zeros(len(grams), bool)
    for t in train:   # sorted unique: one binary search per sample n-gram
        if len(t):
            at = np.minimum(np.searchsorted(t, grams), len(t) - 1)
            hit |= t[at] == grams
    dirty = len(np.unique(owner[hit]))
    result = Contamination(dirty / len(samples) if samples else 0.0, dirty, len(samples), n, cached=False)
    record = {"fraction": result.fraction, "n_contaminated": dirty, "n_samples": len(samples), "ngram": n,
              "task": task_key, "sources": [s.label for s in srcs]}
    write_atomic(path, json.dumps(record).encode())
    return result


def contamination_cell(provenance: Any, task, n: int = DEFAULT_NGRAM) -> float | str:
    """The leaderboard's `contamination` value: a fraction, or "" (no provenance, disabled, or the
    training data is unavailable -- then with a warning)."""
    if not n or not isinstance(provenance, dict) or not provenance:
        return ""
    if n < 0:
        log.warning("contamination_ngram=%d: must be >= 1 (0 disables); not measured", n)
        return ""
    try:
        got = measure(provenance, list(task.samples()), f"{task.name}@{task.version}", int(n))
    except (Unavailable, UserError, OSError, ValueError, KeyError) as e:   # UserError: TaskError / bad split data
        log.warning("contamination not measured: %s", e)
        return ""
    log.info("contamination: %d of %d %s samples (%.4f) share an n-gram (n=%d) with the training data%s",
             got.n_contaminated, got.n_samples, task.name, got.fraction, n, " (cached)" if got.cached else "")
    return round(got.fraction, 6)
