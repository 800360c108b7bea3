"""What the API-served backends share (`model=ollama:<name>`, models/ollama_lm.py; `model=openai:<name>`,
models/openai_lm.py): chat prompts the server renders, cached and retried requests, and reading
prompt log-probabilities out of a /v1/completions answer. No HTTP client here.

Chat prompts: such a model's chat template lives on the server (a Go template in Ollama, a Jinja
one in vLLM), so `chat_prompt` cannot render it; it returns a `ChatPrompt`, a str (the messages as
JSON, which is what a record shows as the prompt) that still carries the messages, and `generate`
sends those to the server's chat endpoint, which renders them with the model's own template. Any
other prompt is sent as raw text to be continued.

Log-likelihoods (lm-eval's local-completions and gguf backends): context + continuation go to
/v1/completions as text with echo, logprobs=1 and max_tokens=0; the server tokenizes the whole text
and returns every token's log-prob and its character offset (text_offset). The continuation's
tokens are those starting at or after the context's end, so the pair is tokenized as one text, as
in-process scoring does (models/requests.py `split_encoding`, after `move_trailing_space`).
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from harness.cli import UserError
from harness.io import cache_root
from harness.remote import Exhausted, ResponseCache, Retrier, map_ordered, request_key, status_of

log = logging.getLogger("harness")

# What a backend without prompt log-probabilities can still run: tasks that only generate.
GENERATIVE_TASKS = ("instruct",)


class ChatPrompt(str):
    """Chat messages for the server to render with its template; the str value is their JSON."""

    messages: list[dict]

    def __new__(cls, messages: Sequence[dict]):
        clean = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        self = super().__new__(cls, json.dumps(clean, ensure_ascii=False))
        self.messages = clean
        return self

    def __getnewargs__(self):          # copy / pickle (a record's asdict deep-copies its prompt)
        return (self.messages,)


def check_settings(timeout: Any, retries: Any, backoff_s: Any, concurrency: Any) -> None:
    if float(timeout) <= 0 or int(retries) < 0 or float(backoff_s) < 0 or int(concurrency) < 1:
        raise UserError(f"model.timeout must be > 0, model.retries >= 0, model.backoff_s >= 0 and "
                        f"model.concurrency >= 1 (got {timeout}, {retries}, {backoff_s}, {concurrency})")


class ApiLM:
    """The LM protocol's shared half for a model behind an HTTP API (models/protocol.py)."""

    labels = None                 # a causal LM, no class head
    has_chat_template = True      # the server renders chat messages with the model's template

    def __init__(self, *, name: str, where: str, retries: int, backoff_s: float, concurrency: int,
                 cache: bool, cache_dir: str | None, progress: bool):
        self.name, self.where = name, where         # where: "model.host=http://..." for messages
        self.retry = Retrier(retries, backoff_s)
        self.concurrency, self.progress = int(concurrency), progress
        self.cache = ResponseCache(cache_dir or Path(cache_root()) / "api") if cache else None
        self.identity = ""                           # what the cache key names as the weights
        self.requests_sent = 0                       # answers that came from the server, not the cache
        self._lock = threading.Lock()

    # -- requests -----------------------------------------------------------------------------------
    def cached(self, endpoint: str, body: dict, send: Callable[[dict], dict], cacheable: bool = True,
               refused: Callable[[str, Exception], Exception] | None = None) -> dict:
        """send(body) through the retries, or its earlier answer from the cache. A final HTTP error
        (a 4xx) becomes refused(endpoint, error), default `self.refused`."""
        key = request_key(endpoint, body, self.identity)
        if cacheable and self.cache and (hit := self.cache.get(key)) is not None:
            return hit
        try:
            answer = self.retry.call(lambda: send(body), what=f"{self.name} {endpoint}")
        except Exhausted as e:
            raise UserError(f"{self.name} at {self.where}: {endpoint} failed ({e}); check the server, then "
                            "rerun the same hydra.run.dir (finished samples and cached answers are kept)") from None
        except Exception as e:
            if status_of(e) is None:                 # not an HTTP answer: a bug, raised as it is
                raise
            raise (refused or self.refused)(endpoint, e) from None
        with self._lock:
            self.requests_sent += 1
        if cacheable and self.cache:
            self.cache.put_quietly(key, answer)
        return answer

    def refused(self, endpoint: str, error: Exception) -> Exception:
        """The one-line error for a final (4xx) answer; backends name their own cases first."""
        from harness.judge.host import excerpt
        return UserError(f"{self.name} at {self.where} refused {endpoint}: {excerpt(str(error), 300)}")

    def map(self, fn: Callable, items: Sequence, desc: str) -> list:
        return map_ordered(fn, items, self.concurrency, desc=f"{self.name} {desc}", progress=self.progress)

    def no_loglikelihood(self, why: str) -> UserError:
        return UserError(f"{self.name} cannot score log-likelihoods ({why}), so tasks that score choices or "
                         f"perplexity (mmlu, arc_easy, arc_challenge, multiple_choice, perplexity, sms_spam) "
                         f"cannot run on it; it can run: {', '.join(GENERATIVE_TASKS)}")

    # -- the LM protocol ----------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not add_generation_prompt:
            raise UserError(f"{self.name}: the server renders chat templates only to continue an "
                            "assistant turn (add_generation_prompt=True)")
        return ChatPrompt(messages)


# ----------------------------------------------------------------------------- /v1/completions echo

def continuation_logprob(logprobs: Any, context_chars: int, what: str = "") -> tuple[float, bool]:
    """(sum of the continuation's token log-probs, whether each was the most likely token) from a
    legacy completion's `logprobs` (tokens, token_logprobs, top_logprobs, text_offset) for the echoed
    text context + continuation, the context being its first `context_chars` characters."""
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("text_offset"), list):
        raise ValueError("the answer has no logprobs.text_offset")
    offsets, values = logprobs["text_offset"], logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [None] * len(values)
    start = next((i for i, at in enumerate(offsets) if at >= context_chars), len(offsets))
    if start == len(offsets):
        raise UserError(f"continuation {what!r} is empty after tokenization")
    total, greedy = 0.0, True
    for value, top in zip(values[start:], tops[start:]):
        if value is None:
            raise ValueError("a continuation token has no log-prob")
        total += float(value)
        greedy = greedy and bool(top) and float(value) >= max(top.values())
    return total, greedy


def text_logprob(logprobs: Any, text: str) -> tuple[float | None, int]:
    """(sum of the log-probs of every token of the echoed `text`, its number of tokens). A leading
    token without a log-prob whose piece does not begin the text is the server's BOS, left out of
    both; when the text's own first token has no log-prob (no BOS before it: nothing predicts it)
    the sum is None, since in-process scoring predicts it from BOS/EOS and one would differ."""
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("token_logprobs"), list):
        raise ValueError("the answer has no logprobs.token_logprobs")
    values, tokens = logprobs["token_logprobs"], logprobs.get("tokens") or []
    if values and values[0] is None:
        first = tokens[0] if tokens else ""
        if first and text.startswith(first):
            return None, len(values)
        values = values[1:]
    if any(v is None for v in values):
        raise ValueError("a token past the first has no log-prob")
    return sum(float(v) for v in values), len(values)
