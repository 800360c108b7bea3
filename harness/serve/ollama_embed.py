"""/api/embed and the legacy /api/embeddings as data: request bodies checked, answers built. No HTTP,
no torch: harness.serve.ollama_routes runs harness.serve.scoring.embed on the engine.

As in Ollama (server/routes.go), /api/embed returns L2-normalised vectors, one per input, and
/api/embeddings (deprecated) the raw pooled vector, not normalised. `dimensions` keeps the first n
components, normalised again (Matryoshka-style truncation). An input longer than the context is cut
to fit (truncate, the default) or a 400 "input length exceeds maximum context length".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from harness.serve.ollama_api import parse_keep_alive
from harness.serve.ollama_fields import ApiError, int_field, shown, typed_field
from harness.serve.ollama_model import ModelCard, requested_model

# GGUF's <arch>.pooling_type values (llama.cpp's enum llama_pooling_type), shown in /api/show
GGUF_POOLING_TYPE = {"none": 0, "mean": 1, "cls": 2, "last": 3}


@dataclass(frozen=True)
class EmbedJob:
    model: str
    inputs: tuple[str, ...]
    truncate: bool = True
    dimensions: int | None = None
    num_ctx: int | None = None
    normalize: bool = True          # False: the legacy /api/embeddings


def _num_ctx(body: dict) -> int | None:
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, f"options must be an object, got {shown(options)}")
    return int_field(options or {}, "num_ctx", None, low=1)


def parse_embed(body: dict, card: ModelCard, dim: int) -> EmbedJob:
    """/api/embed: input is a string or a list of strings ("" or [] only loads the model)."""
    model = requested_model(body, card)
    parse_keep_alive(body.get("keep_alive"))
    raw = body.get("input")
    if raw is None or isinstance(raw, str):
        inputs = (raw,) if raw else ()
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        inputs = tuple(raw)
    else:
        raise ApiError(400, f"input must be a string or an array of strings, got {shown(raw)}")
    dimensions = int_field(body, "dimensions", None, where="")
    if dimensions is not None and not 1 <= dimensions <= dim:
        raise ApiError(400, f"dimensions must be between 1 and {dim} (this model's embedding length), "
                            f"got {dimensions}")
    return EmbedJob(model, inputs, typed_field(body, "truncate", (bool,), True), dimensions, _num_ctx(body))


def parse_embeddings(body: dict, card: ModelCard) -> EmbedJob:
    """/api/embeddings (legacy): one `prompt`; "" only loads the model."""
    model = requested_model(body, card)
    parse_keep_alive(body.get("keep_alive"))
    prompt = typed_field(body, "prompt", (str,), "")
    return EmbedJob(model, (prompt,) if prompt else (), True, None, _num_ctx(body), normalize=False)


def fit(ids: list[int], ctx: int, truncate: bool) -> list[int]:
    """An input's token ids cut to the context, or the 400 Ollama answers with truncate false."""
    if len(ids) <= ctx:
        return ids
    if not truncate:
        raise ApiError(400, "input length exceeds maximum context length")
    return ids[:ctx]


def shorten(vector: list[float], dimensions: int | None) -> list[float]:
    """The first `dimensions` components, normalised again."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    cut = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in cut))
    return [x / norm for x in cut] if norm > 0 else cut


def embed_response(job: EmbedJob, vectors: list[list[float]], tokens: int, total_ns: int, load_ns: int) -> dict:
    if not job.normalize:
        return {"embedding": vectors[0] if vectors else []}
    return {"model": job.model, "embeddings": [shorten(v, job.dimensions) for v in vectors],
            "total_duration": total_ns, "load_duration": load_ns, "prompt_eval_count": tokens}
