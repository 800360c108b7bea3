"""MT-Bench (Zheng et al. 2023): 80 two-turn questions, each turn rated 1-10 by a judge model.

    python -m harness task=mt_bench model=out/instruct judge.host=http://gpu-box:11434 judge.model=llama3.1:8b

Data, judge prompts and the rating parser are tasks/mt_bench_data.py (FastChat's staged files).
Scoring one chunk of questions:
1. turn 1, batched across questions: `lm.chat_prompt([user q1])`, greedy (temperature 0, `seed`),
   at most `max_new_tokens` (FastChat's 1024);
2. turn 2, batched: `lm.chat_prompt([user q1, assistant a1, user q2])`: the second question is
   asked after the model's *own* first answer, as in a real conversation;
3. the judge grades each turn with FastChat's prompt for it (single-answer grading; math,
   reasoning and coding against the GPT-4 reference); the turn-2 judge sees both turns.
A model without a chat template gets a plain "### User:" / "### Assistant:" transcript instead
(cut at the next "### User:"), so base checkpoints can be compared too; records say which
(`extra.prompt_format`). Scores from the two formats are not comparable, and the format is not
a config option: it follows the model. `judge.json_format=true` constrains the judge's reply to
{"rating": "[[n]]"} (RATING_SCHEMA): no explanation first, but always a rating.

One record per question (`q081`): prediction [a1, a2], scores {"turn1", "turn2"} (None =
unscored: no reply, or no readable rating in 1-10; never a zero). A judge failure (timeouts, 5xx
after the retries) on either turn sets `extra.retry`, so a rerun of the same run folder scores the
whole question again; the generation is redone but the judge cache makes the good turn free.

Metrics: `score` (FastChat's overall: the mean over all scored turns), `score_turn1`,
`score_turn2`, `score_<category>` (the mean over the category's scored turns); n and n_unscored
count turns. With `judge.self_consistency`, `judge_agreement`: the share of turns whose sampled
second verdict equals the first (a failed second-pass request also sets `extra.retry`). `judge_reliability` holds the unscored rate and that agreement.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Sequence

from harness.cli import int_option
from harness.judge import agreement
from harness.judge.styles import get_style
from models.protocol import LM
from tasks.judged import JudgeKeys
from tasks.base import Metric, Record, Sample, TaskError, check_limit, text_hash
from tasks.multiple_choice import mean_metric
from tasks.mt_bench_data import NEED_REF, PROMPT_NAMES, judge_messages, load, parse_rating, prompt_name

TEMPLATE_VERSION = "mt_bench/v1"
TURNS = ("turn1", "turn2")
JUDGE_REPLY_TOKENS = 512        # when judge.num_predict is null: room for the explanation, then [[rating]]
TRANSCRIPT_STOP = ("### User:",)
# With judge.json_format the server holds the judge to this reply (grammar-constrained): the rating in
# FastChat's own [[n]] form, so parse_rating reads it as it reads free text. A small local judge that
# never writes [[n]] on its own then always gives a rating.
RATING_SCHEMA = {"type": "object", "properties": {"rating": {"enum": [f"[[{n}]]" for n in range(1, 11)]}},
                 "required": ["rating"], "additionalProperties": False}

log = logging.getLogger(__name__)


def transcript(messages: list[dict]) -> str:
    """The plain-text conversation for a model without a chat template, ending where it answers."""
    parts = [f"### {'User' if m['role'] == 'user' else 'Assistant'}:\n{m['content']}" for m in messages]
    return "\n\n".join(parts) + "\n\n### Assistant:\n"


class MTBenchTask:
    name = "mt_bench"
    num_fewshot = 0

    def __init__(self, judge, limit: int | None = None, categories: Sequence[str] | str | None = None,
                 max_new_tokens: int = 1024, seed: int = 123):
        self.judge, self.seed = judge, int(seed)
        self.max_new_tokens = int(int_option(max_new_tokens, "task.max_new_tokens", minimum=1))
        limit = check_limit(limit)
        data = load()
        known = sorted({q["category"] for q in data.questions})
        if isinstance(categories, str):
            categories = [categories]
        if categories is not None:
            categories = list(categories)
            unknown = [c for c in categories if c not in known]
            if unknown or not categories:
                raise TaskError(f"task.categories={categories} " + (f"names no MT-Bench category {unknown[0]!r}"
                                if unknown else "selects nothing") + f"; use null (all) or some of: {', '.join(known)}")
        self.categories = sorted(categories) if categories is not None else None
        self.questions = [q for q in data.questions if self.categories is None or q["category"] in self.categories][:limit]
        self.references, self.prompts = data.references, data.prompts
        # judge.num_predict when set; when null the judge style's own bound is for its prompts (32
        # tokens for zero_to_hundred would cut MT-Bench's explanation off before the rating)
        own = judge.options.max_tokens
        self.reply_tokens = JUDGE_REPLY_TOKENS if own == get_style(judge.style).num_predict else own
        self.version = text_hash(TEMPLATE_VERSION, *TRANSCRIPT_STOP, str(self.max_new_tokens),
                                 json.dumps([data.prompts[n] for n in PROMPT_NAMES], sort_keys=True),
                                 judge.system(""), str(judge.harden), str(self.reply_tokens),
                                 json.dumps(RATING_SCHEMA) if judge.json_format else "free text",
                                 ",".join(self.categories or ["all"]), data.signature)
        self.judge_keys = JudgeKeys(judge)
        self.judge_reliability: dict = {}

    def samples(self) -> list[Sample]:
        return [Sample(f"q{q['question_id']:03d}",
                       {"question_id": q["question_id"], "category": q["category"], "turns": q["turns"],
                        "reference": self.references.get(q["question_id"])})
                for q in self.questions]

    # -- scoring ------------------------------------------------------------------------------------
    def _generate(self, lm: LM, chats: list[list[dict]]) -> tuple[list[str], list[str]]:
        render = lm.chat_prompt if lm.has_chat_template else transcript
        prompts = [render(c) for c in chats]
        stop = () if lm.has_chat_template else TRANSCRIPT_STOP
        out = lm.generate(prompts, max_new_tokens=self.max_new_tokens, stop=stop, temperature=0.0, seed=self.seed)
        return prompts, [a.strip() for a in out]

    def score(self, lm: LM, samples: list[Sample]) -> list[Record]:
        if not samples:
            return []
        digest = self.judge.digest            # a misconfigured judge stops the run before generating
        q = [s.data["turns"] for s in samples]
        first = [[{"role": "user", "content": t[0]}] for t in q]
        p1, a1 = self._generate(lm, first)
        p2, a2 = self._generate(lm, [c + [{"role": "assistant", "content": a}, {"role": "user", "content": t[1]}]
                                     for c, a, t in zip(first, a1, q)])
        asks = [judge_messages(self.judge, self.prompts[prompt_name(s.data["category"], turn)], s.data["turns"],
                               [x, y], s.data["reference"], turn)
                for turn in (1, 2) for s, x, y in zip(samples, a1, a2)]          # all turn 1s, then turn 2s
        replies = self.judge.ask_many(asks, max_tokens=self.reply_tokens, desc=f"judge {self.judge.model} (mt_bench)",
                                      schema=RATING_SCHEMA)
        seconds = (self.judge.ask_many(asks, second=True, max_tokens=self.reply_tokens, desc="judge second pass",
                                          schema=RATING_SCHEMA)
                   if self.judge.self_consistency else [None] * len(asks))
        n, records = len(samples), []
        for i, s in enumerate(samples):
            got = [replies[i], replies[n + i]]
            parsed = [parse_rating(r.raw) if r.error is None else (None, r.error) for r in got]
            again = [seconds[i], seconds[n + i]]
            extra = {"category": s.data["category"], "prompts": [p1[i], p2[i]],
                     "prompt_format": "chat" if lm.has_chat_template else "transcript",
                     "judge_prompts": [prompt_name(s.data["category"], t) for t in (1, 2)],
                     "judge_replies": [r.raw for r in got], "judge_prompt_hashes": [r.prompt_hash for r in got],
                     "errors": [e for _, e in parsed], "judge_failed": [r.transient for r in got],
                     "cached": [r.cached for r in got],
                     "retry": any(r is not None and r.transient for r in got + again),
                     "judge_model": self.judge.model, "judge_digest": digest}
            if self.judge.self_consistency:
                extra["second_scores"] = {t: parse_rating(r.raw)[0] if r.error is None else None
                                          for t, r in zip(TURNS, again)}
                extra["second_replies"] = [r.raw for r in again]
            records.append(Record(sample_id=s.id, prompt_hash=text_hash(p1[i], p2[i], *(r.prompt_hash for r in got)),
                                  prediction=[a1[i], a2[i]],
                                  target=s.data["reference"] if s.data["category"] in NEED_REF else None,
                                  scores={t: v for t, (v, _) in zip(TURNS, parsed)}, extra=extra))
        return records

    # -- metrics ------------------------------------------------------------------------------------
    def metrics(self, records: list[Record]) -> dict[str, Metric]:
        self.judge_keys.check(records)
        if (failed := sum(bool(r.extra.get("retry")) for r in records)) and len(records) > failed:
            log.warning("%d of %d questions have a judgement that failed (%s); rerun the same hydra.run.dir "
                        "to retry them", failed, len(records), _reasons(records, True))
        turns = {t: [r.scores.get(t) for r in records] for t in TURNS}
        out = {"score": mean_metric(turns["turn1"] + turns["turn2"]),
               "score_turn1": mean_metric(turns["turn1"]), "score_turn2": mean_metric(turns["turn2"])}
        for cat in sorted({r.extra.get("category") for r in records} - {None}):
            out[f"score_{cat}"] = mean_metric([r.scores.get(t) for r in records
                                               if r.extra.get("category") == cat for t in TURNS])
        total = 2 * len(records)
        rate, pairs = None, 0
        if self.judge.self_consistency:
            firsts = [r.scores.get(t) for r in records for t in TURNS]
            seconds = [(r.extra.get("second_scores") or {}).get(t) for r in records for t in TURNS]
            rate, pairs = agreement(firsts, seconds)
            out["judge_agreement"] = Metric(rate, None, pairs, total - pairs)
        self.judge_reliability = {"judge_unscored_rate": out["score"].n_unscored / total if total else float("nan"),
                                  "judge_swap_consistency": None, "judge_agreement": rate if pairs else None}
        return out

    def unscored_reason(self, records: list[Record]) -> str | None:
        """One line saying why no turn got a rating, or None when one did. Judge failures (retry on a
        rerun) and replies without a readable [[rating]] (final) are told apart."""
        if any(r.scores.get(t) is not None for r in records for t in TURNS):
            return None
        if not records:
            return "there were no questions to judge (task.limit=0)"
        total = 2 * len(records)
        failed = sum(1 for r in records for e, c in _turn_errors(r) if c)
        host = getattr(self.judge, "host", "")
        parts = []
        if failed:
            parts.append(f"the judge{f' at judge.host={host}' if host else ''} failed for "
                         f"{'all ' if failed == total else ''}{failed} of {total} judgements: "
                         f"{_reasons(records, True)}; rerun the same hydra.run.dir to retry them")
        if unread := total - failed:
            parts.append(f"judge.model={self.judge.model} answered {unread} of {total} judgements without a "
                         f"readable [[rating]] in 1-10: {_reasons(records, False)} (final; the replies are in "
                         "records.jsonl, extra.judge_replies: try a larger judge.num_predict or another "
                         "judge.model in a new hydra.run.dir)")
        return "no sample was scored: " + "; ".join(parts)


def _turn_errors(r: Record) -> list[tuple[str, bool]]:
    """(why, whether the judge failed rather than answered) for each unscored turn of a record."""
    errors, failed = r.extra.get("errors") or [None, None], r.extra.get("judge_failed") or [False, False]
    return [(e or "no reason recorded", bool(f)) for t, e, f in zip(TURNS, errors, failed) if r.scores.get(t) is None]


def _reasons(records: list[Record], failed: bool, most: int = 3) -> str:
    """The commonest reasons among unscored turns of this kind: 'HTTP 503 after 2 attempts (4)'."""
    counts = Counter(e for r in records for e, c in _turn_errors(r) if c == failed)
    top = [f"{reason} ({n})" for reason, n in counts.most_common(most)]
    return ", ".join(top) + (f" and {len(counts) - most} other reasons" if len(counts) > most else "")
