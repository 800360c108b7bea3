"""Perplexity of whole documents: lm-eval's `wikitext` task, or any UTF-8 text file.

`dataset="wikitext2"` reproduces lm-eval's `wikitext` (v2.0) on WikiText-2 raw test. lm-eval reads
HF `EleutherAI/wikitext_document_level`, whose loading script cuts `wiki.test.raw` into articles:
it splits the file on "\\n", starts a new page at every line that, after turning "= = =" into "==="
and "= =" into "==" and stripping, starts with "= " and ends with " =" (a top-level ` = Title = `
heading), joins each page's lines with "\\n", drops empty pages except the last; 62 test pages.
Each page is scored as `wikitext_detokenizer(page)` with loglikelihood_rolling, while words
(`len(re.split(r"\\s+", page))`) and bytes (UTF-8) are counted on the page *before* detokenizing.

Aggregation as lm-eval: word/byte/token perplexity = exp(-sum ll / sum units), bits_per_byte =
-sum ll / (sum bytes * ln 2), all weighted over documents (not a mean of per-document values).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from models.protocol import LM
from models.download import sha256_file
from harness.cli import int_option
from tasks.base import Metric, Record, Sample, TaskError, check_limit, text_hash
from tasks.data import local_path, wikitext2_raw

TEMPLATE_VERSION = "perplexity/v1 wikitext=lm-eval-2.0"


def split_wikitext_pages(raw: str) -> list[str]:
    """Articles of a wiki.*.raw file, as EleutherAI/wikitext_document_level builds its `page`s."""
    pages, current = [], []
    for line in raw.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))  # the last page is kept as is (the dataset script does so)
    return pages


def page_title(page: str) -> str:
    for line in page.split("\n"):
        if line.strip():
            return line.strip().strip("=").strip()
    return ""


# lm-eval's wikitext_detokenizer, as an ordered table: (regex?, pattern, replacement).
# The order matters (e.g. " @-@ " before the "= =" rules), so it is applied exactly as listed.
_DETOKENIZE = [
    (False, "s '", "s'"), (True, r"/' [0-9]/", r"/'[0-9]/"),                      # contractions
    (False, " @-@ ", "-"), (False, " @,@ ", ","), (False, " @.@ ", "."),             # number separators
    (False, " : ", ": "), (False, " ; ", "; "), (False, " . ", ". "),                # punctuation
    (False, " ! ", "! "), (False, " ? ", "? "), (False, " , ", ", "),
    (True, r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (True, r"\[\s*([^\]]*?)\s*\]", r"[\1]"),  # brackets
    (True, r"{\s*([^}]*?)\s*}", r"{\1}"), (True, r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    (True, r"'\s*([^']*?)\s*'", r"'\1'"),
    (False, "= = = =", "===="), (False, "= = =", "==="), (False, "= =", "=="),      # headings
    (False, " \u00b0 ", "\u00b0"), (False, " \n", "\n"), (False, "\n ", "\n"),       # misc
    (False, " N ", " 1 "), (False, " 's", "'s"),
]


def wikitext_detokenize(text: str) -> str:
    for is_regex, pattern, replacement in _DETOKENIZE:
        text = re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
    return text


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))   # lm-eval's count: leading/trailing whitespace adds ""s


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


class PerplexityTask:
    num_fewshot = 0

    def __init__(self, dataset: str | None = "wikitext2", path: str | None = None,
                 max_length: int | None = None, stride: int | None = None, limit: int | None = None):
        limit = check_limit(limit)
        max_length = int_option(max_length, "task.max_length", minimum=2, allow_none=True)
        stride = int_option(stride, "task.stride", minimum=1, allow_none=True)
        if path is not None:
            self.file, self.dataset = local_path(path), None
            self.name = f"perplexity:{Path(path).stem}"
        elif dataset == "wikitext2":
            self.file, self.dataset, self.name = wikitext2_raw("test"), dataset, "wikitext2"
        else:
            raise TaskError(f"unknown perplexity dataset {dataset!r}; use dataset=wikitext2 or path=<text file>")
        if stride is not None and max_length is not None and not 0 < stride <= max_length:
            raise TaskError(f"stride must be in 1..max_length, got stride={stride}, max_length={max_length}")
        self.max_length, self.stride, self.limit = max_length, stride, limit
        self.version = text_hash(TEMPLATE_VERSION, str(self.dataset), sha256_file(self.file),
                                 f"max_length={max_length}", f"stride={stride}")

    def documents(self) -> list[tuple[str, str]]:
        """(original text, text to score) per document."""
        try:
            raw = self.file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TaskError(f"{self.file}: not UTF-8 text ({e})") from None
        if not raw.strip():
            raise TaskError(f"{self.file} is empty: there is no text to score; point task.path at a text file")
        if self.dataset == "wikitext2":
            return [(page, wikitext_detokenize(page)) for page in split_wikitext_pages(raw)]
        return [(raw, raw)]

    def samples(self) -> list[Sample]:
        out = []
        for i, (original, scored) in enumerate(self.documents()[: self.limit]):
            title = page_title(original) if self.dataset else self.file.name
            out.append(Sample(f"{i:04d}-{text_hash(title)[:8]}", {
                "text": scored, "words": count_words(original), "bytes": count_bytes(original),
                "title": title,
            }))
        return out

    def score(self, lm: LM, samples: list[Sample]) -> list[Record]:
        texts = [s.data["text"] for s in samples]
        lls = lm.loglikelihood_rolling(texts, max_length=self.max_length, stride=self.stride) if texts else []
        return [
            Record(sample_id=s.id, prompt_hash=text_hash(s.data["text"]), prediction=None, target=None,
                   scores={"loglikelihood": float(ll), "words": s.data["words"], "bytes": s.data["bytes"],
                           "tokens": lm.count_tokens(s.data["text"])},
                   extra={"title": s.data["title"]})
            for s, ll in zip(samples, lls)
        ]

    def metrics(self, records: list[Record]) -> dict[str, Metric]:
        scored = [r.scores for r in records if r.scores.get("loglikelihood") is not None]
        n, unscored = len(scored), len(records) - len(scored)
        ll = sum(s["loglikelihood"] for s in scored)

        def total(unit: str) -> float:
            return float(sum(s[unit] for s in scored))

        def ppl(unit: str) -> float:
            if not (n and total(unit)):
                return float("nan")
            exponent = -ll / total(unit)
            return math.exp(exponent) if exponent < 709 else float("inf")  # exp overflows past ~709

        bpb = -ll / (total("bytes") * math.log(2)) if n and total("bytes") else float("nan")
        return {
            "token_perplexity": Metric(ppl("tokens"), None, n, unscored),
            "word_perplexity": Metric(ppl("words"), None, n, unscored),
            "byte_perplexity": Metric(ppl("bytes"), None, n, unscored),
            "bits_per_byte": Metric(bpb, None, n, unscored),
        }
