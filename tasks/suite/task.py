"""HellaSwag, Winogrande, TruthfulQA MC1/MC2, PIQA and BoolQ as lm-eval 0.4 renders and scores them.

One class for all six: the benchmark's renderer (tasks/suite/benchmarks.py) turns each HF row into
lm-eval's text, choices and gold; the prompt is lm-eval's plain-text fewshot_context (each shot as
text + " " + gold answer + "\\n\\n", then the text), or those turns through the model's chat
template (`apply_chat_template`, tasks/chat.py); each choice is scored as " <choice>" by
loglikelihood in one call for all samples (tasks/multiple_choice.py). Metrics as lm-eval reports
them: acc (argmax, first on ties), acc_norm (loglikelihood per character of the choice), and for
TruthfulQA MC2 `acc` = the normalised probability mass on the true answers (process_results_mc2).

Few-shot shots are drawn the way lm-eval's default sampler draws them, so an N-shot prompt here is
the prompt lm-eval builds for the same document: one `random.Random(fewshot_seed)` (lm-eval's
default 1234) for the whole task, and for each evaluated document in order `sample(pool, N + 1)`
with the document itself removed, the first N kept. The pool is the training split, else the
validation split (TruthfulQA), as lm-eval's `fewshot_docs` picks.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from models.protocol import LM
from tasks.base import (
    Metric,
    Record,
    Sample,
    TaskError,
    check_fewshot,
    check_limit,
    text_hash,
)
from tasks.chat import ChatFormat, as_text, common_prefix, qa_turns
from tasks.fewshot import sample_shots
from tasks.multiple_choice import mean_metric, score_choices
from tasks.suite.benchmarks import RENDERERS, Doc
from tasks.suite.hf_data import load_split

TEMPLATE_VERSION = "suite/lm-eval-0.4/v1"


def lm_eval_shots(pool: Sequence[dict], docs: Sequence[dict], n: int, seed: int) -> list[list[dict]]:
    """lm-eval's ContextSampler.sample(n, eval_doc=doc) for each doc in order, one generator (a
    0-shot task never draws from it)."""
    rnd = random.Random(seed)
    return [sample_shots(list(pool), n, doc, "random", rnd) if n else [] for doc in docs]


def render(docs_shots: Sequence[Doc], doc: Doc, chat: ChatFormat = ChatFormat()) -> dict[str, Any]:
    """A sample's prompt fields, as lm-eval's fewshot_context and construct_requests make them for a
    multiple_choice task (target delimiter " ", none under a chat template; fewshot delimiter
    "\\n\\n"): `context` and `continuations`, per-choice `contexts` for a multiple-input task
    (Winogrande: each choice is a context, the shared target the continuation; `context` is then
    their common beginning), and the chat messages when a chat template applies."""
    shots = [(s.choices[s.gold], s.target) if s.multiple_input else (s.text, s.choices[s.gold]) for s in docs_shots]
    if doc.multiple_input:
        per_choice = [qa_turns("", shots, choice) for choice in doc.choices]
        contexts = [as_text(turns) for turns in per_choice]
        data = {"context": common_prefix(contexts), "contexts": contexts,
                "continuations": [chat.answer_delimiter + doc.target] * len(contexts)}
        chat_data = {"format": chat.version, "per_choice": [chat.messages(turns) for turns in per_choice]}
    else:
        turns = qa_turns("", shots, doc.text)
        data = {"context": as_text(turns), "continuations": [chat.answer_delimiter + c for c in doc.choices]}
        chat_data = chat.sample_field(turns)
    if chat.apply:
        data["chat"] = chat_data
    return data


class SuiteTask:
    """task=hellaswag | winogrande | truthfulqa_mc1 | truthfulqa_mc2 | piqa | boolq (conf/task/)."""

    def __init__(self, name: str, benchmark: str, dataset: dict[str, Any], local_folder: str,
                 eval_split: str, fewshot_split: str, metrics: Sequence[str] = ("acc",),
                 num_fewshot: int = 0, fewshot_seed: int = 1234, limit: int | None = None,
                 id_field: str | None = None, apply_chat_template: bool = False,
                 fewshot_as_multiturn: bool | None = None):
        if benchmark not in RENDERERS:
            raise TaskError(f"unknown suite benchmark {benchmark!r}; choose one of {sorted(RENDERERS)}")
        self.name, self.benchmark, self.split = name, benchmark, eval_split
        self.num_fewshot, self.limit = check_fewshot(num_fewshot), check_limit(limit)
        self.fewshot_seed, self.id_field, self.metric_names = int(fewshot_seed), id_field, list(metrics)
        self.chat = ChatFormat.from_options(apply_chat_template, fewshot_as_multiturn)
        source = (local_folder, dataset["repo"], dataset.get("name"), dataset.get("revision"))
        self.rows, provenance = load_split(*source, eval_split)
        self.pool: list[dict] = []
        if self.num_fewshot:
            self.pool, pool_provenance = load_split(*source, fewshot_split)
            if len(self.pool) <= self.num_fewshot:
                raise TaskError(f"{name}: the {fewshot_split} split has {len(self.pool)} rows, too few for "
                                f"task.num_fewshot={self.num_fewshot}")
            provenance += f"|{fewshot_split}:{pool_provenance}|seed={self.fewshot_seed}"
        self.version = text_hash(TEMPLATE_VERSION, benchmark, str(self.num_fewshot), provenance,
                                 *self.chat.version_parts)

    def _doc(self, row: dict, where: str) -> Doc:
        try:
            return RENDERERS[self.benchmark](row)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise TaskError(f"{self.name}: {where} does not have the HF schema ({type(e).__name__}: {e})") from None

    def samples(self) -> list[Sample]:
        rows = self.rows[: self.limit]
        shot_rows = lm_eval_shots(self.pool, rows, self.num_fewshot, self.fewshot_seed)
        out = []
        for i, (row, shots) in enumerate(zip(rows, shot_rows)):
            doc = self._doc(row, f"{self.split} row {i + 1}")
            data = render([self._doc(s, "a few-shot row") for s in shots], doc, self.chat)
            sample_id = str(row[self.id_field]) if self.id_field else f"{i:05d}-{text_hash(*data['continuations'])[:8]}"
            data.update(gold=doc.gold, labels=[str(k) for k in range(len(data["continuations"]))],
                        # acc_norm divides by the choice's character length, lm-eval's `len(choice)`
                        norm_lengths=[len(c) for c in doc.choices] if "acc_norm" in self.metric_names else None,
                        extra={})
            if doc.true_mask is not None:
                data["true_mask"] = list(doc.true_mask)
            out.append(Sample(sample_id, data))
        if len({s.id for s in out}) != len(out):
            raise TaskError(f"{self.name}: {self.id_field} repeats within the {self.split} split; set id_field: null")
        return out

    def score(self, lm: LM, samples: list[Sample]) -> list[Record]:
        records = score_choices(lm, samples)
        for sample, record in zip(samples, records):
            mask = sample.data.get("true_mask")
            if mask is not None:
                record.scores = {"acc": mc2_true_mass(record.extra["loglikelihoods"], mask)}
        return records

    def metrics(self, records: list[Record]) -> dict[str, Metric]:
        return {k: mean_metric([r.scores.get(k) for r in records]) for k in self.metric_names}


def mc2_true_mass(loglikelihoods: Sequence[float], true_mask: Sequence[bool]) -> float | None:
    """lm-eval's process_results_mc2: exp of each loglikelihood, normalised over all choices, summed
    over the true ones (computed as lm-eval does, without a max shift, so the float is the same).
    Every probability underflowing to 0 gives lm-eval a NaN; here the sample counts as unscored."""
    probs = [math.exp(ll) for ll in loglikelihoods]
    total = sum(probs)
    return sum(p for p, true in zip(probs, true_mask) if true) / total if total > 0 else None
