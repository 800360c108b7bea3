"""The OpenAI response objects, in the shapes of the `openai` package's types: completions, chunks,
usage, log-probs (chat and legacy), embeddings, models, and SSE framing. Pure: no HTTP, no torch
(harness/serve/scoring.py makes the TokenScores)."""
from __future__ import annotations

import base64
import json
import math
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from harness.serve.openai_requests import ChatRequest, CompletionRequest, EmbeddingRequest


def new_id(kind: str) -> str:
    """"chatcmpl-..." (chat) or "cmpl-..." (completions): one id for every chunk of a stream."""
    return f"{kind}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class TokenScore:
    """One token's log-probability and the most likely alternatives at its position (ids, most
    likely first). logprob None: nothing predicts it (a prompt's first token). Made by
    harness/serve/scoring.py; `piece(id)` turns ids into text for the responses."""
    id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0     # OpenAI's stand-in for "very unlikely"; JSON has no -inf


def chat_logprobs(scores: Sequence[TokenScore], piece: Callable[[int], str], top_logprobs: int,
                  raw: Callable[[int], bytes] | None = None) -> dict:
    """choices[].logprobs of a chat completion (or of one chunk): {"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}], "refusal": None}. bytes: raw(id) (the token's own
    bytes: harness.serve.scoring.token_bytes), else the UTF-8 of its text."""
    def entry(tid: int, lp: float) -> dict:
        text = piece(tid)
        return {"token": text, "logprob": _finite(lp),
                "bytes": list(raw(tid) if raw is not None else text.encode("utf-8"))}
    return {"content": [{**entry(s.id, s.logprob if s.logprob is not None else 0.0),
                         "top_logprobs": [entry(t, lp) for t, lp in s.top[:top_logprobs]]} for s in scores],
            "refusal": None}


def completion_logprobs(scores: Sequence[TokenScore], piece: Callable[[int], str], n_top: int,
                        offset: int = 0) -> dict:
    """choices[].logprobs of a legacy completion: tokens, token_logprobs (None where nothing predicts
    the token: the first prompt token under echo), top_logprobs ({token: logprob}, None there too),
    text_offset (character offsets into the choice's text, from `offset`)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    at = offset
    for s in scores:
        text = piece(s.id)
        tokens.append(text)
        offsets.append(at)
        at += len(text)
        token_logprobs.append(None if s.logprob is None else _finite(s.logprob))
        tops.append(None if s.logprob is None else {piece(t): _finite(lp) for t, lp in s.top[:n_top]})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _header(kind: str, rid: str, model: str, created: int, fingerprint: str | None) -> dict:
    out = {"id": rid, "object": kind, "created": created, "model": model}
    if fingerprint:
        out["system_fingerprint"] = fingerprint
    return out


def chat_completion(req: ChatRequest, text: str, finish_reason: str, usage: dict, *, rid: str | None = None,
                    created: int | None = None, logprobs: dict | None = None, fingerprint: str = "") -> dict:
    """The non-streamed chat answer. finish_reason: "stop" (EOS or a stop string) | "length"."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
              "logprobs": logprobs, "finish_reason": finish_reason}
    return {**_header("chat.completion", rid or new_id("chatcmpl"), req.model, _now(created), fingerprint),
            "choices": [choice], "usage": usage}


def chat_chunk(req: ChatRequest, rid: str, created: int, *, content: str | None = None, role: bool = False,
               finish_reason: str | None = None, logprobs: dict | None = None, fingerprint: str = "") -> dict:
    """One streamed chat chunk (object "chat.completion.chunk"). The stream: a first chunk with
    role=True (delta {role: "assistant", content: ""}), chunks with content (and logprobs for the
    tokens in them), a chunk with finish_reason and an empty delta, then, with include_usage, the
    `chat_usage_chunk`. With include_usage every chunk before it carries "usage": null."""
    delta: dict = {}
    if role:
        delta["role"] = "assistant"
        delta["content"] = content or ""
    elif content is not None:
        delta["content"] = content
    out = {**_header("chat.completion.chunk", rid, req.model, created, fingerprint),
           "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if req.include_usage:
        out["usage"] = None
    return out


def chat_usage_chunk(req: ChatRequest, rid: str, created: int, usage: dict, fingerprint: str = "") -> dict:
    """The last chunk under stream_options.include_usage: no choices, the request's usage."""
    return {**_header("chat.completion.chunk", rid, req.model, created, fingerprint), "choices": [],
            "usage": usage}


@dataclass
class CompletionChoice:
    """One prompt's answer for `completion`: text (prompt text first under echo), why it ended, and
    `completion_logprobs(...)` when the request asked for logprobs."""
    text: str
    finish_reason: str
    logprobs: dict | None = None


def completion(req: CompletionRequest, choices: Sequence[CompletionChoice], usage: dict, *,
               rid: str | None = None, created: int | None = None, fingerprint: str = "") -> dict:
    """The non-streamed /v1/completions answer: choice i answers req.prompts[i]."""
    return {**_header("text_completion", rid or new_id("cmpl"), req.model, _now(created), fingerprint),
            "choices": [{"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                        for i, c in enumerate(choices)],
            "usage": usage}


def completion_chunk(req: CompletionRequest, rid: str, created: int, text: str, *,
                     finish_reason: str | None = None, logprobs: dict | None = None, fingerprint: str = "") -> dict:
    """One streamed /v1/completions chunk (the same object as the answer, with a piece of text;
    finish_reason on the last one; under echo the first chunk carries the prompt text and its
    logprobs). With include_usage, "usage": null until `completion_usage_chunk`."""
    out = {**_header("text_completion", rid, req.model, created, fingerprint),
           "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if req.include_usage:
        out["usage"] = None
    return out


def completion_usage_chunk(req: CompletionRequest, rid: str, created: int, usage: dict,
                           fingerprint: str = "") -> dict:
    return {**_header("text_completion", rid, req.model, created, fingerprint), "choices": [], "usage": usage}


def encode_embedding(vector: Sequence[float], encoding_format: str) -> list[float] | str:
    """A vector as a list of floats, or base64 of little-endian float32 (what the SDK decodes)."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return [float(x) for x in vector]


def embeddings(req: EmbeddingRequest, vectors: Sequence[Sequence[float]], prompt_tokens: int) -> dict:
    """The /v1/embeddings answer: data[i] embeds req.inputs[i]."""
    return {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": encode_embedding(v, req.encoding_format)}
                     for i, v in enumerate(vectors)],
            "model": req.model, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def sse(obj: dict | str) -> bytes:
    """One server-sent event: "data: <json>\\n\\n"; `sse("[DONE]")` ends a stream."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")


def _now(created: int | None) -> int:
    return int(time.time()) if created is None else created
