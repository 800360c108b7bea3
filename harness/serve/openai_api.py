"""The OpenAI REST API as data: request bodies -> validated requests, and the response objects, in
the shapes of the `openai` package's types (tests/test_openai_api.py parses every builder's output
with them). This module holds the constants, the errors and the served model; openai_fields
validates fields, openai_requests parses requests, openai_responses builds the answers, and
openai_routes serves them over HTTP. No HTTP and no torch here, like harness/ollama_api.py; the server does the I/O and the
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

import time
from dataclasses import dataclass, field

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

