"""LLM-as-judge: a chat client (harness.judge.clients) plus what every judging style needs.

    judge = OllamaJudge("http://127.0.0.1:11434", model="llama3.1:8b")      # conf/judge/ollama.yaml
    judge = OpenAIJudge("http://127.0.0.1:8000/v1", model="gpt-4o-mini")     # conf/judge/openai.yaml
    grades = judge.grade_many([(instruction, reference, response), ...])     # single-answer, the style's prompt
    replies = judge.ask_many([messages, ...])                                # any prompt (MT-Bench, pairwise)

Tasks own their prompts and parsing (tasks/mt_bench.py, tasks/pairwise.py, tasks/judge_probes.py);
`grade_many` is the single-answer style of harness.judge.styles. The judge supplies, for all of them:
- retries (harness.remote): connection errors, timeouts, malformed bodies and 5xx (but 501) are
  retried `retries` times with exponential backoff; after that the sample is unscored with
  `transient=True` (the judge, not its reply, failed: a rerun of the same run folder asks again).
  Once two samples in a row have used up their retries the server is taken to be down: later
  samples get one attempt each until one succeeds, so a dead server costs one timeout per sample;
- configuration errors stop the run with one line (JudgeConfigError, exit 2): an unparsable
  address (at construction, before any model loads), no server there, a server that does not speak
  the API, a judge model it does not serve, another 4xx;
- the reply cache: one file per request under `$HARNESS_CACHE/judge`, keyed by sha256 over the
  client's identity (model + digest), the sampling options and the full messages, so re-judging
  the same responses asks the server nothing. Unparseable replies are cached too (temperature 0
  gives the same reply again); failed requests never are;
- `concurrency` requests in flight, results in input order;
- injection hardening (`harden`, styles.fence): tasks fence every judged answer through `fence()`
  and extend the system prompt with `system()`;
- a second, sampled pass for self-consistency (`self_consistency=true`): `second=True` asks again
  at `consistency_temperature` with seed + 1, and `agreement` is the share of samples whose two
  verdicts agree (a judge that flips on a resample is not one to trust).
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from harness.io import cache_root
from harness.judge.clients import ChatClient, OllamaClient, OpenAIClient, SendOptions
from harness.judge.host import JudgeConfigError
from harness.judge.styles import FENCE_NOTE, JudgeStyle, fence, get_style, parse_reply, render
from harness.remote import Exhausted, ResponseCache, Retrier, map_ordered, sha256_json, status_of

log = logging.getLogger(__name__)

Item = tuple[str, str, str]          # (instruction, reference, response)
Messages = list[dict]


@dataclass
class Reply:
    raw: str                         # the judge's reply text ("" when no reply came)
    prompt_hash: str                 # sha256 (16 hex) of the messages sent
    error: str | None = None         # why no reply came
    cached: bool = False             # the reply came from the on-disk cache
    transient: bool = False          # no reply because requests failed: worth a retry


@dataclass
class Grade:
    score: float | None              # None = unscored
    raw: str
    prompt_hash: str
    parse: str | None                # "strict" | "fallback" | None
    error: str | None = None         # why unscored
    cached: bool = False
    transient: bool = False


def default_cache_dir() -> Path:
    return cache_root() / "judge"


class Judge:
    """Retries, cache, concurrency, hardening and self-consistency over a ChatClient."""

    def __init__(self, client: ChatClient, *, style: str = "zero_to_hundred", seed: int = 123,
                 temperature: float = 0, num_ctx: int | None = 4096, num_predict: int | None = None,
                 json_format: bool = False, harden: bool = True, self_consistency: bool = False,
                 consistency_temperature: float = 0.7, retries: int = 3, backoff_s: float = 1.0,
                 concurrency: int = 1, cache: bool = True, cache_dir: str | None = None, progress: bool = True):
        if int(retries) < 0 or int(concurrency) < 1:
            raise JudgeConfigError(f"judge needs retries >= 0 and concurrency >= 1 (got {retries}, {concurrency})")
        if not 0 <= float(consistency_temperature) <= 2:
            raise JudgeConfigError(f"judge.consistency_temperature must be in [0, 2] (got {consistency_temperature})")
        self.client, self.model, self.where = client, client.model, client.where
        self.host = getattr(client, "host", None) or getattr(client, "base_url", "")
        self._style: JudgeStyle = get_style(style)
        self.style, self.seed, self.harden = self._style.name, int(seed), bool(harden)
        self.self_consistency, self.progress = bool(self_consistency), progress
        self.json_format, self.concurrency = bool(json_format), int(concurrency)
        self.options = SendOptions(float(temperature), int(seed), int(num_predict or self._style.num_predict),
                                   int(num_ctx) if num_ctx else None,
                                   self._style.json_schema if json_format else None)
        self.second_options = SendOptions(float(consistency_temperature), int(seed) + 1, self.options.max_tokens,
                                          self.options.num_ctx, self.options.json_schema)
        self.cache = ResponseCache(cache_dir or default_cache_dir()) if cache else None
        self._retry = Retrier(int(retries), float(backoff_s))
        self._digest: str | None = None
        self._lock = threading.Lock()
        self._failed_in_a_row = 0

    # -- identity (comparability keys) --------------------------------------------------------------
    @property
    def digest(self) -> str:
        """The judge model's digest (Ollama) or served id (OpenAI API), fetched once; also checks the
        server is up and serves the model (JudgeConfigError otherwise)."""
        with self._lock:
            if self._digest is None:
                self._digest = self.client.identity(self._retry)
        return self._digest

    @property
    def prompt_template(self) -> str:
        """Everything of the single-answer prompt but the texts: part of a judged task's version."""
        s = self._style
        return json.dumps({"style": s.name, "system": s.system, "template": s.template,
                           "format": self.options.json_schema, "harden": FENCE_NOTE if self.harden else None},
                          sort_keys=True)

    # -- hardening, for tasks that write their own prompts ---------------------------------------
    def fence(self, answer: str) -> str:
        """`answer` between per-answer markers when hardening is on, else unchanged."""
        return fence(answer, self.seed) if self.harden else answer

    def system(self, prompt: str) -> str:
        """A system prompt with the note that fenced text is data, when hardening is on."""
        return f"{prompt} {FENCE_NOTE}".strip() if self.harden else prompt

    # -- asking -------------------------------------------------------------------------------------
    def ask(self, messages: Messages, second: bool = False, max_tokens: int | None = None,
            schema: dict | None = None) -> Reply:
        """One reply. `schema`: the reply's JSON schema for this prompt, used when judge.json_format is
        on (a task's verdict shape, e.g. {"verdict": "[[A]]"}); the server enforces it by grammar, so
        even a small judge always answers in a form the task can read."""
        options = self.second_options if second else self.options
        if max_tokens or (schema and self.json_format):
            options = SendOptions(options.temperature, options.seed, int(max_tokens or options.max_tokens),
                                  options.num_ctx, schema if schema and self.json_format else options.json_schema)
        prompt_hash = sha256_json(messages)[:16]
        key = sha256_json({"model": self.model, "digest": self.digest, "options": options.as_key(),
                           "messages": messages})
        hit = self.cache.get(key) if self.cache else None
        if hit is not None and isinstance(hit.get("raw"), str):
            return Reply(hit["raw"], prompt_hash, cached=True)
        try:
            raw = self._send(messages, options)
        except Exhausted as e:                          # never cached: a rerun asks again
            return Reply("", prompt_hash, str(e), transient=True)
        if self.cache:                                  # a full or read-only disk costs speed, not scores
            self.cache.put_quietly(key, {"raw": raw, "model": self.model, "digest": self.digest})
        return Reply(raw, prompt_hash)

    def _send(self, messages: Messages, options: SendOptions) -> str:
        attempts = 1 if self._failed_in_a_row >= 2 else self._retry.retries + 1   # server looks down
        try:
            raw = self._retry.call(lambda: self.client.send(messages, options), attempts, what="judge request")
        except Exhausted:
            self._failed_in_a_row += 1
            raise
        except Exception as e:
            if status_of(e) is None:                    # not an HTTP answer: a bug, raised as it is
                raise
            raise self.client.refused(e) from None
        self._failed_in_a_row = 0
        return raw

    def ask_many(self, conversations: Sequence[Messages], second: bool = False,
                 max_tokens: int | None = None, desc: str = "", schema: dict | None = None) -> list[Reply]:
        """Replies in the order of `conversations`, `concurrency` requests in flight."""
        conversations = list(conversations)
        if not conversations:
            return []
        _ = self.digest                                  # configuration errors before any work
        replies = map_ordered(lambda m: self.ask(m, second, max_tokens, schema), conversations, self.concurrency,
                              desc=desc or f"judge {self.model}", progress=self.progress)
        log.info("judge %s: %d asked, %d from cache, %d failed", self.model, len(replies),
                 sum(r.cached for r in replies), sum(r.transient for r in replies))
        return replies

    # -- single-answer grading (the style's prompt) -------------------------------------------------
    def render(self, item: Item) -> Messages:
        return render(self._style, *item, harden=self.harden, seed=self.seed)

    def read(self, reply: Reply) -> Grade:
        """A reply as a Grade, parsed now (a parser fix applies to cached replies too)."""
        if reply.error is not None:
            return Grade(None, "", reply.prompt_hash, None, reply.error, reply.cached, reply.transient)
        p = parse_reply(self._style, reply.raw)
        return Grade(p.score, reply.raw, reply.prompt_hash, p.parse, p.error, reply.cached)

    def grade(self, instruction: str, reference: str, response: str) -> Grade:
        return self.read(self.ask(self.render((instruction, reference, response))))

    def grade_many(self, items: Sequence[Item], second: bool = False) -> list[Grade]:
        return [self.read(r) for r in self.ask_many([self.render(i) for i in items], second)]


def agreement(first: Sequence, second: Sequence) -> tuple[float, int]:
    """(share of samples whose two verdicts are equal, samples with both verdicts): self-consistency.
    A sample unscored in either pass has no verdict pair and does not count."""
    pairs = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
    return (sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")), len(pairs)


def OllamaJudge(host: str = "http://127.0.0.1:11434", model: str = "llama3.1:8b", timeout: float = 120,
                **options) -> Judge:
    """The `conf/judge/ollama.yaml` target; `options` are Judge's keywords."""
    _check_timeout(timeout)
    return Judge(OllamaClient(host, model, float(timeout)), **options)


def OpenAIJudge(base_url: str = "http://127.0.0.1:8000/v1", model: str = "gpt-4o-mini", timeout: float = 120,
                api_key_env: str | None = "OPENAI_API_KEY", **options) -> Judge:
    """The `conf/judge/openai.yaml` target: any OpenAI-compatible server; `options` are Judge's keywords."""
    _check_timeout(timeout)
    options.pop("num_ctx", None)                         # the OpenAI API has no context-window option
    return Judge(OpenAIClient(base_url, model, float(timeout), api_key_env), num_ctx=None, **options)


def _check_timeout(timeout) -> None:
    if float(timeout) <= 0:
        raise JudgeConfigError(f"judge.timeout must be > 0 (got {timeout})")


__all__ = ["Grade", "Judge", "JudgeConfigError", "OllamaJudge", "OpenAIJudge", "Reply", "agreement"]
