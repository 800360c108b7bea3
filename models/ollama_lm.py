"""`model=ollama:<name>`: a model served by Ollama (or harness.serve) as an eval backend, through the
`ollama` client.

    python -m harness task=instruct model=ollama:llama3.1:8b model.host=http://gpu-box:11434

It generates (greedy, stop strings, at most max_new_tokens: options temperature 0, num_predict,
stop, seed): raw text through /api/generate with raw=true, chat prompts (models/api_lm.py
`ChatPrompt`) through /api/chat, rendered by the model's own template on the server. The Ollama API
returns no log-probabilities of a prompt, so loglikelihood tasks (mmlu, ...) are refused with one
line naming the tasks it can run; `model=openai:<name>` with the server's /v1 address scores them
where the server offers prompt log-probabilities.

The model's digest (from /api/tags) is its checkpoint_sha and part of every cache key: answers are
cached on disk (harness.remote), so rerunning the same greedy requests against the same weights
asks the server nothing.
"""
from __future__ import annotations

import logging
from typing import Sequence

from harness.cli import UserError
from harness.judge.host import check_host
from harness.remote import Exhausted
from models.api_lm import ApiLM, ChatPrompt, check_settings
from models.protocol import cut_at_stop

log = logging.getLogger("harness")


def load_ollama_lm(name: str, host: str = "http://127.0.0.1:11434", **options) -> "OllamaLM":
    """The `conf/model/ollama.yaml` target (options: OllamaLM's keywords, as the config names them)."""
    return OllamaLM(str(name), str(host), **options)


class OllamaLM(ApiLM):
    def __init__(self, model: str, host: str, *, timeout: float = 600, retries: int = 3, backoff_s: float = 1.0,
                 concurrency: int = 1, num_ctx: int | None = None, cache: bool = True,
                 cache_dir: str | None = None, progress: bool = True):
        import httpx
        import ollama

        if not model:
            raise UserError("model=ollama: needs a model name after ollama:, e.g. model=ollama:llama3.1:8b")
        check_settings(timeout, retries, backoff_s, concurrency)
        check_host(host, key="model.host")
        super().__init__(name=f"ollama:{model}", where=f"model.host={host}", retries=retries, backoff_s=backoff_s,
                         concurrency=concurrency, cache=cache, cache_dir=cache_dir, progress=progress)
        self.model, self.host, self.num_ctx = model, host, num_ctx
        self.client = ollama.Client(host=host, timeout=httpx.Timeout(float(timeout), connect=min(float(timeout), 10.0)))
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.digest = self._digest()
        self.identity = f"ollama|{self.digest}"
        self.info = {"model": self.name, "checkpoint_sha": self.digest.removeprefix("sha256:")[:12],
                     "digest": self.digest, "server": host, "dtype": "", "device": "",
                     "batch_size": f"{self.concurrency} in flight", "provenance": ""}

    def _digest(self) -> str:
        """The served model's digest from /api/tags; also checks the server is there and has it."""
        from ollama import ResponseError
        try:
            listing = self.retry.call(self.client.list, what=f"{self.name} /api/tags")
        except Exhausted as e:
            raise UserError(f"cannot reach Ollama at model.host={self.host} ({e}); start it there (`ollama "
                            "serve`) or set model.host to a running Ollama server") from None
        except ResponseError as e:
            raise UserError(f"the server at model.host={self.host} does not answer Ollama's /api/tags "
                            f"(HTTP {e.status_code}); set model.host to an Ollama server") from None
        names = [m.model or "" for m in listing.models]
        for m in listing.models:
            if (m.model or "").lower() in (self.model.lower(), f"{self.model}:latest".lower()):
                return m.digest or ""
        have = f" (it has: {', '.join(names)})" if names else ""
        raise UserError(f"model '{self.model}' not found at model.host={self.host}{have}: run "
                        f"`ollama pull {self.model}` there, or name a model from its /api/tags list")

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int | None = None) -> list[str]:
        options: dict = {"temperature": float(temperature), "num_predict": int(max_new_tokens),
                         "stop": [s for s in stop if s]}
        if seed is not None:
            options["seed"] = int(seed)
        if self.num_ctx:
            options["num_ctx"] = int(self.num_ctx)
        repeatable = temperature == 0 or seed is not None

        def one(prompt: str) -> str:
            if isinstance(prompt, ChatPrompt):
                body = {"model": self.model, "messages": prompt.messages, "options": options, "stream": False}
                answer = self.cached("/api/chat", body, self._chat, repeatable)
            else:
                body = {"model": self.model, "prompt": str(prompt), "raw": True, "options": options, "stream": False}
                answer = self.cached("/api/generate", body, self._generate, repeatable)
            return cut_at_stop(answer["text"], stop)

        return self.map(one, list(prompts), "generate")

    def _chat(self, body: dict) -> dict:
        return {"text": self.client.chat(**body).message.content or ""}

    def _generate(self, body: dict) -> dict:
        return {"text": self.client.generate(**body).response or ""}

    def refused(self, endpoint: str, error: Exception) -> Exception:
        if getattr(error, "status_code", None) == 404:
            return UserError(f"model '{self.model}' not found at model.host={self.host}: run `ollama pull "
                             f"{self.model}` there")
        return super().refused(endpoint, error)

    # -- what the Ollama API cannot answer --------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        raise self.no_loglikelihood("the Ollama API returns no log-probabilities of a prompt; "
                                    f"try model=openai:{self.model} model.base_url=<server>/v1")

    def loglikelihood_rolling(self, texts: Sequence[str], *, max_length: int | None = None,
                              stride: int | None = None) -> list[float]:
        raise self.no_loglikelihood("the Ollama API returns no log-probabilities of a prompt; "
                                    f"try model=openai:{self.model} model.base_url=<server>/v1")

    def count_tokens(self, text: str) -> int:
        raise self.no_loglikelihood("the Ollama API has no tokenizer endpoint")
