"""What every task is made of: samples in, one record per sample out, metrics from records.

A task is data plus a scorer (Inspect AI's shape). The engine (`harness.evaluate`) never branches on
task type: it asks `samples()`, hands the not-yet-scored ones to `score()`, appends the records to
`records.jsonl`, and calls `metrics()` on all records. A sample that could not be scored still gets a
record, with `scores` values of None, and is counted in `Metric.n_unscored`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Protocol

from harness.cli import UserError, int_option
from models.protocol import LM


RETRY = "retry"   # Record.extra key: true when the sample should be scored again on a rerun


@dataclass(frozen=True)
class Sample:
    id: str                      # stable across runs: the resume key
    data: dict[str, Any]         # whatever the task's scorer needs (question, choices, text, ...)


@dataclass
class Record:
    sample_id: str
    prompt_hash: str             # sha256 of the exact prompt(s) scored; a changed prompt is a new record
    prediction: Any
    target: Any
    scores: dict[str, float | None]   # per-sample values; None = unscored
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def retryable(self) -> bool:
        """Unscored for a passing reason (the judge timed out, answered 5xx): not final. A rerun of the
        same run folder scores the sample again; the newest record of a sample is the one that counts."""
        return bool(self.extra.get(RETRY))

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> "Record":
        return cls(**json.loads(line))


@dataclass(frozen=True)
class Metric:
    value: float
    stderr: float | None
    n: int                       # samples that contributed to value
    n_unscored: int = 0          # samples that have a record but no score


class Task(Protocol):
    name: str
    version: str                 # changes whenever scores could change (prompt template, data files)
    num_fewshot: int

    def samples(self) -> Iterable[Sample]: ...

    def score(self, lm: LM, samples: list[Sample]) -> list[Record]: ...

    def metrics(self, records: list[Record]) -> dict[str, Metric]: ...


def text_hash(*parts: str) -> str:
    """Short sha256 over prompt parts, used for prompt_hash and task versions."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def check_limit(limit) -> int | None:
    """task.limit: null (all samples) or a whole number >= 0. A negative one would slice off the
    last samples and a float would fail deep inside, both silently wrong or a traceback."""
    return int_option(limit, "task.limit", minimum=0, allow_none=True)


def check_fewshot(num_fewshot) -> int:
    return int_option(num_fewshot, "task.num_fewshot", minimum=0)


class TaskError(UserError):
    """Bad task input (missing data file, malformed row). The CLI prints it as one line and exits 2."""
