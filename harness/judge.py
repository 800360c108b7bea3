"""LLM-as-judge: grade a model's response against a reference with a local Ollama model.

    judge = OllamaJudge("http://127.0.0.1:11434", model="llama3.1:8b")
    grade = judge.grade(instruction, reference, response)      # Grade(score=85.0, parse="strict", ...)
    grades = judge.grade_many([(instruction, reference, response), ...])   # order kept

The eval CLI builds it from `conf/judge/ollama.yaml` (`judge.host=... judge.model=...`) for judged
tasks such as `task=instruct`. Prompts and reply parsing live in `harness.judge_prompts`.

Outcomes, from the run's point of view:
- a score, or an *unscored* Grade (score None, `error` says why: "unparseable reply", "timeout
  after 4 attempts"). A sample is never given a zero for a bad reply and never dropped;
- connection errors, timeouts, malformed responses and 5xx (but 501) are retried `retries` times
  with exponential backoff (`backoff_s`, 2x, 4x, ...); after that the sample is unscored with
  `transient=True` (the judge, not its reply, failed: a rerun of the same run folder asks again)
  and the run goes on. Once two samples in a row have used up their retries the server is taken
  to be down: later samples get one attempt each until one succeeds, so a dead server costs one
  timeout per sample. A reply without a score is final (`transient=False`);
- configuration errors stop the run with one line (`JudgeConfigError`, so the CLI prints
  `error: ...` and exits 2): an unparsable `judge.host` (at construction, before any model loads;
  `harness.judge_host`), no server there when the run starts, a server there that is not Ollama
  (judged by its GET /api/version), a judge model the server does not have (`ollama pull
  <model>`), another 4xx.

Retries, the pool of requests in flight and the reply cache are harness.remote's, shared with the
API-served model backends. Every reply is cached on disk (`$HARNESS_CACHE/judge`, default
`~/.cache/harness/judge`), one file per key, written atomically. The key is sha256 over judge model, its digest, style, options,
format and the full prompt, so re-judging the same responses asks the server nothing. Unparseable
replies are cached too (temperature 0 gives the same reply again); failed requests never are, so
a rerun after an outage asks the server again.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from harness.cli import UserError
from harness.io import cache_root
from harness.remote import Exhausted, ResponseCache, Retrier, map_ordered, sha256_json
from harness.judge_host import bad_host, check_host, excerpt, not_ollama
from harness.judge_prompts import JudgeStyle, get_style, parse_reply, render

log = logging.getLogger(__name__)

Item = tuple[str, str, str]          # (instruction, reference, response)


@dataclass
class Grade:
    score: float | None              # None = unscored
    raw: str                         # the judge's reply text ("" when no reply came)
    prompt_hash: str                 # sha256 (16 hex) of the messages sent
    parse: str | None                # "strict" | "fallback" | None
    error: str | None = None         # why unscored
    cached: bool = False             # the reply came from the on-disk cache
    transient: bool = False          # unscored because requests failed (not a bad reply): worth a retry


class Judge(Protocol):
    model: str
    style: str

    @property
    def digest(self) -> str: ...                 # the judge model's weights digest (comparability)

    @property
    def prompt_template(self) -> str: ...        # everything of the prompt but the three texts

    def grade(self, instruction: str, reference: str, response: str) -> Grade: ...

    def grade_many(self, items: Sequence[Item]) -> list[Grade]: ...


class JudgeConfigError(UserError):
    """The judge cannot work as configured; the run stops with one `error:` line."""


def _sha(obj: Any) -> str:
    return sha256_json(obj)


def default_cache_dir() -> Path:
    return cache_root() / "judge"


class OllamaJudge:
    """A `Judge` backed by an Ollama server through the `ollama` client (see the module docstring)."""

    def __init__(self, host: str = "http://127.0.0.1:11434", model: str = "llama3.1:8b",
                 timeout: float = 120, style: str = "zero_to_hundred", seed: int = 123,
                 num_ctx: int = 4096, temperature: float = 0, retries: int = 3, backoff_s: float = 1.0,
                 concurrency: int = 1, json_format: bool = False, cache: bool = True,
                 cache_dir: str | None = None, num_predict: int | None = None, progress: bool = True):
        import httpx
        import ollama

        if int(retries) < 0 or int(concurrency) < 1 or float(timeout) <= 0:
            raise JudgeConfigError(f"judge needs retries >= 0, concurrency >= 1 and timeout > 0 "
                                   f"(got {retries}, {concurrency}, {timeout})")
        check_host(host)                       # a typo in judge.host stops the run before any model loads
        self.host, self.model, self.timeout = str(host), str(model), float(timeout)
        self._style: JudgeStyle = get_style(style)
        self.style = self._style.name
        self.retries, self.backoff_s, self.concurrency = int(retries), float(backoff_s), int(concurrency)
        self.json_format, self.progress = bool(json_format), progress
        self.options = {"temperature": float(temperature), "seed": int(seed), "num_ctx": int(num_ctx),
                        "num_predict": int(num_predict or self._style.num_predict)}
        self.format = self._style.json_schema if self.json_format else None
        self.cache = ResponseCache(cache_dir or default_cache_dir()) if cache else None
        self._retry = Retrier(self.retries, self.backoff_s)
        # A host that drops packets fails within 10 s per attempt instead of the full reply timeout.
        try:
            self._client = ollama.Client(host=self.host,
                                         timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)))
        except ValueError as e:                # the client's own host parsing, should check_host miss a case
            raise bad_host(host, str(e)) from None
        logging.getLogger("httpx").setLevel(logging.WARNING)   # not one log line per judge request
        self._digest: str | None = None
        self._lock = threading.Lock()
        self._failed_in_a_row = 0    # samples in a row that used up their retries

    # -- identity ---------------------------------------------------------------------------------
    @property
    def prompt_template(self) -> str:
        s = self._style
        return json.dumps({"style": s.name, "system": s.system, "template": s.template,
                           "format": self.format}, sort_keys=True)

    @property
    def digest(self) -> str:
        """The model's digest from the server's /api/tags, fetched once; also checks the server is
        up and has the model (JudgeConfigError otherwise)."""
        with self._lock:
            if self._digest is None:
                self._digest = self._fetch_digest()
        return self._digest

    def _fetch_digest(self) -> str:
        try:
            listing = self._with_retries(self._client.list, self.retries + 1)
        except Exhausted as e:
            if e.answered and (why := self._not_ollama()):
                raise JudgeConfigError(why) from None
            raise JudgeConfigError(
                f"cannot reach the judge at judge.host={self.host} ({e}); start Ollama there "
                "(`ollama serve`) or set judge.host to a running Ollama server") from None
        names = [m.model or "" for m in listing.models]
        for m in listing.models:
            if m.model in (self.model, f"{self.model}:latest"):
                return m.digest or ""
        raise JudgeConfigError(self._not_found(names))

    def _not_found(self, names: Sequence[str] | None = None) -> str:
        have = f" (it has: {', '.join(names)})" if names else ""
        return (f"judge model '{self.model}' not found at judge.host={self.host}{have}: run "
                f"`ollama pull {self.model}` there, or set judge.model to a model in its /api/tags list")

    def _not_ollama(self) -> str | None:
        # The ollama client's own httpx.Client: same base URL, headers and proxies as the requests.
        return not_ollama(self._client._client, self.host, self.timeout)

    # -- requests ---------------------------------------------------------------------------------
    def _with_retries(self, call: Callable[[], Any], attempts: int) -> Any:
        """harness.remote's retries; a final error (4xx but 408/429, or 501) is a JudgeConfigError."""
        from ollama import ResponseError

        try:
            return self._retry.call(call, attempts, what="judge request")
        except ResponseError as e:
            # 501 "not implemented" is what a plain web server answers a POST, so it is told apart
            # from Ollama like a 404.
            if why := self._not_ollama():
                raise JudgeConfigError(why) from None
            if e.status_code == 404:
                raise JudgeConfigError(self._not_found()) from None
            raise JudgeConfigError(f"the judge at judge.host={self.host} rejected the request "
                                   f"(HTTP {e.status_code}: {excerpt(str(e.error))})") from None

    def _chat(self, messages: list[dict]) -> str:
        def call() -> str:
            reply = self._client.chat(model=self.model, messages=messages, options=self.options,
                                      format=self.format, stream=False)
            return reply.message.content or ""

        attempts = 1 if self._failed_in_a_row >= 2 else self.retries + 1   # server looks down
        try:
            raw = self._with_retries(call, attempts)
        except Exhausted:
            self._failed_in_a_row += 1
            raise
        self._failed_in_a_row = 0
        return raw

    # -- grading ----------------------------------------------------------------------------------
    def grade(self, instruction: str, reference: str, response: str) -> Grade:
        messages = render(self._style, instruction, reference, response)
        prompt_hash = _sha(messages)[:16]
        key = _sha({"model": self.model, "digest": self.digest, "style": self.style,
                    "options": self.options, "format": self.format, "messages": messages})
        hit = self.cache.get(key) if self.cache else None
        if hit is not None and isinstance(hit.get("raw"), str):
            p = parse_reply(self._style, hit["raw"])    # re-parsed: a parser fix applies to old replies
            return Grade(p.score, hit["raw"], prompt_hash, p.parse, p.error, cached=True)
        try:
            raw = self._chat(messages)
        except Exhausted as e:                          # never cached: a rerun asks again
            return Grade(None, "", prompt_hash, None, str(e), transient=True)
        p = parse_reply(self._style, raw)
        grade = Grade(p.score, raw, prompt_hash, p.parse, p.error)
        if self.cache:                                   # a full or read-only disk costs speed, not scores
            self.cache.put_quietly(key, dict(asdict(grade), model=self.model, digest=self.digest, style=self.style))
        return grade

    def grade_many(self, items: Sequence[Item]) -> list[Grade]:
        """Grades in the order of `items`, `concurrency` requests in flight."""
        items = list(items)
        if not items:
            return []
        _ = self.digest                                  # configuration errors before any work
        grades = map_ordered(lambda item: self.grade(*item), items, self.concurrency,
                             desc=f"judge {self.model}", progress=self.progress)
        unscored = sum(g.score is None for g in grades)
        log.info("judge %s: %d graded, %d from cache, %d unscored", self.model, len(grades),
                 sum(g.cached for g in grades), unscored)
        return grades
