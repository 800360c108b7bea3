"""The Ollama REST API's routes for the one served model: GET / ("Ollama is running"), GET
/api/version, GET /api/tags, GET /api/ps (HEAD too on each), POST /api/show, POST /api/chat, POST
/api/generate, POST /api/pull (the served model only: status lines, nothing to download); /api/push,
/api/create, /api/copy, /api/delete and /api/blobs/* answer 501. Request parsing and answers live in
`harness.serve.ollama_api`; the routes here are thin, on the shared HTTP layer of `harness.serve.app`.

Streamed answers are NDJSON, one line per chunk, never a blank line; a failure once the headers are
out is a last line {"error": ...}. 501 is model management.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

import harness
from harness.serve.app import Generation, elapsed_ns, endpoint, json_body, json_response, ndjson, read_body
from harness.serve.ollama_api import (UNSUPPORTED, ApiError, ChatTemplate, Job, ModelCard, chunk, final, loaded,
                                      not_supported, parse_chat, parse_generate, parse_pull, pull_progress)

log = logging.getLogger("harness.serve")
NDJSON = "application/x-ndjson"


async def generate(engine, job: Job, request: Request) -> Response:
    if job.prompt is None:
        return json_response(200, loaded(job))
    gen = Generation(engine, job, request)
    gen.start()
    try:
        kind, value = await gen.next()
        while kind == "gone":   # the engine notices within one step and answers "abandoned"
            kind, value = await gen.next()
    except asyncio.CancelledError:   # uvicorn's shutdown grace period ran out: stop, answer 503
        gen.why = "the server is shutting down"
        gen.finish()
        log.warning("%s %s still running when the shutdown grace period ran out; stopped",
                    request.method, request.url.path)
        return json_response(503, {"error": "server is shutting down"})
    except BaseException:
        gen.finish()
        raise
    if kind == "abandoned":
        gen.finish()
        request.state.status = 499   # nginx's "client closed request"; nothing goes out
        return Response(status_code=499)
    if kind == "error":
        gen.finish()
        raise value
    if kind == "done":
        gen.finish()
        outcome = value
        outcome.total_duration = elapsed_ns(request)
        if job.stream:
            return StreamingResponse(iter([ndjson(final(job, outcome, ""))]), media_type=NDJSON)
        return json_response(200, final(job, outcome, outcome.text))
    return StreamingResponse(stream_lines(gen, job, request, first=value), media_type=NDJSON)


async def stream_lines(gen: Generation, job: Job, request: Request, first: tuple) -> AsyncIterator[bytes]:
    """The NDJSON lines after the first delta: the deltas, then the final chunk or an error line."""
    try:
        yield ndjson(chunk(job, first[0]))
        while True:
            kind, value = await gen.next()
            if kind == "delta":
                yield ndjson(chunk(job, value[0]))
            elif kind == "done":
                value.total_duration = elapsed_ns(request)
                yield ndjson(final(job, value, ""))
                return
            elif kind == "error":   # headers are out: Ollama's way is a last line carrying the error
                message = value.message if isinstance(value, ApiError) else f"{type(value).__name__}: {value}"
                yield ndjson({"error": message})
                return
            elif kind == "abandoned":
                return
    finally:
        gen.finish()


def add_ollama_routes(app: FastAPI, engine, card: ModelCard) -> None:
    """The Ollama REST API for the one served model."""
    template = ChatTemplate(engine.lm.chat_prompt if engine.lm.has_chat_template else None)

    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(request: Request) -> Response:
        return json_response(200, {"version": harness.__version__})

    async def tags(request: Request) -> Response:
        return json_response(200, card.tags())

    async def ps(request: Request) -> Response:
        return json_response(200, card.ps())

    async def show(request: Request) -> Response:
        req = await json_body(request)
        model = req.get("model") or req.get("name")   # older clients send "name"
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required (a string)")
        if not card.matches(model):
            raise ApiError(404, f"model '{model}' not found")
        return json_response(200, card.show())

    async def chat(request: Request) -> Response:
        return await generate(engine, parse_chat(await json_body(request), card, template), request)

    async def generate_(request: Request) -> Response:
        return await generate(engine, parse_generate(await json_body(request), card, template), request)

    async def pull(request: Request) -> Response:
        _, stream = parse_pull(await json_body(request), card)
        lines = pull_progress(card)
        if not stream:
            return json_response(200, lines[-1])
        return StreamingResponse(iter([ndjson(line) for line in lines]), media_type=NDJSON)

    async def unsupported(request: Request) -> Response:
        await read_body(request)
        raise not_supported(request.url.path, card)

    routes = [("/", root, ["GET"]), ("/api/version", version, ["GET"]), ("/api/tags", tags, ["GET"]),
              ("/api/ps", ps, ["GET"]), ("/api/show", show, ["POST"]), ("/api/chat", chat, ["POST"]),
              ("/api/generate", generate_, ["POST"]), ("/api/pull", pull, ["POST"])]
    methods = {"/api/push": ["POST"], "/api/create": ["POST"], "/api/copy": ["POST"], "/api/delete": ["DELETE"],
               "/api/blobs": ["HEAD", "POST"]}
    for path in UNSUPPORTED:
        routes.append((path + "/{digest}" if path == "/api/blobs" else path, unsupported, methods[path]))
    for path, fn, verbs in routes:   # HEAD wherever GET (headers only)
        app.add_api_route(path, endpoint(fn), methods=verbs + ["HEAD"] * ("GET" in verbs), include_in_schema=False)
