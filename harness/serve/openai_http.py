"""The HTTP plumbing of the OpenAI routes (harness/serve/openai_routes.py): OpenAI's error body for
every failure, a `Generation` whose deltas carry their log-probs, waiting for a job's first item
(client gone: 499, shutdown: 503), and the SSE answer of a streamed job."""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import AsyncIterator, Awaitable, Callable

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from harness.serve.app import Generation, elapsed_ns, endpoint, json_response
from harness.serve.ollama_api import Job, ModelCard, Outcome
from harness.serve.openai_api import ApiError, ServedModel, error_body, fingerprint
from harness.serve.openai_responses import sse

log = logging.getLogger("harness.serve")
SSE = "text/event-stream"


class Answered(Exception):
    """The request ends with `response` and nothing else: the client left (499, nothing goes out)
    or the server is shutting down (503)."""

    def __init__(self, response: Response):
        super().__init__("answered")
        self.response = response


class ScoredGeneration(Generation):
    """A Generation whose deltas carry their TokenScores: ("delta", (text, scores)) while
    streaming. `delivered` collects the scores of every piece of text the engine handed out, so
    the tokens past a stop string (whose text is never returned) are not in it."""

    def __init__(self, engine, job: Job, request: Request):
        super().__init__(engine, job, request)
        self.delivered: list = []

    def _on_delta(self, text: str, scores: list) -> bool:
        if self.gone.is_set():
            return False
        self.delivered.extend(scores)
        if self.job.stream:
            self._put(("delta", (text, scores)))
        return True


def served_model(engine, card: ModelCard) -> ServedModel:
    """What /v1 says of the served model: its served name (and the name's ":latest" tag form)."""
    from harness.serve.scoring import embedding_dim
    lm = engine.lm
    try:
        created = int(datetime.fromisoformat(card.modified_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        created = int(time.time())
    extra = f"{card.model_info.get('harness.dtype', '')}/{card.model_info.get('harness.device', '')}"
    return ServedModel(id=card.name, context_length=card.context_length, vocab_size=lm.model.config.vocab_size,
                       embedding_dim=embedding_dim(lm), created=created, fingerprint=fingerprint(card.digest, extra))


def openai_endpoint(fn: Callable) -> Callable:
    """app.endpoint with OpenAI's error body for every failure (the Ollama-side ApiError of the
    engine or of read_body, and unexpected exceptions, too)."""
    async def route(request: Request) -> Response:
        try:
            return await fn(request)
        except ApiError as e:
            return json_response(e.status, error_body(e))
        except Answered as e:
            return e.response
    route.__name__ = fn.__name__
    return endpoint(route, error_body=lambda status, message: error_body(ApiError(status, message)))


async def first_item(gen: Generation, request: Request) -> tuple[str, object]:
    """The job's first item past the client-gone notices: ("delta", ...) or ("done", Outcome);
    an engine error is raised, an abandoned or cut-off job raises Answered."""
    try:
        kind, value = await gen.next()
        while kind == "gone":
            kind, value = await gen.next()
    except asyncio.CancelledError:   # uvicorn's shutdown grace period ran out
        gen.why = "the server is shutting down"
        gen.finish()
        log.warning("%s %s still running when the shutdown grace period ran out; stopped",
                    request.method, request.url.path)
        raise Answered(json_response(503, error_body(ApiError(503, "The server is shutting down.")))) from None
    except BaseException:
        gen.finish()
        raise
    if kind == "abandoned":
        gen.finish()
        request.state.status = 499
        raise Answered(Response(status_code=499))
    if kind == "error":
        gen.finish()
        raise value
    if kind == "done":
        gen.finish()
    return kind, value


def stream(gen: ScoredGeneration, request: Request, kind: str, value, head: list[bytes],
           delta: Callable[[tuple], bytes], end: Callable[[Outcome], Awaitable[list[bytes]]]) -> StreamingResponse:
    """The SSE answer of a started job whose first item is (kind, value): `head` events, one
    event per delta, then `end(outcome)` (the finish chunk, usage, [DONE]); an engine failure
    after the headers went out is a last `data: {"error": ...}` event."""
    async def events() -> AsyncIterator[bytes]:
        try:
            for item in head:
                yield item
            k, v = kind, value
            while True:
                if k == "delta":
                    yield delta(v)
                elif k == "done":
                    v.total_duration = elapsed_ns(request)
                    for item in await end(v):
                        yield item
                    return
                elif k == "error":
                    e = v if isinstance(v, ApiError) else ApiError(getattr(v, "status", 500), getattr(
                        v, "message", None) or f"{type(v).__name__}: {v}")
                    yield sse(error_body(e))
                    return
                elif k == "abandoned":
                    return
                k, v = await gen.next()
        finally:
            gen.finish()
    return StreamingResponse(events(), media_type=SSE)
