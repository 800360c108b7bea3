"""Generated tokens' log-probabilities in Ollama's shape: `logprobs` [{token, logprob, top_logprobs:
[{token, logprob}]}] on /api/generate and /api/chat chunks (what the `ollama` client parses into
Logprob / TokenLogprob). No HTTP, no torch: the tokenizer comes in as two functions.

Only tokens whose text the client gets are reported: when a stop string cuts the reply, the tokens
that held nothing but the cut text are dropped. A token counts as returned when its text starts
before the end of the reply (it may be cut inside, like the stop string's first token).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

MAX_TOP_LOGPROBS = 20   # Ollama's (and OpenAI's) limit


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else -9999.0   # JSON has no -inf


class LogprobGate:
    """Takes TokenScores as the engine reports them and hands out Ollama logprob entries for the
    tokens whose text has been returned. decode(ids) -> text (the same decoding as the reply's),
    piece(id) -> one token's text."""

    def __init__(self, decode: Callable[[list[int]], str], piece: Callable[[int], str]):
        self.decode, self.piece = decode, piece
        self.ids: list[int] = []
        self.pending: list = []          # (start offset, TokenScore) not handed out yet

    def add(self, scores: Sequence) -> None:
        for s in scores:
            self.pending.append((len(self.decode(self.ids)), s))
            self.ids.append(s.id)

    def release(self, text_end: int) -> list[dict]:
        """Entries for the pending tokens that start before `text_end` (characters returned so far)."""
        out = [self.entry(s) for start, s in self.pending if start < text_end]
        self.pending = [(start, s) for start, s in self.pending if start >= text_end]
        return out

    def entry(self, s) -> dict:
        return {"token": self.piece(s.id), "logprob": _finite(s.logprob),
                "top_logprobs": [{"token": self.piece(i), "logprob": _finite(lp)} for i, lp in s.top]}
