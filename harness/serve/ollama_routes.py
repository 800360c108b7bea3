"""The Ollama REST API's routes for the one served model: GET / ("Ollama is running"), GET
/api/version, GET /api/tags, GET /api/ps (HEAD too on each), POST /api/show, POST /api/chat, POST
/api/generate, POST /api/embed, POST /api/embeddings (legacy), POST /api/pull (the served model
only: status lines, nothing to download); /api/push,
/api/create, /api/copy, /api/delete and /api/blobs/* answer 501. Request parsing and answers live in
`harness.serve.ollama_api`; the routes here are thin, on the shared HTTP layer of `harness.serve.app`.

Streamed answers are NDJSON, one line per chunk, never a blank line; a failure once the headers are
out is a last line {"error": ...}. 501 is model management.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

import harness
from harness.serve.app import Answered, Generation, elapsed_ns, endpoint, json_body, json_response, ndjson, read_body
from harness.serve.ollama_api import (UNSUPPORTED, ApiError, ChatTemplate, Job, ModelCard, Outcome, chunk, final,
                                      loaded, not_supported, parse_chat, parse_generate, parse_pull, pull_progress)
from harness.serve.ollama_embed import GGUF_POOLING_TYPE, embed_response, fit, parse_embed, parse_embeddings
from harness.serve.ollama_logprobs import LogprobGate
from harness.serve.ollama_tools import parse_tool_calls
from harness.serve.scoring import EMBEDDING_POOLING, embed, embedding_dim, token_piece

log = logging.getLogger("harness.serve")
NDJSON = "application/x-ndjson"


class Reply:
    """What a route adds to the engine's text: log-prob entries for the tokens returned (LogprobGate)
    and, with tools, the tool calls parsed from the whole reply."""

    def __init__(self, engine, job: Job):
        self.job, self.sent, self.gate = job, 0, None
        if job.logprobs is not None:
            lm = engine.lm
            self.gate = LogprobGate(lm.decode, lambda i: token_piece(lm, i))

    def delta(self, text: str, scores: list) -> dict:
        self.sent += len(text)
        return chunk(self.job, text, logprobs=self.logprobs(scores, self.sent))

    def logprobs(self, scores: list | None, text_end: int) -> list[dict] | None:
        if self.gate is None:
            return None
        self.gate.add(scores or [])
        return self.gate.release(text_end)

    def done(self, outcome: Outcome, streamed: bool) -> dict:
        """The final chunk: with the text unless it went out in deltas already."""
        text, calls = ("" if streamed else outcome.text), None
        if self.job.tools:   # a tools request runs unstreamed: the calls are parsed from all of it
            text, calls = parse_tool_calls(outcome.text)
        scores = (outcome.scores or [])[len(self.gate.ids):] if self.gate is not None else None
        return final(self.job, outcome, text, self.logprobs(scores, len(outcome.text)), calls or None)


async def generate(engine, job: Job, request: Request) -> Response:
    if job.prompt is None:
        return json_response(200, loaded(job))
    reply = Reply(engine, job)
    # with tools the reply is parsed whole before anything goes out; it still answers as a stream
    gen = Generation(engine, replace(job, stream=False) if job.tools else job, request)
    gen.start()
    try:
        kind, value = await gen.first(lambda: json_response(503, {"error": "server is shutting down"}))
    except Answered as e:
        return e.response
    if kind == "done":
        outcome = value
        outcome.total_duration = elapsed_ns(request)
        if job.stream and not job.tools:
            return StreamingResponse(iter([ndjson(reply.done(outcome, streamed=True))]), media_type=NDJSON)
        if job.stream:   # tools: the whole reply as one chunk, then the final one
            last = reply.done(outcome, streamed=False)
            first = {**last, "done": False}
            for key in ("done_reason", "total_duration", "load_duration", "prompt_eval_count",
                        "prompt_eval_duration", "eval_count", "eval_duration"):
                first.pop(key, None)
            last = {**last, "message": {"role": "assistant", "content": ""}}
            last.pop("logprobs", None)
            return StreamingResponse(iter([ndjson(first), ndjson(last)]), media_type=NDJSON)
        return json_response(200, reply.done(outcome, streamed=False))
    return StreamingResponse(stream_lines(gen, reply, request, first=value), media_type=NDJSON)


async def stream_lines(gen: Generation, reply: Reply, request: Request, first: tuple) -> AsyncIterator[bytes]:
    """The NDJSON lines after the first delta: the deltas, then the final chunk or an error line."""
    try:
        yield ndjson(reply.delta(*first))
        while True:
            kind, value = await gen.next()
            if kind == "delta":
                yield ndjson(reply.delta(*value))
            elif kind == "done":
                value.total_duration = elapsed_ns(request)
                yield ndjson(reply.done(value, streamed=True))
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
    lm = engine.lm

    def render(messages: list[dict], tools: list[dict] | None = None) -> str:
        if tools:   # TorchLM.chat_prompt has no tools argument; its tokenizer's renderer has
            from models.tokenizer import render_chat
            return render_chat(lm.tokenizer, messages, tools=tools)
        return lm.chat_prompt(messages)

    template = ChatTemplate(render if lm.has_chat_template else None)
    family = card.details.get("family") or card.model_info.get("general.architecture", "model")
    card.model_info.setdefault(f"{family}.pooling_type", GGUF_POOLING_TYPE[EMBEDDING_POOLING])

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

    async def run_embed(job) -> dict:
        started = time.perf_counter_ns()
        ctx = min(job.num_ctx or engine.default_num_ctx, lm.max_length)

        def work(lm_) -> tuple[list[list[float]], int, int]:
            waited = time.perf_counter_ns() - started
            ids = [fit(lm_.encode(text), ctx, job.truncate) for text in job.inputs]
            return embed(lm_, ids, normalize=job.normalize), sum(map(len, ids)), waited

        if not job.inputs:   # nothing to embed: Ollama's answer to a request that only loads the model
            return embed_response(job, [], 0, time.perf_counter_ns() - started, 0)
        vectors, tokens, waited = await asyncio.to_thread(engine.call, work)
        return embed_response(job, vectors, tokens, time.perf_counter_ns() - started, waited)

    async def embed_(request: Request) -> Response:
        return json_response(200, await run_embed(parse_embed(await json_body(request), card, embedding_dim(lm))))

    async def embeddings(request: Request) -> Response:
        return json_response(200, await run_embed(parse_embeddings(await json_body(request), card)))

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
              ("/api/generate", generate_, ["POST"]), ("/api/pull", pull, ["POST"]),
              ("/api/embed", embed_, ["POST"]), ("/api/embeddings", embeddings, ["POST"])]
    methods = {"/api/push": ["POST"], "/api/create": ["POST"], "/api/copy": ["POST"], "/api/delete": ["DELETE"],
               "/api/blobs": ["HEAD", "POST"]}
    for path in UNSUPPORTED:
        routes.append((path + "/{digest}" if path == "/api/blobs" else path, unsupported, methods[path]))
    for path, fn, verbs in routes:   # HEAD wherever GET (headers only)
        app.add_api_route(path, endpoint(fn), methods=verbs + ["HEAD"] * ("GET" in verbs), include_in_schema=False)
