"""SMS spam classification (the book's ch06): the held-out split of the SMS Spam Collection.

The split is defined here once and shared with the trainer (`harness/train/classify.py`):
deduplicate identical lines, undersample ham to the spam count, shuffle with a fixed seed and cut
70/10/20 into train/val/test. `split_signature` names all of that plus the data file's sha256 and
goes into the task version and the checkpoint's provenance, so a score is only ever compared with
scores on the same messages.

Any model gets a row:
- a classifier checkpoint (`lm.labels` == ham/spam) answers through its class head, `lm.classify`,
  reading the raw message exactly as the trainer fed it;
- a plain language model is asked zero/few-shot: a short instruction, optional labelled examples
  drawn from the train split, then "Message: <text>\\nLabel:", and the continuations " ham" and
  " spam" are scored by log-likelihood (one call for all samples); the prediction is the argmax.

Metrics (spam is the positive class, scikit-learn): acc, precision, recall, f1, and the confusion
counts tp/fp/tn/fn; each record carries its confusion cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from models.protocol import LM, classifier_labels
from models.download import sha256_file
from tasks.base import Metric, Record, Sample, TaskError, check_fewshot, check_limit, text_hash
from tasks.data import local_path, sms_spam_file

LABELS = ("ham", "spam")          # class order of every classifier head this project trains
TEMPLATE_VERSION = "sms_spam/v1"
SPLIT_VERSION = "sms_spam/split/v1"
INSTRUCTION = "Classify each SMS message as ham (a normal message) or spam.\n\n"

Example = tuple[str, str]         # (text, label)


def load_sms_spam(path: str | Path) -> list[Example]:
    """(text, label) per line of a `label<TAB>text` file; strict: any other label is a TaskError."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise TaskError(f"{path}: cannot read ({e.strerror or e})") from None
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()                                   # the final newline
    out = []
    for lineno, line in enumerate(lines, 1):
        label, tab, text = line.rstrip("\r").partition("\t")
        if not tab:
            raise TaskError(f"{path}:{lineno}: expected 'ham<TAB>text' or 'spam<TAB>text', got {line[:40]!r}")
        if label not in LABELS:
            raise TaskError(f"{path}:{lineno}: unknown label {label[:40]!r} (expected ham or spam)")
        out.append((text, label))
    if not out:
        raise TaskError(f"{path}: no messages")
    return out


@dataclass(frozen=True)
class SpamSplit:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    signature: str                 # seed, fractions, flags and data sha256: equal signature, equal split

    def part(self, name: str) -> list[Example]:
        if name not in ("train", "val", "test"):
            raise TaskError(f"sms_spam split must be train, val or test, not {name!r}")
        return getattr(self, name)


def spam_split(seed: int = 123, dedupe: bool = True, balance: bool = True,
               fractions: Sequence[float] = (0.7, 0.1, 0.2), path: str | Path | None = None) -> SpamSplit:
    """Deterministic train/val/test lists of (text, label).

    dedupe: drop repeated (label, text) lines, keeping the first (403 in the collection), so no
    message is in two splits. balance: keep a random `n_spam` of the ham messages (the book's
    undersampling). Then shuffle and cut: train = int(f0 * n), val = int(f1 * n), test = the rest
    (f2 must be 1 - f0 - f1). numpy's legacy RandomState: its stream is frozen across versions.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise TaskError(f"sms_spam fractions must be three non-negative numbers summing to 1, not {fractions}")
    file = local_path(path) if path is not None else sms_spam_file()
    rows = load_sms_spam(file)
    if dedupe:
        rows = list(dict.fromkeys(rows))
    rng = np.random.RandomState(seed)
    if balance:
        spam = [r for r in rows if r[1] == "spam"]
        ham = [r for r in rows if r[1] == "ham"]
        keep = sorted(rng.permutation(len(ham))[: len(spam)].tolist())
        rows = [ham[i] for i in keep] + spam
    rows = [rows[i] for i in rng.permutation(len(rows)).tolist()]
    n_train, n_val = int(fractions[0] * len(rows)), int(fractions[1] * len(rows))
    signature = (f"{SPLIT_VERSION} seed={seed} dedupe={bool(dedupe)} balance={bool(balance)} "
                 f"fractions={','.join(f'{f:g}' for f in fractions)} sha256={sha256_file(file)}")
    return SpamSplit(rows[:n_train], rows[n_train:n_train + n_val], rows[n_train + n_val:], signature)


def fewshot_examples(train: Sequence[Example], k: int, seed: int) -> list[Example]:
    """k examples from the train split, deterministic, spam and ham alternating (spam first)."""
    if k <= 0:
        return []
    order = np.random.RandomState(seed + 1).permutation(len(train)).tolist()
    by_label = {lab: [train[i] for i in order if train[i][1] == lab] for lab in LABELS}
    picked = [by_label["spam" if j % 2 == 0 else "ham"][j // 2] for j in range(k)
              if j // 2 < len(by_label["spam" if j % 2 == 0 else "ham"])]
    if len(picked) < k:
        raise TaskError(f"the train split has too few messages for {k} few-shot examples")
    return picked


def prompt(text: str, shots: Sequence[Example] = ()) -> str:
    """The plain-LM context; the continuation is " ham" or " spam"."""
    return INSTRUCTION + "".join(f"Message: {t}\nLabel: {lab}\n\n" for t, lab in shots) + f"Message: {text}\nLabel:"


def confusion_cell(prediction: str, target: str) -> str:
    return ("t" if prediction == target else "f") + ("p" if prediction == "spam" else "n")


class SmsSpamTask:
    name = "sms_spam"

    def __init__(self, split: str = "test", num_fewshot: int = 0, limit: int | None = None,
                 seed: int = 123, dedupe: bool = True, balance: bool = True,
                 fractions: Sequence[float] = (0.7, 0.1, 0.2), path: str | None = None):
        limit, num_fewshot = check_limit(limit), check_fewshot(num_fewshot)
        self.data = spam_split(seed, dedupe, balance, fractions, path)
        self.split, self.num_fewshot, self.limit = split, num_fewshot, limit
        self.messages = self.data.part(split)[:limit]
        self.shots = fewshot_examples(self.data.train, self.num_fewshot, seed)
        self.version = text_hash(TEMPLATE_VERSION, INSTRUCTION, split, str(self.num_fewshot),
                                 self.data.signature)

    def samples(self) -> list[Sample]:
        return [Sample(f"{self.split}/{i:04d}-{text_hash(label, text)[:8]}", {"text": text, "label": label})
                for i, (text, label) in enumerate(self.messages)]

    def score(self, lm: LM, samples: list[Sample]) -> list[Record]:
        labels = classifier_labels(lm)   # optional capability (models/protocol.py Classifier)
        if labels:
            if sorted(labels) != sorted(LABELS):
                raise TaskError(f"{lm.name} is a classifier over {labels}; sms_spam needs the labels ham and spam")
            texts = [s.data["text"] for s in samples]
            rows = lm.classify(texts) if texts else []
            logprobs = [dict(zip(labels, row)) for row in rows]
            hashes = [text_hash("classify", t) for t in texts]
            mode = "classify"
        else:
            contexts = [prompt(s.data["text"], self.shots) for s in samples]
            requests = [(c, " " + lab) for c in contexts for lab in LABELS]
            lls = lm.loglikelihood(requests) if requests else []
            logprobs = [dict(zip(LABELS, lls[2 * i: 2 * i + 2])) for i in range(len(samples))]
            hashes = [text_hash(c, *(" " + lab for lab in LABELS)) for c in contexts]
            mode = "loglikelihood"
        records = []
        for s, lp, h in zip(samples, logprobs, hashes):
            pred = max(LABELS, key=lambda lab: (lp[lab], lab == "ham"))   # ties go to ham
            target = s.data["label"]
            records.append(Record(sample_id=s.id, prompt_hash=h, prediction=pred, target=target,
                                  scores={"acc": float(pred == target)},
                                  extra={"cell": confusion_cell(pred, target), "mode": mode,
                                         "logprobs": {k: float(v) for k, v in lp.items()}}))
        return records

    def metrics(self, records: list[Record]) -> dict[str, Metric]:
        return spam_metrics(records)


def spam_metrics(records: Sequence[Record]) -> dict[str, Metric]:
    """acc (stderr sqrt(p(1-p)/(n-1))), precision/recall/f1 for spam, and the confusion counts."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
    scored = [r for r in records if r.prediction in LABELS and r.scores.get("acc") is not None]
    n, unscored = len(scored), len(records) - len(scored)
    if n == 0:
        nan = Metric(float("nan"), None, 0, unscored)
        return {k: nan for k in ("acc", "precision", "recall", "f1", "tp", "fp", "tn", "fn")}
    y_true, y_pred = [r.target for r in scored], [r.prediction for r in scored]
    acc = float(accuracy_score(y_true, y_pred))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(LABELS), average="binary",
                                                 pos_label="spam", zero_division=0)
    (tn, fp), (fn, tp) = confusion_matrix(y_true, y_pred, labels=list(LABELS)).tolist()
    m = lambda v, se=None: Metric(float(v), se, n, unscored)   # noqa: E731
    return {"acc": m(acc, math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else None),
            "precision": m(p), "recall": m(r), "f1": m(f),
            "tp": m(tp), "fp": m(fp), "tn": m(tn), "fn": m(fn)}
