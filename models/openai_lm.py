"""`model=openai:<name>`: a model behind an OpenAI-compatible API (vLLM, llama.cpp's server, LM Studio,
harness.serve, OpenAI) as an eval backend, through the `openai` SDK.

    python -m harness task=mmlu model=openai:smollm2-135m-instruct model.base_url=http://127.0.0.1:8000/v1
    OPENAI_API_KEY=... python -m harness task=instruct model=openai:gpt-4o-mini \
        model.base_url=https://api.openai.com/v1 model.api_key_env=OPENAI_API_KEY

generate: raw text through /v1/completions, chat prompts (models/api_lm.py `ChatPrompt`) through
/v1/chat/completions; greedy is temperature 0, max_tokens bounds the reply, the first four stop
strings go to the server (the API's limit) and every one is cut here.
loglikelihood and loglikelihood_rolling: /v1/completions with echo, logprobs=1, max_tokens=0, as
lm-eval's local-completions (models/api_lm.py `continuation_logprob`), `batch_size` prompts per
request. A server that refuses echo or returns no prompt log-probs (OpenAI's own chat models, some
servers) stops such a task with one line naming the tasks it can run. A text is scored in one
piece: the server cannot window it, so one longer than `max_length` tokens is refused, and so is a
server that gives the first token no log-prob (no BOS before it), as in-process scoring predicts
that token from BOS/EOS and the numbers would differ.

The key comes from the environment variable named by `api_key_env` (a local server needs none:
"x" is sent). Provenance: the model id from /v1/models, and the `system_fingerprint` the answers
carry becomes checkpoint_sha. Answers are cached on disk (harness.remote), keyed by base_url,
model and request, so a rerun asks the server nothing.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

from harness.cli import UserError
from harness.remote import Exhausted, served_id, status_of
from models.api_lm import ApiLM, ChatPrompt, check_settings, continuation_logprob, text_logprob
from models.protocol import cut_at_stop
from models.requests import move_trailing_space

log = logging.getLogger("harness")
MAX_STOP = 4     # stop strings the OpenAI API accepts in one request


def load_openai_lm(name: str, base_url: str = "http://127.0.0.1:8000/v1", **options) -> "OpenAILM":
    """The `conf/model/openai.yaml` target (options: OpenAILM's keywords, as the config names them)."""
    return OpenAILM(str(name), str(base_url), **options)


class OpenAILM(ApiLM):
    def __init__(self, model: str, base_url: str, *, api_key_env: str | None = None, timeout: float = 600,
                 retries: int = 3, backoff_s: float = 1.0, concurrency: int = 1, batch_size: int = 8,
                 cache: bool = True, cache_dir: str | None = None, progress: bool = True):
        import openai

        if not model:
            raise UserError("model=openai: needs a model name after openai:, e.g. model=openai:gpt-4o-mini")
        check_settings(timeout, retries, backoff_s, concurrency)
        if int(batch_size) < 1:
            raise UserError(f"model.batch_size must be >= 1 (got {batch_size})")
        if not str(base_url).startswith(("http://", "https://")):
            raise UserError(f"model.base_url={base_url!r} is not a server address; a valid value looks like "
                            "http://127.0.0.1:8000/v1")
        super().__init__(name=f"openai:{model}", where=f"model.base_url={base_url}", retries=retries,
                         backoff_s=backoff_s, concurrency=concurrency, cache=cache, cache_dir=cache_dir,
                         progress=progress)
        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not key:
            log.info("%s is not set: sending no API key (fine for a local server)", api_key_env)
        self.model, self.base_url, self.batch_size = model, base_url.rstrip("/"), int(batch_size)
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key or "x", timeout=float(timeout), max_retries=0)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        served = self._model_id()
        self.identity = f"openai|{self.base_url}|{served}"
        self.info = {"model": self.name, "checkpoint_sha": "", "served_model": served, "server": self.base_url,
                     "system_fingerprint": "", "dtype": "", "device": "",
                     "batch_size": f"{self.batch_size}x{self.concurrency}", "provenance": ""}

    def _model_id(self) -> str:
        """The model's id in /v1/models (checks the server is there and serves it)."""
        try:
            served, ids = served_id(lambda: [m.id for m in self.client.models.list()], self.retry, self.model,
                                    "/v1/models")
        except Exhausted as e:
            raise UserError(f"cannot reach the OpenAI-compatible server at model.base_url={self.base_url} ({e}); "
                            "start it, or set model.base_url to its address (ending in /v1)") from None
        except Exception as e:
            if status_of(e) is None:
                raise
            raise self.refused("/v1/models", e) from None
        if served is not None:
            return served
        raise UserError(f"model '{self.model}' is not served at model.base_url={self.base_url} (it serves: "
                        f"{', '.join(ids) or 'nothing'}); use model=openai:<one of those>")

    def _note(self, answer: dict) -> dict:
        fp = answer.get("system_fingerprint")
        if fp and fp != self.info["system_fingerprint"]:
            if self.info["system_fingerprint"]:
                log.warning("%s: the server's system_fingerprint changed from %s to %s mid-run",
                            self.name, self.info["system_fingerprint"], fp)
            self.info["system_fingerprint"] = self.info["checkpoint_sha"] = fp
        return answer

    def refused(self, endpoint: str, error: Exception) -> Exception:
        if status_of(error) in (401, 403):
            return UserError(f"{self.name} at {self.where}: HTTP {status_of(error)}, the API key was refused; "
                             "put it in an environment variable and name it in model.api_key_env")
        if status_of(error) == 404 and "model" in str(error).lower():
            return UserError(f"model '{self.model}' is not served at {self.where}")
        return super().refused(endpoint, error)

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int | None = None) -> list[str]:
        common: dict = {"model": self.model, "temperature": float(temperature), "max_tokens": int(max_new_tokens)}
        if stops := [s for s in stop if s][:MAX_STOP]:
            common["stop"] = stops
        if seed is not None:
            common["seed"] = int(seed)
        repeatable = temperature == 0 or seed is not None

        def one(prompt: str) -> str:
            if isinstance(prompt, ChatPrompt):
                answer = self.cached("/chat/completions", {**common, "messages": prompt.messages},
                                     lambda b: self.client.chat.completions.create(**b).model_dump(), repeatable)
                text = answer["choices"][0]["message"]["content"] or ""
            else:
                answer = self.cached("/completions", {**common, "prompt": str(prompt)},
                                     lambda b: self.client.completions.create(**b).model_dump(), repeatable)
                text = answer["choices"][0]["text"] or ""
            self._note(answer)
            return cut_at_stop(text, stop)

        return self.map(one, list(prompts), "generate")

    # -- prompt log-probabilities -------------------------------------------------------------------
    def _echo(self, texts: list[str], logprobs: int = 1) -> list[dict]:
        """Each text's legacy `logprobs` object from /v1/completions with echo and max_tokens=0."""
        batches = [texts[i:i + self.batch_size] for i in range(0, len(texts), self.batch_size)]

        def one(batch: list[str]) -> list[dict]:
            body = {"model": self.model, "prompt": batch, "echo": True, "logprobs": logprobs, "max_tokens": 0,
                    "temperature": 0}
            answer = self.cached("/completions", body, lambda b: self.client.completions.create(**b).model_dump(),
                                 refused=self._no_echo)
            choices = sorted(self._note(answer)["choices"], key=lambda c: c["index"])
            if len(choices) != len(batch) or any(not c.get("logprobs") for c in choices):
                raise self.no_loglikelihood("the server returned no log-probabilities of the prompt")
            return [c["logprobs"] for c in choices]

        return [lp for part in self.map(one, batches, "score") for lp in part]

    def _no_echo(self, endpoint: str, error: Exception) -> Exception:
        from harness.judge.host import excerpt
        if status_of(error) in (401, 403):
            return self.refused(endpoint, error)
        return self.no_loglikelihood(f"{endpoint} with echo and logprobs answered HTTP {status_of(error)}: "
                                     f"{excerpt(str(error), 200)}")

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        pairs = [move_trailing_space(c, x) for c, x in requests]
        results = self._echo([c + x for c, x in pairs])
        try:
            return [continuation_logprob(lp, len(c), x)[0] for lp, (c, x) in zip(results, pairs)]
        except ValueError as e:
            raise self.no_loglikelihood(f"the server's prompt log-probabilities are incomplete: {e}") from None

    def loglikelihood_rolling(self, texts: Sequence[str], *, max_length: int | None = None,
                              stride: int | None = None) -> list[float]:
        out = []
        for text, lp in zip(texts, self._echo(list(texts))):
            try:
                total, n_tokens = text_logprob(lp, text)
            except ValueError as e:
                raise self.no_loglikelihood(f"the server's prompt log-probabilities are incomplete: {e}") from None
            if total is None:
                raise UserError(f"{self.name}: the server gives a text's first token no log-prob (it puts no BOS "
                                "before it), while in-process scoring predicts it from BOS/EOS; perplexity "
                                "would not be comparable, so it is not computed on this server")
            if max_length and n_tokens > max_length:
                raise UserError(f"{self.name}: a text of {n_tokens} tokens is longer than max_length={max_length}; "
                                "the server scores a text in one piece and cannot window it")
            out.append(total)
        return out

    def count_tokens(self, text: str) -> int:
        try:
            return text_logprob(self._echo([text], logprobs=0)[0], text)[1]
        except ValueError as e:
            raise self.no_loglikelihood(f"the server's prompt log-probabilities are incomplete: {e}") from None
