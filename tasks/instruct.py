"""Instruction following, judged (the book's ch07): respond to held-out instructions, let a judge score.

    python -m harness task=instruct model=out/instruct judge.model=llama3.1:8b task.limit=20

Samples are the `split` part (default: test, 104 entries) of the seeded 85/5/10 split of the ch07
instruction data (`tasks.instruction_data`), so a checkpoint finetuned by `harness.train` is never
judged on an entry it trained on. Scoring one chunk:
1. the prompt is `build_prompt(entry, lm.chat_prompt, prompt_style)` (auto: the model's chat template
   when it has one, else the Alpaca format);
2. greedy `lm.generate`, at most `max_new_tokens`, cut at the next Alpaca header ("### ...") when
   the prompt is Alpaca-style;
3. `judge.grade_many` over (Alpaca-formatted instruction + input, reference output, response).
Each record keeps the prompt, the response, the judge's raw reply, its parse and any error; a reply
that could not be had or read is *unscored* (score None), counted in n_unscored, never a zero.
When the judge itself failed (timeouts, connection errors, 5xx after the retries) the record has
`extra["retry"] = True`: the engine keeps it but scores the sample again when the same run folder
is rerun. A reply without a readable score is final (`retry` False). When no sample got a score,
`unscored_reason(records)` is the one line the engine prints instead of appending NaN rows.

Metrics: `score` (mean over scored samples, stderr = sample std / sqrt(n)) and
`score_ci95_low` / `score_ci95_high`: a 95% percentile bootstrap of the mean (10,000 resamples,
numpy RandomState(seed), so the interval is the same on every run). The scale is the judge style's
(0-100 or 1-10); the style is part of `version`. The judge model and its digest are separate
comparability keys (`judge_model`, `judge_digest` leaderboard columns), read from the records, and so is the judge's
reliability (`judge_unscored_rate`; `judge_agreement` when judge.self_consistency asked a second,
sampled time: the share of samples given the same score twice).
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

import numpy as np

from harness.cli import int_option
from models.protocol import LM
from tasks.judged import JudgeKeys, reliability
from tasks.base import Metric, Record, Sample, TaskError, check_limit, text_hash
from tasks.instruction_data import (ALPACA_HEADER, ALPACA_STOP, PROMPT_STYLES, alpaca_prompt, build_prompt,
                                    instruction_split, resolve_style, stop_strings)
from tasks.multiple_choice import mean_metric

TEMPLATE_VERSION = "instruct/v1"
RESPONSE_HEADER = "\n\n### Response:\n"
BOOTSTRAP_RESAMPLES = 10_000

log = logging.getLogger(__name__)


def judge_input(entry: dict) -> str:
    """The book's `format_input`: Alpaca header, instruction and input, without the response header."""
    return alpaca_prompt(entry).removesuffix(RESPONSE_HEADER)


def bootstrap_ci95(values: Sequence[float], seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; deterministic under `seed`."""
    x = np.asarray(values, dtype=np.float64)
    idx = np.random.RandomState(seed).randint(0, len(x), size=(BOOTSTRAP_RESAMPLES, len(x)))
    means = x[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


class InstructTask:
    name = "instruct"
    num_fewshot = 0

    def __init__(self, judge, split: str = "test", limit: int | None = None, prompt_style: str = "auto",
                 max_new_tokens: int = 256, seed: int = 123,
                 fractions: Sequence[float] = (0.85, 0.05, 0.10), path: str | None = None):
        if prompt_style not in PROMPT_STYLES:
            raise TaskError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, not {prompt_style!r}")
        max_new_tokens = int_option(max_new_tokens, "task.max_new_tokens", minimum=1)
        limit = check_limit(limit)
        self.judge, self.split, self.prompt_style = judge, split, prompt_style
        self.max_new_tokens, self.seed = int(max_new_tokens), int(seed)
        data = instruction_split(path, seed, list(fractions))
        self.entries = data.part(split)[:limit]
        self.version = text_hash(TEMPLATE_VERSION, ALPACA_HEADER, prompt_style, *ALPACA_STOP,
                                 str(self.max_new_tokens), judge.style, judge.prompt_template,
                                 split, data.signature)
        self.judge_keys = JudgeKeys(judge)
        self.judge_reliability: dict = {}                # set by metrics(): leaderboard columns

    def samples(self) -> list[Sample]:
        return [Sample(f"{self.split}/{i:04d}-{text_hash(e['instruction'], e['input'])[:8]}",
                       {"instruction": e["instruction"], "input": e["input"], "output": e["output"]})
                for i, e in enumerate(self.entries)]

    def score(self, lm: LM, samples: list[Sample]) -> list[Record]:
        if not samples:
            return []
        digest = self.judge.digest            # a misconfigured judge stops the run before generating
        style = resolve_style(self.prompt_style, lm.has_chat_template)
        chat = lm.chat_prompt if lm.has_chat_template else None
        prompts = [build_prompt(s.data, chat, style) for s in samples]
        stop = stop_strings(style)
        responses = [r.strip() for r in lm.generate(prompts, max_new_tokens=self.max_new_tokens,
                                                    stop=stop, temperature=0.0, seed=self.seed)]
        items = [(judge_input(s.data), s.data["output"], r) for s, r in zip(samples, responses)]
        grades = self.judge.grade_many(items)
        judge_prompts = [self.judge.render(i) for i in items]   # the messages sent, kept for the viewer
        # The sampled second pass (judge.self_consistency): kept beside the first, never averaged in.
        seconds = self.judge.grade_many(items, second=True) if self.judge.self_consistency else [None] * len(items)
        records = []
        for s, p, r, g, g2, jp in zip(samples, prompts, responses, grades, seconds, judge_prompts):
            extra = {"prompt": p, "prompt_style": style, "judge_prompt": jp, "judge_reply": g.raw,
                     "judge_prompt_hash": g.prompt_hash, "parse": g.parse, "error": g.error,
                     "cached": g.cached, "retry": bool(g.transient or (g2 is not None and g2.transient)),
                     "judge_model": self.judge.model, "judge_digest": digest}
            if g2 is not None:
                extra.update(score_2=g2.score, judge_reply_2=g2.raw)
            records.append(Record(sample_id=s.id, prompt_hash=text_hash(p, g.prompt_hash), prediction=r,
                                  target=s.data["output"], scores={"score": g.score}, extra=extra))
        return records

    def metrics(self, records: list[Record]) -> dict[str, Metric]:
        self.judge_keys.check(records)
        if (failed := sum(bool(r.extra.get("retry")) for r in records)) and len(records) > failed:
            log.warning("%d of %d samples are unscored because the judge failed (%s); rerun the same "
                        "hydra.run.dir to retry them", failed, len(records), _reasons(records, True))
        mean = mean_metric([r.scores.get("score") for r in records])
        self.judge_reliability = reliability(records, "score")
        scored = [r.scores["score"] for r in records if r.scores.get("score") is not None]
        if not scored:
            nan = Metric(float("nan"), None, 0, mean.n_unscored)
            return {"score": mean, "score_ci95_low": nan, "score_ci95_high": nan}
        low, high = bootstrap_ci95(scored, self.seed)
        return {"score": mean, "score_ci95_low": Metric(low, None, mean.n, mean.n_unscored),
                "score_ci95_high": Metric(high, None, mean.n, mean.n_unscored)}

    def unscored_reason(self, records: list[Record]) -> str | None:
        """One line saying why no sample got a score, or None when one did (the engine prints it and
        appends no rows). Judge failures (retry) and replies without a score are told apart, since
        only the first go away on a rerun."""
        if any(r.scores.get("score") is not None for r in records):
            return None
        if not records:
            return "there were no samples to judge (task.limit=0 or an empty split)"
        host = getattr(self.judge, "host", "")
        failed = [r for r in records if r.extra.get("retry")]
        unread = len(records) - len(failed)
        parts = []
        if failed:
            every = f"all {len(records)}" if not unread else f"{len(failed)} of {len(records)}"
            parts.append(f"the judge{f' at judge.host={host}' if host else ''} failed for {every} samples: "
                         f"{_reasons(records, True)}; rerun the same hydra.run.dir to retry them")
        if unread:
            every = f"all {len(records)}" if not failed else f"{unread} of {len(records)}"
            parts.append(f"judge.model={self.judge.model} answered {every} samples without a readable score: "
                         f"{_reasons(records, False)} (final; the replies are in records.jsonl, "
                         "extra.judge_reply: try judge.json_format=true or another judge.model in a new "
                         "hydra.run.dir)")
        return "no sample was scored: " + "; ".join(parts)


def _reasons(records: list[Record], retry: bool, most: int = 3) -> str:
    """The commonest errors among unscored records with this retry flag: 'timeout after 4 attempts (5)'."""
    counts = Counter(r.extra.get("error") or "no reason recorded" for r in records
                     if r.scores.get("score") is None and bool(r.extra.get("retry")) == retry)
    top = [f"{reason} ({n})" for reason, n in counts.most_common(most)]
    return ", ".join(top) + (f" and {len(counts) - most} other reasons" if len(counts) > most else "")
