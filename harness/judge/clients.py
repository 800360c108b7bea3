"""How the judge reaches its model: one chat request at a time, to Ollama or to an OpenAI-compatible
server. Retries, the reply cache and concurrency are the judge's (harness.judge.core), the same for
both; a client only knows its server's API and how that server says "no".

    client = OllamaClient("http://127.0.0.1:11434", "llama3.1:8b", timeout=120)
    client.identity(retrier)       # the weights' digest; JudgeConfigError when the server or model is missing
    client.send(messages, SendOptions(temperature=0, seed=123, max_tokens=512))   # one attempt: the reply text
    client.refused(error)          # a final (4xx) error as the one-line JudgeConfigError

Both use the official client libraries (`ollama`, `openai`), as the API-served model backends do
(models/ollama_lm.py, models/openai_lm.py); their errors carry `status_code`, which is how
harness.remote tells a transient failure from a final one.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from harness.judge.host import EXAMPLE, JudgeConfigError, bad_host, check_host, excerpt, not_ollama
from harness.remote import Exhausted, Retrier, served_id, status_of


@dataclass(frozen=True)
class SendOptions:
    temperature: float
    seed: int
    max_tokens: int
    num_ctx: int | None = None                  # Ollama's context window (the OpenAI API has none)
    json_schema: dict | None = None             # constrain the reply to this schema

    def as_key(self) -> dict:
        """What of the options can change a reply (part of the cache key)."""
        return {"temperature": self.temperature, "seed": self.seed, "max_tokens": self.max_tokens,
                "num_ctx": self.num_ctx, "format": self.json_schema}


class ChatClient(Protocol):
    model: str
    where: str               # "judge.host=http://..." for messages

    def identity(self, retry: Retrier) -> str: ...

    def send(self, messages: list[dict], options: SendOptions) -> str: ...

    def refused(self, error: Exception) -> JudgeConfigError: ...


class OllamaClient:
    """Ollama's /api/chat through the `ollama` client; identity is the model's digest in /api/tags."""

    def __init__(self, host: str, model: str, timeout: float):
        import httpx
        import ollama

        check_host(host)                       # a typo in judge.host stops the run before any model loads
        self.host, self.model, self.timeout = str(host), str(model), float(timeout)
        self.where = f"judge.host={self.host}"
        # A host that drops packets fails within 10 s per attempt instead of the full reply timeout.
        try:
            self._client = ollama.Client(host=self.host,
                                         timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)))
        except ValueError as e:                # the client's own host parsing, should check_host miss a case
            raise bad_host(host, str(e)) from None
        logging.getLogger("httpx").setLevel(logging.WARNING)   # not one log line per judge request

    def identity(self, retry: Retrier) -> str:
        try:
            listing = retry.call(self._client.list, what="judge /api/tags")
        except Exhausted as e:
            if e.answered and (why := self._not_ollama()):
                raise JudgeConfigError(why) from None
            raise JudgeConfigError(
                f"cannot reach the judge at judge.host={self.host} ({e}); start Ollama there "
                "(`ollama serve`) or set judge.host to a running Ollama server") from None
        except Exception as e:
            if status_of(e) is None:
                raise
            raise self.refused(e) from None
        names = [m.model or "" for m in listing.models]
        for m in listing.models:
            if m.model in (self.model, f"{self.model}:latest"):
                return m.digest or ""
        raise JudgeConfigError(self._not_found(names))

    def send(self, messages: list[dict], options: SendOptions) -> str:
        opts: dict[str, Any] = {"temperature": options.temperature, "seed": options.seed,
                                "num_predict": options.max_tokens}
        if options.num_ctx:
            opts["num_ctx"] = options.num_ctx
        reply = self._client.chat(model=self.model, messages=messages, options=opts,
                                  format=options.json_schema, stream=False)
        return reply.message.content or ""

    def refused(self, error: Exception) -> JudgeConfigError:
        # 501 "not implemented" is what a plain web server answers a POST, so it is told apart from
        # Ollama like a 404.
        if why := self._not_ollama():
            return JudgeConfigError(why)
        if status_of(error) == 404:
            return JudgeConfigError(self._not_found())
        return JudgeConfigError(f"the judge at judge.host={self.host} rejected the request "
                                f"(HTTP {status_of(error)}: {excerpt(str(getattr(error, 'error', error)))})")

    def _not_found(self, names: Sequence[str] | None = None) -> str:
        have = f" (it has: {', '.join(names)})" if names else ""
        return (f"judge model '{self.model}' not found at judge.host={self.host}{have}: run "
                f"`ollama pull {self.model}` there, or set judge.model to a model in its /api/tags list")

    def _not_ollama(self) -> str | None:
        # The ollama client's own httpx.Client: same base URL, headers and proxies as the requests.
        return not_ollama(self._client._client, self.host, self.timeout)


class OpenAIClient:
    """/v1/chat/completions through the `openai` client (OpenAI, vLLM, llama.cpp's server, LM Studio,
    harness.serve); identity is the served model id from /v1/models, the nearest thing the API has
    to a digest (hosted ids such as gpt-4o-2024-08-06 name a snapshot)."""

    def __init__(self, base_url: str, model: str, timeout: float, api_key_env: str | None = None):
        import openai

        if not str(base_url).startswith(("http://", "https://")):
            raise JudgeConfigError(f"judge.base_url={base_url!r} is not a server address; a valid value looks "
                                   "like http://127.0.0.1:8000/v1")
        self.base_url, self.model = str(base_url).rstrip("/"), str(model)
        self.where = f"judge.base_url={self.base_url}"
        key = os.environ.get(api_key_env) if api_key_env else None
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key or "x", timeout=float(timeout),
                                     max_retries=0)      # harness.remote retries, the same for both clients
        logging.getLogger("httpx").setLevel(logging.WARNING)

    def identity(self, retry: Retrier) -> str:
        try:
            served, ids = served_id(lambda: [m.id for m in self._client.models.list()], retry, self.model,
                                    "judge /v1/models")
        except Exhausted as e:
            raise JudgeConfigError(f"cannot reach the judge at {self.where} ({e}); start the server or set "
                                   "judge.base_url to its address (ending in /v1)") from None
        except Exception as e:
            if status_of(e) is None:
                raise
            raise self.refused(e) from None
        if served is not None:
            return served
        raise JudgeConfigError(f"judge model '{self.model}' is not served at {self.where} (it serves: "
                               f"{', '.join(ids) or 'nothing'}); set judge.model to one of those")

    def send(self, messages: list[dict], options: SendOptions) -> str:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": options.temperature,
                                "seed": options.seed, "max_tokens": options.max_tokens}
        if options.json_schema:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "verdict", "schema": options.json_schema}}
        answer = self._client.chat.completions.create(**body)
        return answer.choices[0].message.content or ""

    def refused(self, error: Exception) -> JudgeConfigError:
        status = status_of(error)
        if status in (401, 403):
            return JudgeConfigError(f"the judge at {self.where} refused the API key (HTTP {status}); put the key "
                                    "in an environment variable and name it in judge.api_key_env")
        if status == 404:
            return JudgeConfigError(f"judge model '{self.model}' is not served at {self.where} (HTTP 404)")
        return JudgeConfigError(f"the judge at {self.where} rejected the request (HTTP {status}: "
                                f"{excerpt(str(error), 300)})")


__all__ = ["ChatClient", "OllamaClient", "OpenAIClient", "SendOptions", "EXAMPLE"]
