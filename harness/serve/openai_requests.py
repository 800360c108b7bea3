"""OpenAI request bodies -> validated requests (ChatRequest, CompletionRequest, EmbeddingRequest),
the chat prompt, and the context-length check. Pure: no HTTP, no torch; openai_api's docstring
lists what each endpoint accepts and refuses."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from harness.serve.openai_api import (COMPLETIONS_MAX_TOKENS, MAX_EMBEDDING_INPUTS, MAX_LEGACY_LOGPROBS,
                                      MAX_TOP_LOGPROBS, ApiError, ServedModel)
from harness.serve.openai_fields import (Sampling, int_field, model_field, only_one, sampling_fields, shown,
                                         stream_fields, typed, unsupported)


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
    v = typed(v, "response_format", (dict,))
    if v is None:
        return None
    kind = typed(v.get("type"), "response_format.type", (str,), "")
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonFormat(schema={"type": "object"}, kind="json_object")
    if kind == "json_schema":
        spec = typed(v.get("json_schema"), "response_format.json_schema", (dict,))
        if spec is None:
            raise ApiError(400, "Missing required parameter: 'response_format.json_schema'.",
                           param="response_format.json_schema", code="missing_required_parameter")
        name = typed(spec.get("name"), "response_format.json_schema.name", (str,), "")
        if not _SCHEMA_NAME.match(name):
            raise ApiError(400, "Invalid 'response_format.json_schema.name': it must be 1 to 64 letters, "
                                "digits, underscores or dashes.", param="response_format.json_schema.name",
                           code="invalid_value")
        schema = typed(spec.get("schema"), "response_format.json_schema.schema", (dict,), {})
        strict = typed(spec.get("strict"), "response_format.json_schema.strict", (bool,), False)
        return JsonFormat(schema=schema, name=name, strict=strict)
    raise ApiError(400, f"Invalid value for 'response_format.type': {shown(v.get('type'))}. Supported values "
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
    v = typed(v, f"{where}content", (str, list))
    if isinstance(v, str):
        return v
    texts = []
    for j, part in enumerate(v):
        p = f"{where}content[{j}]"
        part = typed(part, p, (dict,))
        kind = typed(part.get("type"), f"{p}.type", (str,), "")
        if kind in ("text", "refusal"):
            texts.append(typed(part.get(kind), f"{p}.{kind}", (str,), ""))
        elif kind in ("image_url", "input_audio", "file", "image", "audio"):
            raise ApiError(400, f"Invalid content type '{kind}' in '{p}': this model reads text only.",
                           param=f"{p}.type", code="unsupported_content")
        else:
            raise ApiError(400, f"Invalid value for '{p}.type': {shown(part.get('type'))}.", param=f"{p}.type",
                           code="invalid_value")
    return "".join(texts)


def parse_chat(body: dict, served: ServedModel) -> ChatRequest:
    """POST /v1/chat/completions. The messages keep their roles ("developer" becomes "system");
    `chat_prompt` renders them."""
    model = model_field(body, served)
    raw = typed(body.get("messages"), "messages", (list,))
    if raw is None:
        raise ApiError(400, "Missing required parameter: 'messages'.", param="messages",
                       code="missing_required_parameter")
    if not raw:
        raise ApiError(400, "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                       param="messages", code="empty_array")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]."
        m = typed(m, f"messages[{i}]", (dict,))
        role = typed(m.get("role"), where + "role", (str,), "")
        if role not in _ROLES:
            raise ApiError(400, f"Invalid value for '{where}role': {shown(m.get('role'))}. Supported values are: "
                                "'system', 'developer', 'user', 'assistant' and 'tool'.",
                           param=where + "role", code="invalid_value")
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content(m.get("content"), where, role)})
    stream, include_usage = stream_fields(body)
    only_one(body, "n")
    if typed(body.get("tools"), "tools", (list,), []):
        raise unsupported("tools", "this model answers in text only")
    if typed(body.get("functions"), "functions", (list,), []):
        raise unsupported("functions", "this model answers in text only")
    max_tokens = int_field(body, "max_completion_tokens", None, low=1)
    if max_tokens is None:
        max_tokens = int_field(body, "max_tokens", None, low=1)
    logprobs = typed(body.get("logprobs"), "logprobs", (bool,), False)
    top = int_field(body, "top_logprobs", None, low=0, high=MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise ApiError(400, "Invalid value for 'top_logprobs': 'logprobs' must be true when 'top_logprobs' "
                            "is set.", param="top_logprobs", code="invalid_value")
    return ChatRequest(model=model, messages=tuple(messages), stream=stream, include_usage=include_usage,
                       sampling=sampling_fields(body, max_tokens), logprobs=logprobs, top_logprobs=top or 0,
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
                                f"{shown(t)}.", param=name, code="invalid_type")
        if not 0 <= t < vocab_size:
            raise ApiError(400, f"Invalid '{name}[{j}]': token id {t} is outside the vocabulary "
                                f"[0, {vocab_size}).", param=name, code="invalid_value")
    return tuple(v)


def _texts_or_ids(v: Any, name: str, vocab_size: int, allow_empty: bool) -> tuple[str | tuple[int, ...], ...]:
    """A string, an array of token ids, or an array of either (OpenAI's prompt / input)."""
    v = typed(v, name, (str, list))
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
        item = typed(item, where, (str, list))
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
    model = model_field(body, served)
    prompts = _texts_or_ids(body.get("prompt"), "prompt", served.vocab_size, allow_empty=True)
    stream, include_usage = stream_fields(body)
    only_one(body, "n")
    only_one(body, "best_of")
    if typed(body.get("suffix"), "suffix", (str,), ""):
        raise unsupported("suffix", "this model has no fill-in-the-middle mode")
    echo = typed(body.get("echo"), "echo", (bool,), False)
    logprobs = int_field(body, "logprobs", None, low=0, high=MAX_LEGACY_LOGPROBS)
    max_tokens = int_field(body, "max_tokens", COMPLETIONS_MAX_TOKENS, low=0)
    if max_tokens == 0 and not echo:
        raise ApiError(400, "Invalid 'max_tokens': 0. Expected a value greater than or equal to 1 (0 only "
                            "with echo, to score the prompt).", param="max_tokens", code="invalid_value")
    if stream and len(prompts) > 1:
        raise ApiError(400, "Streaming is supported for one prompt at a time; send the prompts in separate "
                            "requests or without 'stream'.", param="prompt", code="invalid_value")
    return CompletionRequest(model=model, prompts=prompts, stream=stream, include_usage=include_usage,
                             sampling=sampling_fields(body, max_tokens), echo=echo, logprobs=logprobs)


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str | tuple[int, ...], ...]
    encoding_format: str = "float"       # "float" | "base64"


def parse_embeddings(body: dict, served: ServedModel) -> EmbeddingRequest:
    """POST /v1/embeddings."""
    model = model_field(body, served)
    inputs = _texts_or_ids(body.get("input"), "input", served.vocab_size, allow_empty=False)
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"Invalid 'input': array too long. Expected an array with maximum length "
                            f"{MAX_EMBEDDING_INPUTS}, but got {len(inputs)} instead.", param="input",
                       code="array_above_max_length")
    fmt = typed(body.get("encoding_format"), "encoding_format", (str,), "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"Invalid value for 'encoding_format': {shown(fmt)}. Supported values are: "
                            "'float' and 'base64'.", param="encoding_format", code="invalid_value")
    dims = int_field(body, "dimensions", None, low=1)
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

