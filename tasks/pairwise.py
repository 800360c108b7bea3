"""Pairwise judging: the model answers, a judge compares the answer with an opponent's, both orders.

    python -m harness task=pairwise model=out/instruct judge.model=llama3.1:8b task.limit=20
    python -m harness task=pairwise model=gpt-tiny task.opponent=run:outputs/instruct/llama-tiny/<time>
    python -m harness task=pairwise task.data=mt_bench task.opponent=run:outputs/mt_bench/<model>/<time>

Samples: `task.data=instruct` is the held-out split of the ch07 instruction data exactly as
task=instruct samples it (same ids and prompts: an instruct run's records can be the opponent);
`task.data=mt_bench` is turn 1 of the 80 MT-Bench questions (ids q081.., as task=mt_bench). The
opponent (`task.opponent`) is `reference` (the reference outputs) or `run:<folder>`, the answers an
earlier run left in its records.jsonl (tasks/pairwise_data.py); nothing is regenerated for it.

Scoring one chunk: greedy answers as task=instruct makes them, then FastChat's `pair-v2` judge prompt
(read from $HARNESS_DATA/mt_bench/judge_prompts.jsonl) for every sample twice, ours as assistant A and
then as B, all in one `judge.ask_many`. Why both orders: LLM judges favour a position, and MT-Bench's
rule (harness.pairwise.combine) turns an order-dependent verdict into a tie, so position bias cannot
make wins; how often the orders agreed is `swap_consistency`. Answers are fenced (judge.fence) and
the system prompt hardened (judge.system) when judge.harden is on. `judge.json_format=true` holds
the judge to {"verdict": "[[A]]"|"[[B]]"|"[[C]]"} by grammar (VERDICT_SCHEMA): no explanation, always a verdict.

Per sample: scores {"win": 1 / 0.5 / 0, None when either order had no readable verdict}; extra has both
replies and verdicts, the outcome, lengths and `battle` {model_a: ours, model_b: opponent, winner}
for `python -m harness.arena`. Metrics: `win_rate` (ties as half, its bootstrap 95% interval as
win_rate_ci95_low/high), `win`/`tie`/`loss` rates, `swap_consistency`, `lc_win_rate` (length-controlled
on the answers' length difference in characters, harness.pairwise.length_controlled) and
`judge_agreement` when judge.self_consistency is on.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Sequence

from harness.cli import int_option
from harness.judge import agreement
from harness.pairwise import combine, length_controlled, parse_verdict, summarise
from models.protocol import LM
from tasks.judged import JudgeKeys
from tasks.base import Metric, Record, Sample, TaskError, check_limit, text_hash
from tasks.instruct import InstructTask
from tasks.instruction_data import (ALPACA_HEADER, ALPACA_STOP, PROMPT_STYLES, build_prompt, instruction_split,
                                    resolve_style, stop_strings)
from tasks.multiple_choice import mean_metric
from tasks.pairwise_data import data_hash, load_opponent, mt_bench_questions, pair_prompt, question_text

TEMPLATE_VERSION = "pairwise/v1"
DATA = ("instruct", "mt_bench")
LENGTH_UNIT = "chars"
OUTCOME_WINNER = {"win": "a", "tie": "tie", "loss": "b"}    # ours is battle model_a
# With judge.json_format the server holds the judge to this reply (grammar-constrained), FastChat's
# verdict tokens inside: parse_verdict reads it as it reads free text, and a small judge always decides.
VERDICT_SCHEMA = {"type": "object", "properties": {"verdict": {"enum": ["[[A]]", "[[B]]", "[[C]]"]}},
                  "required": ["verdict"], "additionalProperties": False}

log = logging.getLogger(__name__)


class PairwiseTask:
    name = "pairwise"
    num_fewshot = 0

    def __init__(self, judge, data: str = "instruct", opponent: str = "reference", split: str = "test",
                 limit: int | None = None, prompt_style: str = "auto", max_new_tokens: int = 256,
                 seed: int = 123, fractions: Sequence[float] = (0.85, 0.05, 0.10), path: str | None = None,
                 judge_prompt: str = "pair-v2", judge_max_tokens: int = 1024):
        if data not in DATA:
            raise TaskError(f"task.data={data!r}: expected one of {', '.join(DATA)}")
        if prompt_style not in PROMPT_STYLES:
            raise TaskError(f"task.prompt_style={prompt_style!r}: expected one of {', '.join(PROMPT_STYLES)}")
        self.judge, self.data, self.prompt_style = judge, data, prompt_style
        self.seed = int_option(seed, "task.seed")
        self.max_new_tokens = int_option(max_new_tokens, "task.max_new_tokens", minimum=1)
        self.judge_max_tokens = int_option(judge_max_tokens, "task.judge_max_tokens", minimum=1)
        limit = check_limit(limit)
        if data == "instruct":      # the instruct task owns the split and the sample ids: reuse both
            self._samples = InstructTask(judge, split, limit, prompt_style, max_new_tokens, seed, fractions,
                                         path).samples()
            data_signature = instruction_split(path, self.seed, list(fractions)).signature
        else:
            questions, data_signature = mt_bench_questions()
            self._samples = questions[:limit]
        self.split = split if data == "instruct" else ""
        self.prompt = pair_prompt(judge_prompt)
        self.opponent = load_opponent(opponent, self._samples, data)
        self.version = text_hash(TEMPLATE_VERSION, data, self.split, ALPACA_HEADER,
                                 *ALPACA_STOP, prompt_style, str(self.max_new_tokens), str(self.judge_max_tokens),
                                 self.prompt["system_prompt"], self.prompt["prompt_template"],
                                 f"harden={judge.harden}", f"json_format={judge.json_format}", self.opponent.signature,
                                 data_signature)
        self.judge_keys = JudgeKeys(judge)
        self.judge_reliability: dict = {}

    def samples(self) -> list[Sample]:
        return list(self._samples)

    def _messages(self, question: str, answer_a: str, answer_b: str) -> list[dict]:
        user = self.prompt["prompt_template"].format(question=question, answer_a=self.judge.fence(answer_a),
                                                     answer_b=self.judge.fence(answer_b))
        return [{"role": "system", "content": self.judge.system(self.prompt["system_prompt"])},
                {"role": "user", "content": user}]

    def _ask(self, samples, ours, theirs, second: bool) -> list[tuple]:
        """(first, swapped) replies per sample; ours is A in `first` and B in `swapped`."""
        conversations = []
        for s, a, b in zip(samples, ours, theirs):
            q = question_text(s.data)
            conversations += [self._messages(q, a, b), self._messages(q, b, a)]
        replies = self.judge.ask_many(conversations, second=second, max_tokens=self.judge_max_tokens, schema=VERDICT_SCHEMA,
                                      desc=f"judge {self.judge.model} pairwise")
        return list(zip(replies[0::2], replies[1::2]))

    def score(self, lm: LM, samples: list[Sample]) -> list[Record]:
        if not samples:
            return []
        digest = self.judge.digest            # a misconfigured judge stops the run before generating
        ours_name = str((getattr(lm, "info", None) or {}).get("model") or lm.name)
        style = resolve_style(self.prompt_style, lm.has_chat_template)
        chat = lm.chat_prompt if lm.has_chat_template else None
        prompts = [build_prompt(s.data, chat, style) for s in samples]
        responses = [r.strip() for r in lm.generate(prompts, max_new_tokens=self.max_new_tokens,
                                                    stop=stop_strings(style), temperature=0.0, seed=self.seed)]
        theirs = [self.opponent.answers[s.id] for s in samples]
        pairs = self._ask(samples, responses, theirs, second=False)
        seconds = (self._ask(samples, responses, theirs, second=True) if self.judge.self_consistency
                   else [None] * len(samples))
        return [self._record(s, p, r, t, pair, again, ours_name, style, digest)
                for s, p, r, t, pair, again in zip(samples, prompts, responses, theirs, pairs, seconds)]

    def _record(self, s, prompt, ours, theirs, pair, again, ours_name, style, digest) -> Record:
        first, swapped = pair
        v = combine(parse_verdict(first.raw), parse_verdict(swapped.raw))
        errors = [r.error or ("no [[A]]/[[B]]/[[C]] verdict" if parse_verdict(r.raw) is None else None)
                  for r in pair]
        battle = None if v.outcome is None else {"model_a": ours_name, "model_b": self.opponent.name,
                                                 "winner": OUTCOME_WINNER[v.outcome]}
        extra = {"prompt": prompt, "prompt_style": style, "question": question_text(s.data),
                 "data_hash": data_hash(s.data), "opponent": self.opponent.name,
                 "opponent_source": self.opponent.source,
                 "judge_replies": [first.raw, swapped.raw], "verdicts": [v.first, v.swapped],
                 "consistent": v.consistent, "outcome": v.outcome,
                 "error": "; ".join(f"{o}: {e}" for o, e in zip(("ours as A", "ours as B"), errors) if e) or None,
                 "cached": first.cached and swapped.cached,
                 "retry": any(r.transient for r in (*pair, *(again or ()))),   # a rerun asks again
                 "lengths": {"ours": len(ours), "opponent": len(theirs), "unit": LENGTH_UNIT},
                 "judge_prompt_hashes": [first.prompt_hash, swapped.prompt_hash],
                 "judge_model": self.judge.model, "judge_digest": digest, "battle": battle}
        if again is not None:
            extra["outcome_second"] = combine(parse_verdict(again[0].raw), parse_verdict(again[1].raw)).outcome
        win = None if v.outcome is None else {"win": 1.0, "tie": 0.5, "loss": 0.0}[v.outcome]
        return Record(sample_id=s.id, prompt_hash=text_hash(prompt, first.prompt_hash, swapped.prompt_hash),
                      prediction=ours, target=theirs, scores={"win": win}, extra=extra)

    def metrics(self, records: list[Record]) -> dict[str, Metric]:
        self.judge_keys.check(records)
        verdicts = [combine(*(r.extra.get("verdicts") or [None, None])) for r in records]
        s = summarise(verdicts, seed=self.seed)
        n, unscored = s.n_pairs - s.unscored, s.unscored
        nan = float("nan")

        def rate(r) -> Metric:
            return Metric(nan if r.rate is None else r.rate, None, r.n, unscored)

        out = {"win_rate": mean_metric([r.scores.get("win") for r in records])}
        low, high = s.win_rate_adjusted_ci or (nan, nan)
        out["win_rate_ci95_low"] = Metric(low, None, n, unscored)
        out["win_rate_ci95_high"] = Metric(high, None, n, unscored)
        out.update(win=rate(s.win), tie=rate(s.tie), loss=rate(s.loss), swap_consistency=rate(s.swap_consistency))
        diffs = [(r.extra.get("lengths") or {}).get("ours", 0) - (r.extra.get("lengths") or {}).get("opponent", 0)
                 for r in records]
        lc = length_controlled(verdicts, diffs)
        out["lc_win_rate"] = Metric(nan if lc.lc_win_rate is None else lc.lc_win_rate, None, lc.n, unscored)
        agree = None
        if any("outcome_second" in r.extra for r in records):
            value, k = agreement([v.outcome for v in verdicts], [r.extra.get("outcome_second") for r in records])
            out["judge_agreement"] = Metric(value, None, k, len(records) - k)
            agree = None if math.isnan(value) else value
        self.judge_reliability = {} if not records else {   # leaderboard columns (harness.evaluate)
            "judge_unscored_rate": unscored / len(records),
            "judge_swap_consistency": s.swap_consistency.rate, "judge_agreement": agree}
        if (failed := sum(bool(r.extra.get("retry")) for r in records)) and len(records) > failed:
            log.warning("%d of %d samples are unscored because the judge failed; rerun the same "
                        "hydra.run.dir to retry them", failed, len(records))
        return out

    def unscored_reason(self, records: list[Record]) -> str | None:
        """One line saying why no sample got a verdict, or None when one did; judge failures (retry on
        a rerun) and replies without a verdict (final) are told apart."""
        if any(r.scores.get("win") is not None for r in records):
            return None
        if not records:
            return "there were no samples to judge (task.limit=0)"
        parts = []
        for retry, what in ((True, f"the judge at {self.judge.where} failed for"),
                            (False, f"judge.model={self.judge.model} gave no readable verdict for")):
            counts = Counter(r.extra.get("error") or "no reason recorded" for r in records
                             if bool(r.extra.get("retry")) == retry)
            if counts:
                top = ", ".join(f"{e} ({k})" for e, k in counts.most_common(3))
                fix = ("rerun the same hydra.run.dir to retry them" if retry else
                       "final; the replies are in records.jsonl, extra.judge_replies: try another judge.model "
                       "or a larger task.judge_max_tokens in a new hydra.run.dir")
                parts.append(f"{what} {sum(counts.values())} of {len(records)} samples: {top}; {fix}")
        return "no sample was scored: " + "; ".join(parts)
