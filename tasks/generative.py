"""Generate-then-check tasks: any benchmark scored from the model's own text, one YAML each.

The fields are lm-evaluation-harness 0.4's `generate_until` task fields, so its task files carry
over (conf/task/gsm8k.yaml is its `gsm8k`):

  _target_: tasks.generative.GenerativeTask
  name: my_qa
  path: my_qa/test.jsonl              # relative to $HARNESS_DATA (or absolute); jsonl | json | csv
  doc_to_text: "Question: {{question}}\\nAnswer:"   # Jinja2 (sandboxed) over the row's fields,
  doc_to_target: "{{answer}}"         # or just a field name
  num_fewshot: 2
  fewshot_path: my_qa/train.jsonl     # or fewshot_samples: [{...}, ...] inline
  fewshot_sampler: first_n            # first_n | random (lm-eval's default, seeded with fewshot_seed)
  generation_kwargs: {until: ["\\n\\n"], max_gen_toks: 32, do_sample: false}
  filter_list: [...]                  # tasks/filters.py
  metric_list: [{metric: exact_match, ignore_case: true}]

The prompt is lm-eval's plain-text fewshot_context: description, then per shot text + target_delimiter
+ target + fewshot_delimiter, then the question's text; with `apply_chat_template: true` the same
turns go through the model's chat template (tasks/chat.py). The random sampler replays lm-eval's: ONE
random.Random(fewshot_seed) drawn from for every document in file order, so document k gets the
shots lm-eval gives it. Records keep the prompt, every generation (repeats) and every chain's
answer; scores are "<metric>/<filter>" per sample.
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from harness.cli import UserError, int_option
from models.download import sha256_file
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
from tasks.chat import ChatFormat, Turn, as_text, qa_turns, render_prompts
from tasks.data import local_path
from tasks.fewshot import SAMPLERS, sample_shots
from tasks.filters import build_filters, build_metrics, regex_replace
from tasks.multiple_choice import mean_metric, read_rows

TEMPLATE_VERSION = "generative/v1"
GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature"}

log = logging.getLogger(__name__)

# lm-eval's template environment (utils.py), sandboxed: a template may call str methods, not Python
_JINJA = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_JINJA.filters["regex_replace"] = regex_replace


def render(template: str, row: dict) -> str:
    """lm-eval's doc_to_text/doc_to_target: a field's value when `template` names a field, else the
    rendered Jinja2 template."""
    if template in row:
        return str(row[template])
    try:
        return _JINJA.from_string(template).render(**row)
    except TemplateError as e:
        raise TaskError(f"template {template!r}: {type(e).__name__}: {e}") from None


def plain(value: Any) -> Any:
    """Hydra's DictConfig/ListConfig (or any mapping and sequence) as plain dicts and lists, so the
    config hashes into `version` and compares as data."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


class GenerativeTask:
    def __init__(self, name: str, path: str, doc_to_text: str, doc_to_target: str,
                 format: str = "jsonl", columns: Sequence[str] | None = None, id_field: str | None = None,
                 description: str = "", target_delimiter: str = " ", fewshot_delimiter: str = "\n\n",
                 num_fewshot: int = 0, fewshot_path: str | None = None,
                 fewshot_samples: Sequence[dict] | None = None, fewshot_sampler: str = "random",
                 fewshot_seed: int = 1234, generation_kwargs: dict | None = None, repeats: int = 1,
                 filter_list: Sequence[dict] | None = None, metric_list: Sequence[dict] | None = None,
                 limit: int | None = None, apply_chat_template: bool = False,
                 fewshot_as_multiturn: bool | None = None):
        if fewshot_sampler not in SAMPLERS:
            raise TaskError(f"fewshot_sampler must be one of {', '.join(SAMPLERS)}, not {fewshot_sampler!r}")
        self.name, self.limit = name, check_limit(limit)
        self.num_fewshot = check_fewshot(num_fewshot)
        self.repeats = int_option(repeats, "task.repeats", minimum=1)
        self.format, self.columns, self.id_field = format, list(columns) if columns else None, id_field
        self.templates = {"doc_to_text": doc_to_text, "doc_to_target": doc_to_target, "description": description,
                          "target_delimiter": target_delimiter, "fewshot_delimiter": fewshot_delimiter}
        self.sampler, self.fewshot_seed = fewshot_sampler, int(fewshot_seed)
        self.chat = ChatFormat.from_options(apply_chat_template, fewshot_as_multiturn)
        self.generation = self._generation(plain(generation_kwargs or {}))
        self.filter_list, self.metric_list = plain(filter_list or []), plain(metric_list or [])
        self.filters, self.metrics_ = build_filters(self.filter_list), build_metrics(self.metric_list)
        self.path = local_path(path)
        data_hashes = [sha256_file(self.path)]
        self.fewshot_path = local_path(fewshot_path) if fewshot_path and self.num_fewshot else None
        self.fewshot_samples = plain(fewshot_samples or [])
        if self.num_fewshot and not (self.fewshot_path or self.fewshot_samples):
            raise TaskError(f"{name}: num_fewshot={self.num_fewshot} needs fewshot_path or fewshot_samples")
        if self.fewshot_path:
            data_hashes.append(sha256_file(self.fewshot_path))
        setup = dict(self.templates, num_fewshot=self.num_fewshot, sampler=self.sampler,
                     seed=self.fewshot_seed, shots=self.fewshot_samples if self.num_fewshot else [],
                     generation=self.generation, repeats=self.repeats, filters=self.filter_list,
                     metrics=self.metric_list, fields=[format, self.columns, id_field])
        self.version = text_hash(TEMPLATE_VERSION, json.dumps(setup, sort_keys=True, default=str), *data_hashes,
                                 *self.chat.version_parts)

    def _generation(self, kwargs: dict) -> dict:
        """until / max_gen_toks / temperature, with lm-eval's defaults (256 tokens, greedy unless
        do_sample; sampling at temperature 1.0 unless one is given)."""
        if unknown := set(kwargs) - GENERATION_KEYS:
            raise TaskError(f"{self.name}: generation_kwargs {sorted(unknown)} are not supported; "
                            f"use {', '.join(sorted(GENERATION_KEYS))}")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [str(u) for u in until]
        do_sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 1.0 if do_sample else 0.0)) if do_sample else 0.0
        if do_sample and temperature <= 0:
            raise TaskError(f"{self.name}: do_sample needs a temperature > 0")
        max_gen_toks = int_option(kwargs.get("max_gen_toks", 256), "generation_kwargs.max_gen_toks", minimum=1)
        return {"until": until, "max_gen_toks": max_gen_toks, "temperature": temperature}

    # -- samples -----------------------------------------------------------------------------------
    def rows(self, path) -> list[tuple[int, dict]]:
        rows = read_rows(path, self.format, self.columns)
        for lineno, row in rows:
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{lineno}: a row must be an object with named fields")
        return rows

    def _render(self, key: str, row: dict, where: str) -> str:
        try:
            return render(self.templates[key], row)
        except TaskError as e:
            raise TaskError(f"{where}: {key}: {e}") from None

    def turns(self, row: dict, shots: Sequence[dict], where: str) -> list[Turn]:
        """lm-eval's fewshot_context as turns (tasks/chat.py); joined, the plain-text prompt."""
        t = self.templates
        description = render(t["description"], row) if t["description"] else ""
        pairs = [(self._render("doc_to_text", shot, f"{where}: a shot"),
                  self._render("doc_to_target", shot, f"{where}: a shot")) for shot in shots]
        return qa_turns(description, pairs, self._render("doc_to_text", row, where),
                        t["target_delimiter"], t["fewshot_delimiter"])

    def samples(self) -> list[Sample]:
        rows = self.rows(self.path)[: self.limit]
        pool: list[dict] = []
        if self.num_fewshot:
            pool = [r for _, r in self.rows(self.fewshot_path)] if self.fewshot_path else self.fewshot_samples
        same_file = self.fewshot_path == self.path
        rng = random.Random(self.fewshot_seed)
        out, first_line = [], {}
        for i, (lineno, row) in enumerate(rows):
            where = f"{self.path}:{lineno}"
            shots = sample_shots(pool, self.num_fewshot, row if same_file else None, self.sampler, rng) \
                if self.num_fewshot else []
            turns = self.turns(row, shots, where)
            prompt = as_text(turns)
            target = self._render("doc_to_target", row, where)
            sample_id = str(row[self.id_field]) if self.id_field else f"{i:05d}-{text_hash(prompt)[:8]}"
            if sample_id in first_line:
                raise TaskError(f"{where}: id {sample_id!r} ({self.id_field}) repeats the row on line "
                                f"{first_line[sample_id]}; ids must be unique (or set id_field: null)")
            first_line[sample_id] = lineno
            data = {"prompt": prompt, "target": target}
            if self.chat.apply:   # rendered with the scored model's template in score()
                data["chat"] = self.chat.sample_field(turns)
            out.append(Sample(sample_id, data))
        return out

    # -- scoring -----------------------------------------------------------------------------------
    def generate(self, lm: LM, prompts: list[str]) -> list[list[str] | Exception]:
        """`repeats` generations per prompt in one call (the backend batches them). When that call
        fails, each prompt is tried alone, so one bad sample costs only its own score. Sampling is
        seeded with fewshot_seed (lm-eval's seeds are all 1234 too), so a rerun samples the same."""
        g = self.generation

        def call(batch: list[str]) -> list[str]:
            flat = [p for p in batch for _ in range(self.repeats)]
            texts = lm.generate(flat, max_new_tokens=g["max_gen_toks"], stop=g["until"],
                                temperature=g["temperature"], seed=self.fewshot_seed)
            return [list(texts[k * self.repeats:(k + 1) * self.repeats]) for k in range(len(batch))]
        try:
            return call(prompts)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  (a backend's own failure: retried per sample below)
            if len(prompts) == 1:
                return [e]
            log.warning("%s: generation failed for a batch of %d (%s); trying each alone",
                        self.name, len(prompts), e)
        return [self.generate(lm, [p])[0] for p in prompts]

    def score_keys(self) -> list[str]:
        return [f"{m.name}/{c.name}" for c in self.filters for m in self.metrics_]

    def score(self, lm: LM, samples: list[Sample]) -> list[Record]:
        if not samples:
            return []
        samples = render_prompts(lm, samples, "prompt")
        results = self.generate(lm, [s.data["prompt"] for s in samples])
        records = []
        for s, result in zip(samples, results):
            prompt, gold = s.data["prompt"], s.data["target"]
            extra: dict[str, Any] = {**s.data.get("extra", {}), "prompt": prompt}
            if isinstance(result, Exception):
                extra.update(error=f"{type(result).__name__}: {result}", retry=True)
                records.append(Record(s.id, text_hash(prompt), None, gold,
                                      dict.fromkeys(self.score_keys()), extra))
                continue
            filtered = {c.name: c(result) for c in self.filters}
            scores = {f"{m.name}/{c.name}": m(filtered[c.name], gold) for c in self.filters for m in self.metrics_}
            extra.update(generations=result, filtered=filtered)
            records.append(Record(s.id, text_hash(prompt), filtered[self.filters[0].name], gold, scores, extra))
        return records

    def metrics(self, records: list[Record]) -> dict[str, Metric]:
        return {k: mean_metric([r.scores.get(k) for r in records]) for k in self.score_keys()}

    def unscored_reason(self, records: list[Record]) -> str | None:
        """The line the engine prints instead of NaN rows when no sample got a score."""
        failed = [r for r in records if r.extra.get("error")]
        if not failed or len(failed) < len(records):
            return None
        return (f"no sample was scored: generation failed for all {len(records)} samples "
                f"(first: {failed[0].extra['error']}); rerun the same hydra.run.dir to retry them")
