"""Checking the fields of an Ollama request body: JSON in (parse_json, lone surrogates as Go reads
them), typed fields out, with 400s that name the field and what it must be. Shared by every Ollama
route's parser (harness.serve.ollama_api); no HTTP, no torch."""
from __future__ import annotations

import json
import math
import re
from typing import Any


class ApiError(Exception):
    """An error answered as {"error": message} with an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message



def parse_json(raw: bytes) -> dict:
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        body = json.loads(raw)
        if _SURROGATE_ESCAPE.search(raw):
            body = _no_lone_surrogates(body)
    except (UnicodeDecodeError, ValueError) as e:   # ValueError: also an integer over 4300 digits
        raise ApiError(400, f"invalid JSON body: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {json_type(body)}")
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _no_lone_surrogates(v: Any) -> Any:
    """An unpaired surrogate escape ("\\ud800") becomes U+FFFD, as Go's JSON decoder (Ollama's) makes
    it; Python keeps it, and the tokenizer then fails on a str that is not valid Unicode."""
    if isinstance(v, str):
        return v.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(v, list):
        return [_no_lone_surrogates(x) for x in v]
    if isinstance(v, dict):
        return {_no_lone_surrogates(k): _no_lone_surrogates(x) for k, x in v.items()}
    return v


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1   # Go's int: what Ollama's integer options are
_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
          dict: "an object"}


def json_type(v: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if v is None else names.get(type(v), type(v).__name__)


def shown(v: Any) -> str:
    """A bad value in a message: numbers and booleans as written in JSON (cut when long), short
    strings quoted, anything else by its JSON type."""
    if isinstance(v, (bool, int, float)):
        text = json.dumps(v)
        return text if len(text) <= 24 else f"{text[:20]}... ({len(text.lstrip('-'))} digits)"
    if isinstance(v, str) and len(v) <= 24:
        return f"string {json.dumps(v)}"
    return json_type(v)


def typed(v: Any, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """v checked against JSON kinds (None = absent: default; bools are not numbers); a 400 naming
    the field otherwise."""
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        want = " or ".join(dict.fromkeys(_KINDS[k] for k in kinds if not (k is int and float in kinds)))
        raise ApiError(400, f"{name} must be {want}, got {shown(v)}")
    return v


def typed_field(obj: dict, key: str, kinds: tuple[type, ...], default: Any = None, where: str = "") -> Any:
    return typed(obj.get(key), where + key, kinds, default)


def int_field(obj: dict, key: str, default: int | None, where: str = "options.", low: int = INT64_MIN,
         high: int = INT64_MAX) -> int | None:
    """An integer field. JSON has one number type, so 4.0 counts as 4 (Ollama takes it too); 4.5, true
    and values outside [low, high] are 400s. The default range is Go's int64, the type Ollama decodes
    these into (past 2**64 a seed overflowed torch's generator, a 500)."""
    v = obj.get(key)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    v = typed(v, where + key, (int,), default)
    if v is not None and not low <= v <= high:
        raise ApiError(400, f"{where}{key} must be an integer between {low} and {high}, got {shown(v)}")
    return v


def float_field(obj: dict, key: str, default: float, where: str = "options.") -> float:
    """A finite number field (an integer too large for a float is not one)."""
    v = typed_field(obj, key, (int, float), default, where)
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ApiError(400, f"{where}{key} must be a finite number, got {shown(v)}")
    return f

