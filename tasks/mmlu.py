"""MMLU (Hendrycks et al.) exactly as lm-eval's default `mmlu` task renders and scores it.

Per subject: the description "The following are multiple choice questions (with answers) about
<subject with spaces>.\\n\\n", then the first `num_fewshot` rows of the subject's dev file (in file
order, lm-eval's first_n sampler), each as "<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: <letter>\\n\\n",
then the question rendered the same way ending in "Answer:". The four continuations " A" .. " D"
are scored with loglikelihood; the prediction is the argmax.

Metrics: `acc` over all questions (lm-eval's `mmlu` group aggregates weight_by_size, i.e. micro),
`acc_macro` (mean of per-subject accuracies) and `acc/<subject>`.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from models.protocol import LM
from models.download import sha256_file
from harness.cli import choice_option
from tasks.base import Metric, Record, Sample, TaskError, check_fewshot, check_limit, text_hash
from tasks.chat import ChatFormat
from tasks.data import mmlu_dir, mmlu_subjects
from tasks.multiple_choice import Item, choice_sample, mean_metric, score_choices

TEMPLATE_VERSION = "mmlu/lm-eval-default/v1"
LABELS = ("A", "B", "C", "D")


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def read_mmlu_csv(path: Path) -> list[Item]:
    """Rows `question, A, B, C, D, answer-letter`, no header. A real CSV parser: quoted fields
    hold newlines, some files use CRLF, some lack the final newline."""
    items = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            for row in reader:
                if len(row) != 6 or row[5].strip() not in LABELS:
                    raise TaskError(f"{path}:{reader.line_num}: malformed MMLU row (expected 6 fields "
                                    f"ending in an answer letter A-D, got {len(row)} fields: {row[:1]!r}...)")
                items.append(Item(row[0], tuple(row[1:5]), LABELS, LABELS.index(row[5].strip())))
    except (UnicodeDecodeError, csv.Error) as e:
        raise TaskError(f"{path}: cannot parse as UTF-8 CSV ({e})") from None
    return items


class MMLUTask:
    name = "mmlu"

    def __init__(self, subjects: str | Sequence[str] | None = None, split: str = "test",
                 num_fewshot: int = 0, limit: int | None = None, fewshot_shortfall: str = "refuse",
                 apply_chat_template: bool = False, fewshot_as_multiturn: bool | None = None):
        if split not in ("dev", "val", "test"):
            raise TaskError(f"MMLU split must be dev, val or test, not {split!r}")
        limit, num_fewshot = check_limit(limit), check_fewshot(num_fewshot)
        self.shortfall = choice_option(fewshot_shortfall, "task.fewshot_shortfall", ("refuse", "allow"))
        self.root, self.split, self.num_fewshot, self.limit = mmlu_dir(), split, num_fewshot, limit
        self.chat = ChatFormat.from_options(apply_chat_template, fewshot_as_multiturn)
        valid = mmlu_subjects("test")
        if subjects is None:
            subjects = valid
        elif isinstance(subjects, str):
            subjects = [subjects]
        unknown = [s for s in subjects if s not in valid]
        if unknown:
            raise TaskError(f"unknown MMLU subject(s) {unknown}; valid subjects: {', '.join(valid)}")
        self.subjects = list(subjects)
        if self.num_fewshot > 5:
            raise TaskError(f"MMLU has 5 dev questions per subject; num_fewshot={self.num_fewshot}")
        files = [self.file(s, split) for s in self.subjects]
        self.requested_fewshot, shortfall = self.num_fewshot, ""
        if self.num_fewshot:
            files += [self.file(s, "dev") for s in self.subjects]
            have = self._check_fewshot_pools()
            if min(have.values()) < self.num_fewshot:   # allowed: the row says how many shots were used
                self.num_fewshot = min(have.values())
                shortfall = "shortfall:" + ",".join(f"{s}={n}" for s, n in sorted(have.items()) if n < self.requested_fewshot)
        self.version = text_hash(TEMPLATE_VERSION, split, str(self.num_fewshot), shortfall,
                                 *(f"{p.name}:{sha256_file(p)}" for p in files),
                                 *self.chat.version_parts)

    def _check_fewshot_pools(self) -> dict[str, int]:
        """Shots available per subject. A dev file shorter than num_fewshot would silently give
        fewer-shot prompts under a row saying num_fewshot=N: refused unless fewshot_shortfall=allow."""
        have = {}
        for s in self.subjects:
            pool = read_mmlu_csv(self.file(s, "dev"))
            have[s] = min(self.num_fewshot, len(pool) - (1 if self.split == "dev" else 0))
            if have[s] < self.num_fewshot and self.shortfall == "refuse":
                raise TaskError(f"{self.file(s, 'dev')} has {len(pool)} rows, too few for task.num_fewshot="
                                f"{self.num_fewshot}; lower task.num_fewshot, or pass task.fewshot_shortfall=allow "
                                "to score with the shots there are (the row then records the real count)")
        return have

    def file(self, subject: str, split: str) -> Path:
        return self.root / split / f"{subject}_{split}.csv"

    def samples(self) -> list[Sample]:
        out = []
        for subject in self.subjects:
            items = read_mmlu_csv(self.file(subject, self.split))[: self.limit]
            pool = read_mmlu_csv(self.file(subject, "dev")) if self.num_fewshot else []
            for i, item in enumerate(items):
                # lm-eval drops the question itself from the shots only when it is drawn from dev
                shots = [s for s in pool if not (self.split == "dev" and s == item)][: self.requested_fewshot]
                sample_id = f"{subject}/{self.split}/{i:04d}-{text_hash(item.question)[:8]}"
                short = {"num_fewshot": len(shots)} if len(shots) < self.requested_fewshot else {}
                out.append(choice_sample(sample_id, "mmlu", description(subject), shots, item, self.chat,
                                         subject=subject, **short))
        return out

    def score(self, lm: LM, samples: list[Sample]) -> list[Record]:
        return score_choices(lm, samples)   # one loglikelihood call for every subject at once

    def metrics(self, records: list[Record]) -> dict[str, Metric]:
        by_subject: dict[str, list] = defaultdict(list)
        for r in records:
            by_subject[r.extra["subject"]].append(r.scores.get("acc"))
        per_subject = {s: mean_metric(v) for s, v in sorted(by_subject.items())}
        overall = mean_metric([r.scores.get("acc") for r in records])
        scored = [m.value for m in per_subject.values() if m.n]
        macro = Metric(sum(scored) / len(scored) if scored else float("nan"), None,
                       overall.n, overall.n_unscored)
        return {"acc": overall, "acc_macro": macro, **{f"acc/{s}": m for s, m in per_subject.items()}}
