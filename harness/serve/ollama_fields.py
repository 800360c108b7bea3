"""Checking the fields of an Ollama request body: JSON in (parse_json, lone surrogates as Go reads
them), typed fields out, with 400s that name the field and what it must be. Shared by every Ollama
route's parser (harness.serve.ollama_api); no HTTP, no torch."""
from __future__ import annotations

import math
from typing import Any

from harness.serve.json_body import BodyError, decode_object, json_type, shown, wrong_kind  # noqa: F401


class ApiError(Exception):
    """An error answered as {"error": message} with an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message



def parse_json(raw: bytes) -> dict:
    try:
        return decode_object(raw)
    except BodyError as e:
        reason = str(e)
        if reason == "the body is empty":
            raise ApiError(400, "missing request body") from None
        if reason.startswith("must be"):
            raise ApiError(400, f"request body {reason}") from None
        raise ApiError(400, f"invalid JSON body: {reason}") from None


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1   # Go's int: what Ollama's integer options are
def typed(v: Any, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """v checked against JSON kinds (None = absent: default; bools are not numbers); a 400 naming
    the field otherwise."""
    if v is None:
        return default
    want = wrong_kind(v, kinds)
    if want:
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

