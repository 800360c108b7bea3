"""The `LM` protocol: everything a task may ask of a model, and nothing that needs torch.

Tasks (`tasks/*.py`) and the engine (`harness/evaluate.py`) import only this module, so they load
and can be tested without torch, and a backend is anything with these members: `TorchLM`
(models/lm.py, the harness's own models), the transformers backend (models/hf.py, `model=hf:...`),
or a remote API. The three scoring questions are lm-evaluation-harness's; chat rendering is here
because a task must not reach into a tokenizer to format a prompt.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable


@runtime_checkable
class LM(Protocol):
    name: str
    # Leaderboard keys: model, checkpoint_sha, dtype, device, batch_size; provenance (a dict, or "").
    info: dict[str, Any]
    # True when chat_prompt can render: the tokenizer ships a chat template.
    has_chat_template: bool

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Sum of log-probs of each continuation given its context, (context, continuation) pairs.

        Tokenized as lm-eval does: trailing spaces of the context move to the continuation, the
        continuation's tokens are those of tok(context + continuation) past tok(context).
        """
        ...

    def loglikelihood_rolling(self, texts: Sequence[str], *, max_length: int | None = None,
                              stride: int | None = None) -> list[float]:
        """Log-prob of each whole text, scored in windows of `max_length` tokens that advance by
        `stride` (stride == max_length: lm-eval's disjoint windows; smaller: every token is still
        scored exactly once, with more left context). The first token is predicted from BOS/EOS."""
        ...

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int | None = None) -> list[str]:
        """Continuations of each prompt (raw text in, raw text out; greedy when temperature == 0),
        cut before the first stop string (`cut_at_stop`)."""
        ...

    def count_tokens(self, text: str) -> int:
        """Number of tokens the model's tokenizer makes of `text` (for token-level perplexity)."""
        ...

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The messages ([{"role", "content"}]) rendered by the model's chat template, as the text a
        response continues; a UserError when `has_chat_template` is False."""
        ...


@runtime_checkable
class Classifier(Protocol):
    """An optional capability: a classifier checkpoint (a class head instead of a vocabulary head)
    answers `classify` over its `labels`; tasks check `classifier_labels(lm)` before asking."""

    labels: list[str] | None

    def classify(self, texts: Sequence[str]) -> list[list[float]]:
        """Log-probabilities over `labels` for each text."""
        ...


def classifier_labels(lm: object) -> list[str] | None:
    """The class labels when `lm` is a classifier checkpoint, else None (a plain language model)."""
    labels = getattr(lm, "labels", None)
    return list(labels) if labels else None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any (non-empty) stop string: what `generate` returns."""
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]
