"""The OpenAI REST API as data: request bodies -> validated requests, and the response objects, in
the shapes of the `openai` package's types (tests/test_openai_api.py parses every builder's output
with them). No HTTP and no torch here, like harness/ollama_api.py; the server does the I/O and the
model work (harness/serve/scoring.py: log-probs and embeddings).

Endpoints and what a request may carry (unknown fields are accepted and ignored, as OpenAI does):
  /v1/chat/completions  model, messages [{role, content}] (content a string or text parts), stream,
                        stream_options.include_usage, stop (string or strings), seed, temperature
                        (0-2, default 1), top_p (0-1, default 1), top_k (an extension, as in vLLM),
                        max_completion_tokens or max_tokens (>= 1; the former wins), n (1 only),
                        response_format {type: text | json_object | json_schema}, logprobs (bool) and
                        top_logprobs (0-20)
  /v1/completions       model, prompt (a string, token ids, or an array of either), echo, logprobs
                        (0-5, legacy shape), max_tokens (default 16; 0 only with echo: scoring the
                        prompt alone, lm-eval's local-completions), stop, seed, temperature, top_p,
                        top_k, n and best_of (1 only), stream, stream_options
  /v1/embeddings        model, input (a string, token ids, or an array of either; at most 2048),
                        encoding_format (float | base64: little-endian float32, as the SDK decodes),
                        dimensions (only the model's own)
  /v1/models            the one served model
Refused with a 400 naming the parameter, rather than silently ignored since they would change what
comes back: n > 1, best_of > 1, non-zero presence/frequency penalties, logit_bias, non-empty tools,
suffix, non-text message content (images, audio), other dimensions.
Errors are OpenAI's body {"error": {"message", "type", "param", "code"}} (`error_body`).
"""
from __future__ import annotations

import base64
import json
import math
import re
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 1.0, 1.0     # OpenAI's defaults
COMPLETIONS_MAX_TOKENS = 16                       # /v1/completions' default max_tokens (OpenAI's)
GREEDY_BELOW = 1e-5        # a smaller temperature is greedy decoding (as harness.ollama_api)
MAX_TOP_LOGPROBS, MAX_LEGACY_LOGPROBS = 20, 5
MAX_EMBEDDING_INPUTS = 2048
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


class ApiError(Exception):
    """An error answered with `error_body(e)` and HTTP status `status`. param: the request field at
    fault (OpenAI's "param"), code: OpenAI's machine-readable code (e.g. "model_not_found")."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(e: ApiError) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def server_error(message: str = "The server had an error while processing your request.") -> ApiError:
    """A 500 for an unexpected failure (the server logs the traceback; the client gets this)."""
    return ApiError(500, message, type="server_error")


def not_found(path: str) -> ApiError:
    """OpenAI's answer to an unknown route (the server's 404 handler under /v1)."""
    return ApiError(404, f"Invalid URL ({path})", code="unknown_url")


def method_not_allowed(method: str, path: str) -> ApiError:
    return ApiError(405, f"Method {method} not allowed for {path}", code="method_not_allowed",
                    type="invalid_request_error")


# ----------------------------------------------------------------------------- the served model

@dataclass(frozen=True)
class ServedModel:
    """What the OpenAI routes need to know of the one served model."""
    id: str                          # as /v1/models lists it ("x:latest", Ollama's naming)
    context_length: int              # prompt + completion tokens
    vocab_size: int                  # token-id prompts must be below it
    embedding_dim: int               # /v1/embeddings' vector length (the model's d_model)
    created: int = field(default_factory=lambda: int(time.time()))   # Unix seconds (weights' mtime)
    owned_by: str = "harness"
    fingerprint: str = ""            # system_fingerprint: see `fingerprint`

    def matches(self, requested: str) -> bool:
        """Ollama's naming, as /api: "x" means "x:latest"; case does not matter."""
        tag = self.id if ":" in self.id else f"{self.id}:latest"
        requested = requested if ":" in requested else f"{requested}:latest"
        return requested.lower() == tag.lower()


def fingerprint(weights_digest: str, extra: str = "") -> str:
    """system_fingerprint: "fp_" + 10 hex digits naming the weights (and `extra`: dtype, device),
    so that a client can tell when the same seed may no longer give the same answer."""
    import hashlib
    return "fp_" + hashlib.sha256(f"{weights_digest}|{extra}".encode()).hexdigest()[:10]


def models_list(served: ServedModel) -> dict:
    """GET /v1/models."""
    return {"object": "list", "data": [model_object(served)]}


def model_object(served: ServedModel) -> dict:
    """GET /v1/models/{id} (answer `model_not_found(id)` when not served.matches(id))."""
    return {"id": served.id, "object": "model", "created": served.created, "owned_by": served.owned_by}


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


# ----------------------------------------------------------------------------- request parsing

def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400."""
    if not raw.strip():
        raise ApiError(400, "We could not parse the JSON body of your request: the body is empty.")
    try:
        body = json.loads(raw)
        if _SURROGATE_ESCAPE.search(raw):
            body = _no_lone_surrogates(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request: {e}") from None
    except RecursionError:
        raise ApiError(400, "We could not parse the JSON body of your request: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {_json_type(body)}")
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _no_lone_surrogates(v: Any) -> Any:
    """An unpaired surrogate escape becomes U+FFFD: a str the tokenizer can encode."""
    if isinstance(v, str):
        return v.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(v, list):
        return [_no_lone_surrogates(x) for x in v]
    if isinstance(v, dict):
        return {_no_lone_surrogates(k): _no_lone_surrogates(x) for k, x in v.items()}
    return v


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
          dict: "an object"}


def _json_type(v: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if v is None else names.get(type(v), type(v).__name__)


def _shown(v: Any) -> str:
    if isinstance(v, (bool, int, float)):
        text = json.dumps(v)
        return text if len(text) <= 24 else f"{text[:20]}... ({len(text.lstrip('-'))} digits)"
    if isinstance(v, str) and len(v) <= 24:
        return f"string {json.dumps(v)}"
    return _json_type(v)


def _typed(v: Any, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """v checked against JSON kinds (None, i.e. absent or null: default; bools are not numbers)."""
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        want = " or ".join(dict.fromkeys(_KINDS[k] for k in kinds if not (k is int and float in kinds)))
        raise ApiError(400, f"Invalid type for '{name}': expected {want}, but got {_shown(v)}.", param=name,
                       code="invalid_type")
    return v


def _int(obj: dict, key: str, default: int | None, where: str = "", low: int = INT64_MIN,
         high: int = INT64_MAX) -> int | None:
    """An integer field (4.0 counts as 4); out of [low, high]: a 400."""
    v = obj.get(key)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    v = _typed(v, where + key, (int,), default)
    if v is not None and not low <= v <= high:
        raise _range(where + key, v, low, high)
    return v


def _float(obj: dict, key: str, default: float, low: float, high: float, where: str = "") -> float:
    v = _typed(obj.get(key), where + key, (int, float), default)
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f) or not low <= f <= high:
        raise _range(where + key, v, low, high)
    return f


def _range(name: str, v: Any, low: float, high: float) -> ApiError:
    if low > INT64_MIN and high >= INT64_MAX:
        bound = f"greater than or equal to {low}"
    elif low <= INT64_MIN and high < INT64_MAX:
        bound = f"less than or equal to {high}"
    else:
        bound = f"between {low} and {high}"
    return ApiError(400, f"Invalid '{name}': {_shown(v)}. Expected a value {bound}.", param=name,
                    code="invalid_value")


def _unsupported(name: str, what: str) -> ApiError:
    return ApiError(400, f"'{name}' is not supported by this server: {what}", param=name,
                    code="unsupported_parameter")


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by both completion endpoints."""
    temperature: float = DEFAULT_TEMPERATURE   # 0: greedy
    top_p: float = DEFAULT_TOP_P
    top_k: int | None = None                   # None: off (an extension; OpenAI has no top_k)
    seed: int | None = None                    # None: unseeded
    max_tokens: int | None = None              # None: until EOS or the context is full
    stop: tuple[str, ...] = ()


def _model(body: dict, served: ServedModel) -> str:
    model = _typed(body.get("model"), "model", (str,), "")
    if not model:
        raise ApiError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
    if not served.matches(model):
        raise model_not_found(model)
    return model


def _stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _typed(body.get("stream"), "stream", (bool,), False)
    options = _typed(body.get("stream_options"), "stream_options", (dict,))
    if options is not None and not stream:
        raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       param="stream_options", code="invalid_value")
    include_usage = _typed((options or {}).get("include_usage"), "stream_options.include_usage", (bool,), False)
    return stream, include_usage


def _sampling(body: dict, max_tokens: int | None) -> Sampling:
    temperature = _float(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0)
    top_p = _float(body, "top_p", DEFAULT_TOP_P, 0.0, 1.0)
    top_k = _int(body, "top_k", None)
    if top_k is not None and top_k <= 0:    # vLLM: -1 (or 0) means off
        top_k = None
    seed = _int(body, "seed", None)
    stop = _typed(body.get("stop"), "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    for i, s in enumerate(stop):
        _typed(s, f"stop[{i}]", (str,))
    for name in ("presence_penalty", "frequency_penalty"):
        if _float(body, name, 0.0, -2.0, 2.0) != 0:
            raise _unsupported(name, "only 0 (no penalty) is")
    bias = _typed(body.get("logit_bias"), "logit_bias", (dict,), {})
    if bias:
        raise _unsupported("logit_bias", "send none")
    if top_p <= 0 or temperature < GREEDY_BELOW:
        temperature = 0.0
    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k,
                    seed=None if seed is None else seed % (1 << 64),   # torch takes [0, 2**64)
                    max_tokens=max_tokens, stop=tuple(s for s in stop if s))


def _only_one(body: dict, name: str) -> None:
    v = _int(body, name, 1, low=1, high=128)
    if v != 1:
        raise _unsupported(name, "this server returns one choice per prompt; send 1 or leave it out")


@dataclass(frozen=True)
class JsonFormat:
    """A neutral output constraint from response_format: the output must be JSON matching `schema`,
    a JSON Schema ({"type": "object"} for json_object). Enforcing it is the decoder's business."""
    schema: dict
    name: str = ""
    strict: bool = False
    kind: str = "json_schema"        # the response_format type it came from: json_object | json_schema


_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def parse_response_format(v: Any) -> JsonFormat | None:
    """response_format -> None (free text) or a JsonFormat."""
    v = _typed(v, "response_format", (dict,))
    if v is None:
        return None
    kind = _typed(v.get("type"), "response_format.type", (str,), "")
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonFormat(schema={"type": "object"}, kind="json_object")
    if kind == "json_schema":
        spec = _typed(v.get("json_schema"), "response_format.json_schema", (dict,))
        if spec is None:
            raise ApiError(400, "Missing required parameter: 'response_format.json_schema'.",
                           param="response_format.json_schema", code="missing_required_parameter")
        name = _typed(spec.get("name"), "response_format.json_schema.name", (str,), "")
        if not _SCHEMA_NAME.match(name):
            raise ApiError(400, "Invalid 'response_format.json_schema.name': it must be 1 to 64 letters, "
                                "digits, underscores or dashes.", param="response_format.json_schema.name",
                           code="invalid_value")
        schema = _typed(spec.get("schema"), "response_format.json_schema.schema", (dict,), {})
        strict = _typed(spec.get("strict"), "response_format.json_schema.strict", (bool,), False)
        return JsonFormat(schema=schema, name=name, strict=strict)
    raise ApiError(400, f"Invalid value for 'response_format.type': {_shown(v.get('type'))}. Supported values "
                        "are: 'text', 'json_object' and 'json_schema'.", param="response_format.type",
                   code="invalid_value")


@dataclass(frozen=True)
class ChatRequest:
    model: str                           # as the client spelled it (echoed back)
    messages: tuple[dict, ...]           # [{"role", "content": str}] for the chat template
    stream: bool
    include_usage: bool                  # stream_options.include_usage
    sampling: Sampling
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: JsonFormat | None = None


_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _content(v: Any, where: str, role: str) -> str:
    """A message's content: a string, text parts [{type: "text", text}], or null (assistant)."""
    if v is None:
        if role in ("assistant", "tool", "function"):
            return ""
        raise ApiError(400, f"Missing required parameter: '{where}content'.", param=f"{where}content",
                       code="missing_required_parameter")
    v = _typed(v, f"{where}content", (str, list))
    if isinstance(v, str):
        return v
    texts = []
    for j, part in enumerate(v):
        p = f"{where}content[{j}]"
        part = _typed(part, p, (dict,))
        kind = _typed(part.get("type"), f"{p}.type", (str,), "")
        if kind in ("text", "refusal"):
            texts.append(_typed(part.get(kind), f"{p}.{kind}", (str,), ""))
        elif kind in ("image_url", "input_audio", "file", "image", "audio"):
            raise ApiError(400, f"Invalid content type '{kind}' in '{p}': this model reads text only.",
                           param=f"{p}.type", code="unsupported_content")
        else:
            raise ApiError(400, f"Invalid value for '{p}.type': {_shown(part.get('type'))}.", param=f"{p}.type",
                           code="invalid_value")
    return "".join(texts)


def parse_chat(body: dict, served: ServedModel) -> ChatRequest:
    """POST /v1/chat/completions. The messages keep their roles ("developer" becomes "system");
    `chat_prompt` renders them."""
    model = _model(body, served)
    raw = _typed(body.get("messages"), "messages", (list,))
    if raw is None:
        raise ApiError(400, "Missing required parameter: 'messages'.", param="messages",
                       code="missing_required_parameter")
    if not raw:
        raise ApiError(400, "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                       param="messages", code="empty_array")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]."
        m = _typed(m, f"messages[{i}]", (dict,))
        role = _typed(m.get("role"), where + "role", (str,), "")
        if role not in _ROLES:
            raise ApiError(400, f"Invalid value for '{where}role': {_shown(m.get('role'))}. Supported values are: "
                                "'system', 'developer', 'user', 'assistant' and 'tool'.",
                           param=where + "role", code="invalid_value")
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content(m.get("content"), where, role)})
    stream, include_usage = _stream(body)
    _only_one(body, "n")
    if _typed(body.get("tools"), "tools", (list,), []):
        raise _unsupported("tools", "this model answers in text only")
    if _typed(body.get("functions"), "functions", (list,), []):
        raise _unsupported("functions", "this model answers in text only")
    max_tokens = _int(body, "max_completion_tokens", None, low=1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, low=1)
    logprobs = _typed(body.get("logprobs"), "logprobs", (bool,), False)
    top = _int(body, "top_logprobs", None, low=0, high=MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise ApiError(400, "Invalid value for 'top_logprobs': 'logprobs' must be true when 'top_logprobs' "
                            "is set.", param="top_logprobs", code="invalid_value")
    return ChatRequest(model=model, messages=tuple(messages), stream=stream, include_usage=include_usage,
                       sampling=_sampling(body, max_tokens), logprobs=logprobs, top_logprobs=top or 0,
                       response_format=parse_response_format(body.get("response_format")))


def chat_prompt(messages: Sequence[dict], render: Callable[[list[dict]], str] | None) -> str:
    """The text the model continues: the tokenizer's chat template (`render`, e.g. TorchLM.chat_prompt)
    or, without one, lines "role: content" and a final "assistant:" (harness.ollama_api's fallback)."""
    messages = [dict(m) for m in messages]
    if render is None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    try:
        return render(messages)
    except Exception as e:   # the template's raise_exception (roles out of order, no system role)
        raise ApiError(400, f"Cannot apply the model's chat template to these messages: {e}",
                       param="messages", code="invalid_value") from None


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple[str | tuple[int, ...], ...]   # each a text or token ids; choice i answers prompts[i]
    stream: bool
    include_usage: bool
    sampling: Sampling                           # max_tokens is never None here (default 16)
    echo: bool = False
    logprobs: int | None = None                  # None: no logprobs; 0-5: that many alternatives


def _token_ids(v: list, name: str, vocab_size: int) -> tuple[int, ...]:
    for j, t in enumerate(v):
        if isinstance(t, bool) or not isinstance(t, int):
            raise ApiError(400, f"Invalid type for '{name}[{j}]': expected an integer token id, but got "
                                f"{_shown(t)}.", param=name, code="invalid_type")
        if not 0 <= t < vocab_size:
            raise ApiError(400, f"Invalid '{name}[{j}]': token id {t} is outside the vocabulary "
                                f"[0, {vocab_size}).", param=name, code="invalid_value")
    return tuple(v)


def _texts_or_ids(v: Any, name: str, vocab_size: int, allow_empty: bool) -> tuple[str | tuple[int, ...], ...]:
    """A string, an array of token ids, or an array of either (OpenAI's prompt / input)."""
    v = _typed(v, name, (str, list))
    if v is None:
        raise ApiError(400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
    if isinstance(v, str):
        items: list = [v]
    elif v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        items = [v]                                    # one prompt as token ids
    else:
        items = v
    if not items:
        raise ApiError(400, f"Invalid '{name}': empty array. Expected an array with minimum length 1.",
                       param=name, code="empty_array")
    out: list[str | tuple[int, ...]] = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]" if items is v else name
        item = _typed(item, where, (str, list))
        if isinstance(item, list):
            if not item:
                raise ApiError(400, f"Invalid '{where}': empty array of token ids.", param=where, code="empty_array")
            out.append(_token_ids(item, where, vocab_size))
        else:
            if not item and not allow_empty:
                raise ApiError(400, f"Invalid '{where}': empty string.", param=where, code="invalid_value")
            out.append(item)
    return tuple(out)


def parse_completion(body: dict, served: ServedModel) -> CompletionRequest:
    """POST /v1/completions."""
    model = _model(body, served)
    prompts = _texts_or_ids(body.get("prompt"), "prompt", served.vocab_size, allow_empty=True)
    stream, include_usage = _stream(body)
    _only_one(body, "n")
    _only_one(body, "best_of")
    if _typed(body.get("suffix"), "suffix", (str,), ""):
        raise _unsupported("suffix", "this model has no fill-in-the-middle mode")
    echo = _typed(body.get("echo"), "echo", (bool,), False)
    logprobs = _int(body, "logprobs", None, low=0, high=MAX_LEGACY_LOGPROBS)
    max_tokens = _int(body, "max_tokens", COMPLETIONS_MAX_TOKENS, low=0)
    if max_tokens == 0 and not echo:
        raise ApiError(400, "Invalid 'max_tokens': 0. Expected a value greater than or equal to 1 (0 only "
                            "with echo, to score the prompt).", param="max_tokens", code="invalid_value")
    if stream and len(prompts) > 1:
        raise ApiError(400, "Streaming is supported for one prompt at a time; send the prompts in separate "
                            "requests or without 'stream'.", param="prompt", code="invalid_value")
    return CompletionRequest(model=model, prompts=prompts, stream=stream, include_usage=include_usage,
                             sampling=_sampling(body, max_tokens), echo=echo, logprobs=logprobs)


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str | tuple[int, ...], ...]
    encoding_format: str = "float"       # "float" | "base64"


def parse_embeddings(body: dict, served: ServedModel) -> EmbeddingRequest:
    """POST /v1/embeddings."""
    model = _model(body, served)
    inputs = _texts_or_ids(body.get("input"), "input", served.vocab_size, allow_empty=False)
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"Invalid 'input': array too long. Expected an array with maximum length "
                            f"{MAX_EMBEDDING_INPUTS}, but got {len(inputs)} instead.", param="input",
                       code="array_above_max_length")
    fmt = _typed(body.get("encoding_format"), "encoding_format", (str,), "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"Invalid value for 'encoding_format': {_shown(fmt)}. Supported values are: "
                            "'float' and 'base64'.", param="encoding_format", code="invalid_value")
    dims = _int(body, "dimensions", None, low=1)
    if dims is not None and dims != served.embedding_dim:
        raise ApiError(400, f"This model does not support specifying dimensions: its embeddings have "
                            f"{served.embedding_dim}, got {dims}.", param="dimensions", code="invalid_value")
    return EmbeddingRequest(model=model, inputs=inputs, encoding_format=fmt)


def context_error(prompt_tokens: int, max_tokens: int | None, context_length: int,
                  param: str = "messages", echo: bool = False) -> ApiError | None:
    """The 400 OpenAI answers when the prompt does not fit the context, or the prompt plus an
    explicit max_tokens does not (under echo only the prompt must fit: scoring requests ask for one
    token more than they need); None when it fits. The server calls it once it has the prompt's
    tokens, then generates `room(...)` tokens at most."""
    if prompt_tokens <= context_length and (echo or prompt_tokens + (max_tokens or 0) <= context_length):
        return None
    detail = (f" However, you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, "
              f"{max_tokens} in the completion)." if max_tokens and not echo
              else f" However, your {param} resulted in {prompt_tokens} tokens.")
    return ApiError(400, f"This model's maximum context length is {context_length} tokens.{detail} Please "
                         "reduce the length of the prompt or completion.", param=param,
                    code="context_length_exceeded")


def room(prompt_tokens: int, sampling: Sampling, context_length: int) -> int:
    """How many tokens may be generated: max_tokens, or until the context is full."""
    left = max(0, context_length - prompt_tokens)
    return left if sampling.max_tokens is None else min(sampling.max_tokens, left)


# ----------------------------------------------------------------------------- responses

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
