"""Answer extraction and generative metrics, as lm-evaluation-harness 0.4 defines them.

A generative task (tasks/generative.py) turns each sample's generations (one per repeat) into an
answer through one or more named filter chains, then scores every chain's answer with every metric.
The YAML spelling is lm-eval's own, so a `filter_list` / `metric_list` copied from one of its task
files means the same thing here:

  filter_list:
    - name: strict-match
      filter:
        - function: regex            # findall; group_select picks the match (-1: the last one);
          regex_pattern: "#### (\\-?[0-9\\.\\,]+)"   # a tuple of groups gives its first non-empty one,
          group_select: 0            # stripped; no match gives `fallback` ("[invalid]")
        - function: take_first       # the first repeat's answer
  metric_list:
    - metric: exact_match            # exact_match | f1 (SQuAD token F1) | contains
      ignore_case: true
      regexes_to_ignore: [","]

Filters map a list of strings (the repeats) to a list, except take_first, which picks one; a chain
that ends on a list is scored on its first element, as take_first would.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from tasks.base import TaskError

FALLBACK = "[invalid]"
Answers = list[str] | str
Step = Callable[[list[str]], Answers]


def regex_filter(regex_pattern: str, group_select: int = 0, fallback: str = FALLBACK) -> Step:
    """lm-eval's `regex` filter (filters/extraction.py RegexFilter)."""
    try:
        pattern = re.compile(regex_pattern)
    except re.error as e:
        raise TaskError(f"regex filter: bad regex_pattern {regex_pattern!r} ({e})") from None
    group_select = int(group_select)

    def extract(text: str) -> str:
        found = pattern.findall(text if isinstance(text, str) else "")
        if not found:
            return fallback
        match = found[group_select]
        if isinstance(match, tuple):
            match = next((m for m in match if m), fallback)
        return match.strip()
    return lambda answers: [extract(a) for a in answers]


def regex_replace(text: str, pattern: str, repl: str, count: int = 0) -> str:
    """lm-eval's `regex_replace` Jinja filter (re.sub), for templates."""
    return re.sub(pattern, repl, text, count=count)


def majority_vote(answers: list[str]) -> list[str]:
    """The commonest answer (the first seen among equals, as Counter.most_common)."""
    return [Counter(answers).most_common(1)[0][0]]


FILTERS: dict[str, Callable[..., Step]] = {
    "regex": regex_filter,
    "take_first": lambda: lambda answers: answers[0],
    "majority_vote": lambda: majority_vote,
    "remove_whitespace": lambda: lambda answers: [a.strip() for a in answers],
    "strip": lambda: lambda answers: [a.strip() for a in answers],
    "lowercase": lambda: lambda answers: [a.lower() for a in answers],
    "uppercase": lambda: lambda answers: [a.upper() for a in answers],
}


class FilterChain:
    """One named chain: its steps in order, applied to one sample's generations."""

    def __init__(self, name: str, steps: Sequence[dict]):
        self.name, self.steps = name, []
        for spec in steps:
            spec = dict(spec)
            function = spec.pop("function", None)
            if function not in FILTERS:
                raise TaskError(f"filter chain {name!r}: unknown function {function!r}; "
                                f"choose from {', '.join(sorted(FILTERS))}")
            try:
                self.steps.append(FILTERS[function](**spec))
            except TypeError as e:
                raise TaskError(f"filter chain {name!r}: {function}: {e}") from None

    def __call__(self, generations: list[str]) -> str:
        answers: Answers = list(generations)
        for step in self.steps:
            if isinstance(answers, str):          # past take_first: a single answer stays single
                answers = [answers]
            answers = step(answers)
        return answers if isinstance(answers, str) else answers[0]


def build_filters(filter_list: Sequence[dict] | None) -> list[FilterChain]:
    """The configured chains; none configured is lm-eval's default: one `none` chain, take_first."""
    if not filter_list:
        return [FilterChain("none", [{"function": "take_first"}])]
    chains = [FilterChain(str(f["name"]), f.get("filter") or []) for f in filter_list]
    names = [c.name for c in chains]
    if len(set(names)) != len(names):
        raise TaskError(f"filter_list names repeat: {names}")
    return chains


# --- metrics: one prediction against one gold answer -> 0..1 ------------------------------------------

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_DIGITS = str.maketrans("", "", string.digits)


def normalise(text: str, *, regexes_to_ignore: Sequence[str] | None = None, ignore_case: bool = False,
              ignore_punctuation: bool = False, ignore_numbers: bool = False) -> str:
    """lm-eval's exact_match preprocessing, in its order: regexes removed (each in turn), then case,
    ASCII punctuation and digits."""
    for pattern in regexes_to_ignore or ():
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(_PUNCTUATION)
    if ignore_numbers:
        text = text.translate(_DIGITS)
    return text


def exact_match(prediction: str, gold: str, **options: Any) -> float:
    """lm-eval's exact_match (api/metrics.py exact_match_hf_evaluate) for one pair."""
    return float(normalise(prediction, **options) == normalise(gold, **options))


def contains(prediction: str, gold: str, **options: Any) -> float:
    """1 when the (normalised) gold answer occurs anywhere in the (normalised) prediction."""
    return float(normalise(gold, **options) in normalise(prediction, **options))


def squad_normalise(text: str) -> str:
    """The SQuAD evaluation script's normalize_answer: lower case, no punctuation, no articles,
    single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between the normalised texts (1 when both are empty, as SQuAD v2 scores it)."""
    pred, ref = squad_normalise(prediction).split(), squad_normalise(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[..., float]] = {"exact_match": exact_match, "contains": contains, "f1": f1}
NORMALISE_OPTIONS = {"regexes_to_ignore", "ignore_case", "ignore_punctuation", "ignore_numbers"}
# lm-eval's bookkeeping keys in a metric_list entry; only the mean is aggregated here
IGNORED_KEYS = {"aggregation", "higher_is_better"}


class MetricSpec:
    """One `metric_list` entry: the function and its options."""

    def __init__(self, spec: dict):
        spec = dict(spec)
        self.name = spec.pop("metric", None)
        if self.name not in METRICS:
            raise TaskError(f"unknown metric {self.name!r}; choose from {', '.join(sorted(METRICS))}")
        if spec.get("aggregation", "mean") != "mean":
            raise TaskError(f"metric {self.name}: aggregation {spec['aggregation']!r}; only mean is supported")
        self.options = {k: v for k, v in spec.items() if k not in IGNORED_KEYS}
        allowed = NORMALISE_OPTIONS if self.name != "f1" else set()
        if unknown := set(self.options) - allowed:
            raise TaskError(f"metric {self.name}: unknown options {sorted(unknown)}"
                            f"{'; allowed: ' + ', '.join(sorted(allowed)) if allowed else ''}")

    def __call__(self, prediction: str, gold: str) -> float:
        return METRICS[self.name](prediction, gold, **self.options)


def build_metrics(metric_list: Sequence[dict] | None) -> list[MetricSpec]:
    """The configured metrics; none configured is lm-eval's generate_until default, exact_match."""
    return [MetricSpec(m) for m in (metric_list or [{"metric": "exact_match"}])]
