"""Any multiple-choice benchmark in CSV/JSONL, its fields mapped in a YAML config (lm-eval scoring).

A new benchmark is one config file: say where the question, the choices, their labels and the
answer live in each row (dotted field paths, `[]` maps over a list: ARC's `question.choices[].text`),
and pick a template:

  mmlu   lm-eval's MMLU prompt: the question, one "<label>. <choice>" line per choice, "Answer:";
         each choice is scored as the continuation " <label>" (letters, or the row's own labels).
  cloze  lm-eval's ARC prompt: "Question: <question>\\nAnswer:"; each choice's text is scored as
         the continuation " <text>", and acc_norm divides each loglikelihood by the text's length.

The prediction is the argmax (first on ties, like numpy). All requests of all samples go to the
model in ONE `loglikelihood` call so the adapter can batch, sort and share prompt prefixes.
"""
from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from models.protocol import LM
from models.download import sha256_file
from tasks.base import Metric, Record, Sample, TaskError, check_fewshot, check_limit, text_hash
from tasks.chat import ChatFormat, Turn, as_text, qa_turns, render_prompts
from tasks.data import local_path
from tasks.fewshot import SAMPLERS, sample_shots

TEMPLATE_VERSION = "multiple_choice/v1"
PLAIN = ChatFormat()
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Item:
    question: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]
    gold: int                              # index into choices
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


# --- templates: what is shown, and what each choice is scored as ---------------------------------

def lettered_prompt(item: Item) -> str:
    """lm-eval `mmlu` doc_to_text, generalised to any number of labelled choices."""
    lines = "".join(f"\n{label}. {choice}" for label, choice in zip(item.labels, item.choices))
    return f"{item.question.strip()}{lines}\nAnswer:"


def cloze_prompt(item: Item) -> str:
    """lm-eval `arc_easy` / `arc_challenge` doc_to_text."""
    return f"Question: {item.question}\nAnswer:"


TEMPLATES = {  # name -> (prompt, answer strings scored after a " " target delimiter)
    "mmlu": (lettered_prompt, lambda item: item.labels),
    "cloze": (cloze_prompt, lambda item: item.choices),
}


def context_turns(template: str, description: str, shots: Sequence[Item], item: Item) -> list[Turn]:
    """lm-eval's fewshot_context as turns: description, each shot's prompt and gold answer, the question."""
    prompt, answers = TEMPLATES[template]
    return qa_turns(description, [(prompt(s), answers(s)[s.gold]) for s in shots], prompt(item))


def build_context(template: str, description: str, shots: Sequence[Item], item: Item) -> str:
    """lm-eval's plain-text fewshot_context: description, then each shot as prompt + " " + its
    gold answer + "\\n\\n", then the question's prompt (no trailing space: it goes with the answer)."""
    return as_text(context_turns(template, description, shots, item))


def choice_sample(sample_id: str, template: str, description: str, shots: Sequence[Item],
                  item: Item, chat: ChatFormat = PLAIN, **extra: Any) -> Sample:
    answers = TEMPLATES[template][1](item)
    turns = context_turns(template, description, shots, item)
    data = {
        "context": as_text(turns),
        "continuations": [chat.answer_delimiter + a for a in answers],
        "labels": list(item.labels),
        "gold": item.gold,
        # acc_norm divides by the answer's character length (lm-eval); letters would make it == acc
        "norm_lengths": [len(a) for a in answers] if template == "cloze" else None,
        "extra": extra,
    }
    if chat.apply:   # rendered with the scored model's template in score_choices
        data["chat"] = chat.sample_field(turns)
    return Sample(sample_id, data)


def choice_requests(data: dict) -> list[tuple[str, str]]:
    """(context, continuation) per choice. Usually one context for all; a sample with `contexts`
    (Winogrande's partial evaluation: each option fills the blank) has one context per choice, and
    then `context` is only their shared beginning, shown by the viewer."""
    contexts = data.get("contexts") or [data["context"]] * len(data["continuations"])
    return list(zip(contexts, data["continuations"]))


def score_choices(lm: LM, samples: list[Sample]) -> list[Record]:
    samples = render_prompts(lm, samples, "context", scored_as_text=True)
    requests = [r for s in samples for r in choice_requests(s.data)]
    lls = lm.loglikelihood(requests) if requests else []
    records, at = [], 0
    for s in samples:
        d = s.data
        mine = [float(x) for x in lls[at: at + len(d["continuations"])]]
        at += len(mine)
        pred = first_argmax(mine)
        scores = {"acc": float(pred == d["gold"])}
        if d.get("norm_lengths"):
            scores["acc_norm"] = float(first_argmax([ll / n for ll, n in zip(mine, d["norm_lengths"])]) == d["gold"])
        pairs = choice_requests(d)
        hashed = [d["context"], *d["continuations"]] if "contexts" not in d else [p for pair in pairs for p in pair]
        records.append(Record(
            sample_id=s.id, prompt_hash=text_hash(*hashed),
            prediction=d["labels"][pred], target=d["labels"][d["gold"]], scores=scores,
            # prompt and choices: what the viewer (harness.view) shows; the sample's data stays in its id
            extra={**d.get("extra", {}), "loglikelihoods": mine, "prompt": d["context"],
                   "choices": [ctx[len(d["context"]):] + cont for ctx, cont in pairs]},
        ))
    return records


def first_argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mean_metric(values: Sequence[float | None]) -> Metric:
    """Mean with lm-eval's stderr (sample std / sqrt(n); for 0/1 scores sqrt(p(1-p)/(n-1)))."""
    scored = [v for v in values if v is not None]
    n = len(scored)
    if n == 0:
        return Metric(float("nan"), None, 0, len(values))
    mean = sum(scored) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in scored) / (n - 1) / n) if n > 1 else None
    return Metric(mean, stderr, n, len(values) - n)


# --- reading rows and mapping fields ------------------------------------------------------------

def get_field(obj: Any, path: str) -> Any:
    """Dotted path into nested dicts/lists; `name[]` maps the rest of the path over a list."""
    head, _, rest = path.partition(".")
    if head.endswith("[]"):
        return [get_field(x, rest) if rest else x for x in _step(obj, head[:-2])]
    value = _step(obj, head)
    return get_field(value, rest) if rest else value


def _step(obj: Any, key: str) -> Any:
    if isinstance(obj, (list, tuple)):
        return obj[int(key)]
    return obj[key]


def read_rows(path, fmt: str, columns: Sequence[str] | None = None) -> list[tuple[int, Any]]:
    """(line number, row) pairs from a JSONL, JSON array or CSV file (header row unless
    `columns` names the columns). Malformed input -> TaskError naming file and line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if fmt == "jsonl":
                rows = []
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append((lineno, json.loads(line)))
                        except json.JSONDecodeError as e:
                            raise TaskError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                return rows
            if fmt == "json":
                return list(enumerate(json.load(f), 1))
            if fmt == "csv":
                reader = csv.reader(f)
                names = list(columns) if columns else next(reader, [])
                rows = []
                for row in reader:
                    if len(row) != len(names):
                        raise TaskError(f"{path}:{reader.line_num}: {len(row)} fields, expected {len(names)}")
                    rows.append((reader.line_num, dict(zip(names, row))))
                return rows
    except (UnicodeDecodeError, csv.Error, json.JSONDecodeError) as e:
        raise TaskError(f"{path}: cannot parse as {fmt} ({e})") from None
    raise TaskError(f"unknown format {fmt!r} for {path}; use jsonl, json or csv")


class MultipleChoiceTask:
    def __init__(self, name: str, path: str, format: str = "jsonl", question: str = "question",
                 choices: str | Sequence[str] = "choices", answer: str = "answer",
                 answer_type: str = "label", labels: str | None = None, description: str = "",
                 fewshot_path: str | None = None, num_fewshot: int = 0, limit: int | None = None,
                 template: str = "mmlu", id_field: str | None = None,
                 columns: Sequence[str] | None = None, fewshot_sampler: str = "first_n",
                 fewshot_seed: int = 1234, apply_chat_template: bool = False,
                 fewshot_as_multiturn: bool | None = None):
        if template not in TEMPLATES:
            raise TaskError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
        if answer_type not in ("label", "index", "text"):
            raise TaskError(f"answer_type must be label, index or text, not {answer_type!r}")
        self.name, self.num_fewshot, self.limit = name, check_fewshot(num_fewshot), check_limit(limit)
        self.template, self.description = template, description
        if fewshot_sampler not in SAMPLERS:
            raise TaskError(f"fewshot_sampler must be one of {', '.join(SAMPLERS)}, not {fewshot_sampler!r}")
        self.sampler, self.fewshot_seed = fewshot_sampler, int(fewshot_seed)
        self.chat = ChatFormat.from_options(apply_chat_template, fewshot_as_multiturn)
        self.fields = dict(question=question, choices=choices if isinstance(choices, str) else list(choices),
                           answer=answer, answer_type=answer_type, labels=labels, id_field=id_field)
        self.format, self.columns = format, list(columns) if columns else None
        self.path = local_path(path)
        self.fewshot_path = local_path(fewshot_path) if fewshot_path and self.num_fewshot else None
        if self.num_fewshot and self.fewshot_path is None:
            raise TaskError(f"{name}: num_fewshot={self.num_fewshot} needs a fewshot_path")
        data_hashes = [sha256_file(self.path)]
        if self.num_fewshot:
            data_hashes.append(sha256_file(self.fewshot_path))
        # parts that are new since v1 join only when set, so v1 versions (and resumes) stay valid
        drawn = f"sampler=random:{self.fewshot_seed}" if self.num_fewshot and self.sampler == "random" else ""
        self.version = text_hash(TEMPLATE_VERSION, template, description, str(self.num_fewshot),
                                 json.dumps(self.fields, sort_keys=True), *data_hashes,
                                 *([drawn] if drawn else []), *self.chat.version_parts)

    def items(self, path) -> list[Item]:
        out = []
        for lineno, row in read_rows(path, self.format, self.columns):
            try:
                item = self.to_item(row)
            except TaskError as e:
                raise TaskError(f"{path}:{lineno}: {e}") from None
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise TaskError(f"{path}:{lineno}: cannot map row ({type(e).__name__}: {e})") from None
            item.meta["line"] = lineno
            out.append(item)
        return out

    def to_item(self, row: Any) -> Item:
        f = self.fields
        choices = get_field(row, f["choices"]) if isinstance(f["choices"], str) \
            else [get_field(row, c) for c in f["choices"]]
        choices = tuple(str(c) for c in choices)
        labels = tuple(str(x).strip() for x in get_field(row, f["labels"])) if f["labels"] \
            else tuple(LETTERS[: len(choices)])
        if len(labels) != len(choices) or len(choices) < 2:
            raise TaskError(f"{len(choices)} choices but {len(labels)} labels (at least 2 choices, one label each)")
        answer = get_field(row, f["answer"])
        kind = f["answer_type"]
        if kind == "label" and str(answer).strip() not in labels:   # ARC: answerKey is "B" or "2"
            raise TaskError(f"answer {answer!r} ({f['answer']}) is not one of the row's labels {', '.join(labels)}")
        if kind == "text" and str(answer) not in choices:
            raise TaskError(f"answer {answer!r} ({f['answer']}) is not the text of any of the row's choices")
        gold = {"label": lambda: labels.index(str(answer).strip()),
                "index": lambda: int(answer),
                "text": lambda: choices.index(str(answer))}[kind]()
        if not 0 <= gold < len(choices):
            raise TaskError(f"answer index {gold} ({f['answer']}) is out of range for {len(choices)} choices")
        row_id = str(get_field(row, f["id_field"])) if f["id_field"] else None
        return Item(str(get_field(row, f["question"])), choices, labels, gold, {"row_id": row_id})

    def samples(self) -> list[Sample]:
        items = self.items(self.path)[: self.limit]
        pool = self.items(self.fewshot_path) if self.num_fewshot else []
        same_file = self.fewshot_path == self.path
        rng = random.Random(self.fewshot_seed)   # lm-eval's: one generator for all documents in order
        out = []
        for i, item in enumerate(items):
            # lm-eval's samplers; the question itself is never its own shot
            try:
                shots = sample_shots(pool, self.num_fewshot, item if same_file else None, self.sampler, rng) \
                    if self.num_fewshot else []
            except TaskError:
                raise TaskError(f"{self.fewshot_path} has fewer than {self.num_fewshot} few-shot rows") from None
            sample_id = item.meta["row_id"] or f"{i:05d}-{text_hash(item.question)[:8]}"
            out.append(choice_sample(sample_id, self.template, self.description, shots, item, self.chat))
        self._check_unique_ids(out, items)
        return out

    def _check_unique_ids(self, samples: list[Sample], items: list[Item]) -> None:
        """Sample ids are the resume key: two rows with one id would share one record."""
        first: dict[str, int] = {}
        for s, item in zip(samples, items):
            if s.id in first:
                raise TaskError(f"{self.path}:{item.meta['line']}: id {s.id!r} ({self.fields['id_field']}) "
                                f"repeats the row on line {first[s.id]}; ids must be unique (or set id_field: null)")
            first[s.id] = item.meta["line"]

    def score(self, lm: LM, samples: list[Sample]) -> list[Record]:
        return score_choices(lm, samples)

    def metrics(self, records: list[Record]) -> dict[str, Metric]:
        keys = ["acc", "acc_norm"] if self.template == "cloze" else ["acc"]
        return {k: mean_metric([r.scores.get(k) for r in records]) for k in keys}
