"""The Ollama REST API as data: request bodies -> validated `Job`s, and the response objects. No HTTP
and no torch here: `harness.serve.ollama_routes` does the I/O and `harness.serve.engine` the
generation. Beside it: ollama_fields (typed body fields, 400s), ollama_templates (Go and chat
templates), ollama_model (`ModelCard`: /api/tags, /api/show, /api/ps; /api/pull and the 501s);
their names are importable from here too.

What a request may carry (everything else is accepted and ignored, as Ollama does):
  /api/chat      model, messages [{role, content, images, tool_calls, tool_name}], stream (default
                 true), options, tools: a non-empty list is a 400 "<model> does not support tools"
                 when the chat template has no tool support; otherwise the tools are rendered by the
                 template (`tools=`) and the reply parsed for calls (ollama_tools: <tool_call> tags or
                 a bare {"name", "arguments"}) into message.tool_calls; such a request is generated
                 whole, and streamed as one chunk plus the final one
  /api/generate  model, prompt, system, raw, stream, options,
                 context: token ids of an earlier exchange, decoded and put before the prompt (as
                 Ollama does); the final chunk of a templated (not raw) request carries `context`,
                 the ids of prompt + response, to send back with the next prompt
                 template: a Go template in place of the model's (render_go_template: .System,
                 .Prompt, .Response, if/else/end, comments; anything else is a 400); the model's
                 own template text means the default; suffix: non-empty is a 400 (no fill-in-the-middle)
  both           keep_alive: a number of seconds or a Go duration ("5m", "0"); with nothing to
                 generate, 0 answers done_reason "unload" (the one model stays loaded all the same);
                 format: "json" (any JSON object) or a JSON schema, enforced by the engine's grammar
                 (a schema it cannot compile is a 400; num_predict may still cut the JSON short:
                 done_reason "length"); logprobs (bool) and top_logprobs (0..20): each returned
                 token's log-prob and alternatives in `logprobs` (ollama_logprobs); think: accepted
                 and ignored; non-empty images: 400
  /api/embed, /api/embeddings: harness.serve.ollama_embed
  options        temperature 0.8, top_k 40, top_p 0.9, seed (random when absent or < 0),
                 num_predict -1 (until EOS or the context is full), stop [], num_ctx
Numbers must be finite; seed, top_k, num_predict and num_ctx (>= 1) are integers within Go's int64,
as in Ollama (an integral float such as 4.0 counts). Type and range errors are 400s naming the field:
"options.num_predict must be an integer, got 3.5".
Chat prompts come from the tokenizer's chat template; a model without one gets plain lines
"role: content" and a final "assistant:" to continue from. /api/generate without `raw` wraps the
prompt (and `system`) in the chat template as one user turn; without a template it is sent as is,
after the system text when one is given.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from harness.serve.ollama_fields import ApiError, float_field, int_field, parse_json, shown, typed, typed_field  # noqa: F401
from harness.serve.ollama_model import (UNSUPPORTED, ModelCard, not_supported, parse_pull, pull_progress,  # noqa: F401
                                        requested_model)
from harness.serve.ollama_logprobs import MAX_TOP_LOGPROBS
from harness.serve.ollama_templates import ChatTemplate, render_go_template  # noqa: F401
from harness.serve.ollama_tools import message_extras, parse_tools

DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P = 0.8, 40, 0.9   # Ollama's defaults
GREEDY_BELOW = 1e-5   # a smaller temperature is greedy decoding (vLLM's threshold)



class Abandoned(Exception):
    """A generation given up because its client went away; it stopped after `tokens` tokens."""

    def __init__(self, tokens: int):
        super().__init__(f"abandoned after {tokens} generated tokens")
        self.tokens = tokens


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# ----------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class Sampling:
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    num_predict: int = -1          # < 0: until EOS or the context is full
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None     # None: the server's default


@dataclass(frozen=True)
class Job:
    endpoint: str                  # "chat" | "generate"
    model: str                     # as the client spelled it (echoed back, like Ollama)
    prompt: str | tuple[int, ...] | None   # the text (or token ids) the model continues; None: "load"
    stream: bool
    sampling: Sampling = field(default_factory=Sampling)
    context: tuple[int, ...] = ()  # /api/generate: token ids of an earlier exchange, before the prompt
    want_context: bool = False     # /api/generate without raw: the final chunk carries `context`
    unload: bool = False           # keep_alive 0: a request with nothing to generate answers "unload"
    schema: dict | None = None     # the output must be JSON matching this schema (format / response_format)
    logprobs: int | None = None    # record each generated token's log-prob and this many alternatives
    tools: bool = False            # /api/chat with tools: the reply is parsed for tool calls


def parse_sampling(options: Any) -> Sampling:
    if options is None:
        return Sampling()
    if not isinstance(options, dict):
        raise ApiError(400, f"options must be an object, got {shown(options)}")
    temperature = float_field(options, "temperature", DEFAULT_TEMPERATURE)
    top_p = float_field(options, "top_p", DEFAULT_TOP_P)
    seed = int_field(options, "seed", None)   # negative: a random seed, as in Ollama
    num_ctx = int_field(options, "num_ctx", None, low=1)
    stop = typed_field(options, "stop", (list, str), [], "options.")
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "options.stop must be a string or an array of strings")
    if temperature < 0:
        raise ApiError(400, f"options.temperature must be a number >= 0, got {shown(options['temperature'])}")
    if top_p <= 0 or temperature < GREEDY_BELOW:   # top_p 0 keeps only the most likely token (llama.cpp);
        temperature = 0.0                           # dividing logits by a tiny temperature overflows
    return Sampling(temperature=temperature, top_k=int_field(options, "top_k", DEFAULT_TOP_K), top_p=top_p,
                    seed=seed if seed is None or seed >= 0 else None,
                    num_predict=int_field(options, "num_predict", -1), stop=tuple(s for s in stop if s),
                    num_ctx=num_ctx)


_DURATION = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_UNIT_NS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}


def parse_keep_alive(v: Any) -> float | None:
    """keep_alive in seconds (None: absent; negative: forever), read as Ollama reads it: a JSON number
    is seconds, a string is a Go duration ("5m", "1h30m", "0")."""
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float_field({"keep_alive": v}, "keep_alive", 0.0, where="")
    if not isinstance(v, str):
        raise ApiError(400, f"keep_alive must be a number of seconds or a duration string, got {shown(v)}")
    if v in ("0", "+0", "-0"):
        return 0.0
    if not _DURATION.fullmatch(v):
        raise ApiError(400, f'keep_alive: invalid duration {json.dumps(v)} (expected e.g. "5m", "30s", "0")')
    ns = sum(float(n) * _UNIT_NS[u] for n, u in re.findall(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)", v))
    return -ns / 1e9 if v.startswith("-") else ns / 1e9


@dataclass(frozen=True)
class _Common:
    model: str                     # as spelled
    stream: bool
    sampling: Sampling
    unload: bool                   # keep_alive 0
    schema: dict | None            # format
    logprobs: int | None           # logprobs / top_logprobs


def parse_format(v: Any) -> dict | None:
    """Ollama's `format`: "json" is any JSON object, an object is a JSON schema the reply must match
    (compiled by the engine: a schema it cannot enforce is a 400 there), "" or absent is free text."""
    if v is None or v == "":
        return None
    if v == "json":
        return {"type": "object"}
    if isinstance(v, dict):
        return v
    raise ApiError(400, f'format must be "json" or a JSON schema object, got {shown(v)}')


def parse_logprobs(body: dict) -> int | None:
    """None unless `logprobs` is true; then how many alternatives per token (top_logprobs, 0..20)."""
    top = int_field(body, "top_logprobs", 0, where="", low=0, high=MAX_TOP_LOGPROBS)
    return top if typed_field(body, "logprobs", (bool,), False) else None


def _common(body: dict, card: ModelCard) -> _Common:
    model = requested_model(body, card)
    # think is accepted and ignored: no reasoning split; keep_alive 0 only changes the empty
    # request's answer, the one model stays loaded
    unload = parse_keep_alive(body.get("keep_alive")) == 0
    return _Common(model, typed_field(body, "stream", (bool,), True), parse_sampling(body.get("options")), unload,
                   parse_format(body.get("format")), parse_logprobs(body))


def _reject_images(images: Any, model: str, where: str = "") -> None:
    if images is not None and not isinstance(images, list):
        raise ApiError(400, f"{where}images must be an array, got {shown(images)}")
    if images:
        raise ApiError(400, f"model '{model}' does not support images (it has no vision input); "
                            "send text only")



def _context(v: Any) -> tuple[int, ...]:
    v = typed(v, "context", (list,), [])
    for i, t in enumerate(v):
        if isinstance(t, float) and t.is_integer():
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ApiError(400, f"context[{i}] must be a token id (an integer >= 0), got {shown(v[i])}")
    return tuple(int(t) for t in v)


def parse_generate(body: dict, card: ModelCard, template: ChatTemplate) -> Job:
    c = _common(body, card)
    model, stream, sampling, unload = c.model, c.stream, c.sampling, c.unload
    prompt = typed_field(body, "prompt", (str,), "")
    system = typed_field(body, "system", (str,), "")
    raw = typed_field(body, "raw", (bool,), False)
    if typed_field(body, "suffix", (str,), ""):
        raise ApiError(400, f"{model} does not support insert (suffix): harness.serve has no "
                            "fill-in-the-middle; send the text before the gap as the prompt")
    custom = typed_field(body, "template", (str,), "")
    if custom.strip() == card.template.strip():
        custom = ""   # the model's own: the default path
    context = _context(body.get("context"))
    _reject_images(body.get("images"), model)
    if custom and not raw:   # checked even for an empty prompt, as a bad field always is
        rendered = render_go_template(custom, {"System": system, "Prompt": prompt, "Response": ""})
    if not prompt:
        return Job("generate", model, None, stream, sampling, unload=unload)
    if not raw:
        prompt = rendered if custom else template.generate(prompt, system)
    return Job("generate", model, prompt, stream, sampling, context=context, want_context=not raw,
               schema=c.schema, logprobs=c.logprobs)


def parse_chat(body: dict, card: ModelCard, template: ChatTemplate) -> Job:
    c = _common(body, card)
    model = c.model
    tools = parse_tools(body, model, card.supports_tools)
    messages = typed_field(body, "messages", (list,), [])
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]."
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object, got {shown(m)}")
        role = typed_field(m, "role", (str,), "", where)
        if not role:
            raise ApiError(400, f"{where}role is required: system, user, assistant or tool")
        _reject_images(m.get("images"), model, where)
        clean.append({"role": role, "content": typed_field(m, "content", (str,), "", where), **message_extras(m, where)})
    if not clean:
        return Job("chat", model, None, c.stream, c.sampling, unload=c.unload)
    return Job("chat", model, template.chat(clean, tools), c.stream, c.sampling, schema=c.schema,
               logprobs=c.logprobs, tools=bool(tools))


# ----------------------------------------------------------------------------- responses

@dataclass
class Outcome:
    """One finished generation; durations in nanoseconds, as Ollama reports them."""
    text: str
    done_reason: str               # "stop" (EOS or a stop string) | "length"
    prompt_eval_count: int
    eval_count: int
    load_duration: int             # waiting for the model (other requests hold it)
    prompt_eval_duration: int      # prefill and the first token
    eval_duration: int             # every later token
    total_duration: int = 0
    context: list[int] | None = None   # token ids of prompt + response (Job.want_context)
    tokens: list[int] = field(default_factory=list)   # the generated ids (EOS excluded)
    scores: list | None = None     # Job.logprobs: a TokenScore (harness.serve.openai_responses) per generated token


def chunk(job: Job, text: str, done: bool = False, logprobs: list[dict] | None = None,
          tool_calls: list[dict] | None = None) -> dict:
    out = {"model": job.model, "created_at": now_rfc3339()}
    if job.endpoint == "chat":
        out["message"] = {"role": "assistant", "content": text, **({"tool_calls": tool_calls} if tool_calls else {})}
    else:
        out["response"] = text
    out["done"] = done
    if logprobs:
        out["logprobs"] = logprobs
    return out


def final(job: Job, outcome: Outcome, text: str, logprobs: list[dict] | None = None,
          tool_calls: list[dict] | None = None) -> dict:
    """The last stream line (text "") or the whole non-streamed answer (text = all of it)."""
    return {**chunk(job, text, True, logprobs, tool_calls), "done_reason": outcome.done_reason,
            "total_duration": outcome.total_duration, "load_duration": outcome.load_duration,
            "prompt_eval_count": outcome.prompt_eval_count,
            "prompt_eval_duration": outcome.prompt_eval_duration,
            "eval_count": outcome.eval_count, "eval_duration": outcome.eval_duration,
            **({"context": outcome.context} if outcome.context is not None else {})}


def loaded(job: Job) -> dict:
    """Ollama's answer to a request with nothing to generate: the model is (already) loaded, or with
    keep_alive 0 "unload" (harness.serve keeps its one model all the same)."""
    return {**chunk(job, "", done=True), "done_reason": "unload" if job.unload else "load"}
