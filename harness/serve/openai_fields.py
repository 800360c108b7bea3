"""Validating an OpenAI request's fields: the JSON body, typed and ranged fields with OpenAI's error
messages and params, and the fields both completion endpoints share (model, stream, sampling, n).
Pure: no HTTP, no torch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from harness.serve.json_body import BodyError, decode_object, json_type, shown, wrong_kind  # noqa: F401
from harness.serve.openai_api import (DEFAULT_TEMPERATURE, DEFAULT_TOP_P, GREEDY_BELOW, INT64_MAX, INT64_MIN,
                                      ApiError, ServedModel, model_not_found)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400."""
    try:
        return decode_object(raw)
    except BodyError as e:
        reason = str(e)
        if reason.startswith("must be"):
            raise ApiError(400, f"The request body {reason}") from None
        raise ApiError(400, f"We could not parse the JSON body of your request: {reason}") from None


def typed(v: Any, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """v checked against JSON kinds (None, i.e. absent or null: default; bools are not numbers)."""
    if v is None:
        return default
    want = wrong_kind(v, kinds)
    if want:
        raise ApiError(400, f"Invalid type for '{name}': expected {want}, but got {shown(v)}.", param=name,
                       code="invalid_type")
    return v


def int_field(obj: dict, key: str, default: int | None, where: str = "", low: int = INT64_MIN,
         high: int = INT64_MAX) -> int | None:
    """An integer field (4.0 counts as 4); out of [low, high]: a 400."""
    v = obj.get(key)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    v = typed(v, where + key, (int,), default)
    if v is not None and not low <= v <= high:
        raise _range(where + key, v, low, high)
    return v


def float_field(obj: dict, key: str, default: float, low: float, high: float, where: str = "") -> float:
    v = typed(obj.get(key), where + key, (int, float), default)
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
    return ApiError(400, f"Invalid '{name}': {shown(v)}. Expected a value {bound}.", param=name,
                    code="invalid_value")


def unsupported(name: str, what: str) -> ApiError:
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


def model_field(body: dict, served: ServedModel) -> str:
    model = typed(body.get("model"), "model", (str,), "")
    if not model:
        raise ApiError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
    if not served.matches(model):
        raise model_not_found(model)
    return model


def stream_fields(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = typed(body.get("stream"), "stream", (bool,), False)
    options = typed(body.get("stream_options"), "stream_options", (dict,))
    if options is not None and not stream:
        raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       param="stream_options", code="invalid_value")
    include_usage = typed((options or {}).get("include_usage"), "stream_options.include_usage", (bool,), False)
    return stream, include_usage


def sampling_fields(body: dict, max_tokens: int | None) -> Sampling:
    temperature = float_field(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0)
    top_p = float_field(body, "top_p", DEFAULT_TOP_P, 0.0, 1.0)
    top_k = int_field(body, "top_k", None)
    if top_k is not None and top_k <= 0:    # vLLM: -1 (or 0) means off
        top_k = None
    seed = int_field(body, "seed", None)
    stop = typed(body.get("stop"), "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    for i, s in enumerate(stop):
        typed(s, f"stop[{i}]", (str,))
    for name in ("presence_penalty", "frequency_penalty"):
        if float_field(body, name, 0.0, -2.0, 2.0) != 0:
            raise unsupported(name, "only 0 (no penalty) is")
    bias = typed(body.get("logit_bias"), "logit_bias", (dict,), {})
    if bias:
        raise unsupported("logit_bias", "send none")
    if top_p <= 0 or temperature < GREEDY_BELOW:
        temperature = 0.0
    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k,
                    seed=None if seed is None else seed % (1 << 64),   # torch takes [0, 2**64)
                    max_tokens=max_tokens, stop=tuple(s for s in stop if s))


def only_one(body: dict, name: str) -> None:
    v = int_field(body, name, 1, low=1, high=128)
    if v != 1:
        raise unsupported(name, "this server returns one choice per prompt; send 1 or leave it out")

