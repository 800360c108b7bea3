"""What both APIs do to a request body before their own rules apply: bytes -> a JSON object (lone
surrogate escapes made U+FFFD, as Go's decoder -- Ollama's -- makes them), and the wording of a bad
value in an error message. Each API wraps `BodyError` in its own error shape
(harness.serve.ollama_fields, harness.serve.openai_fields). Pure: no HTTP, no torch."""
from __future__ import annotations

import json
import re
from typing import Any

KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
         dict: "an object"}
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class BodyError(ValueError):
    """A body that is not a JSON object; str(e) says why, for the API's own message."""


def decode_object(raw: bytes) -> dict:
    if not raw.strip():
        raise BodyError("the body is empty")
    try:
        body = json.loads(raw)
        if _SURROGATE_ESCAPE.search(raw):
            body = _no_lone_surrogates(body)
    except (UnicodeDecodeError, ValueError) as e:   # ValueError: also an integer over 4300 digits
        raise BodyError(str(e)) from None
    except RecursionError:
        raise BodyError("nested too deeply") from None
    if not isinstance(body, dict):
        raise BodyError(f"must be a JSON object, got {json_type(body)}")
    return body


def _no_lone_surrogates(v: Any) -> Any:
    """An unpaired surrogate escape ("\\ud800") becomes U+FFFD; Python keeps it, and the tokenizer
    then fails on a str that is not valid Unicode."""
    if isinstance(v, str):
        return v.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(v, list):
        return [_no_lone_surrogates(x) for x in v]
    if isinstance(v, dict):
        return {_no_lone_surrogates(k): _no_lone_surrogates(x) for k, x in v.items()}
    return v


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


def wrong_kind(v: Any, kinds: tuple[type, ...]) -> str | None:
    """What `v` should have been when it is not one of the JSON `kinds` (bools are not numbers;
    an int is a number), else None."""
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        return " or ".join(dict.fromkeys(KINDS[k] for k in kinds if not (k is int and float in kinds)))
    return None
