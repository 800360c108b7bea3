"""The OpenAI REST API over HTTP: `add_openai_routes(app, engine, card)`, one more API for
`harness.serve.app.create_app` next to the Ollama one, so the `openai` SDK (base_url
http://HOST:PORT/v1) and lm-eval's `local-completions` talk to the served model.

    POST /v1/chat/completions   the chat template's prompt; stream (SSE), stop, seed, temperature,
                                top_p, max_tokens, response_format (JSON enforced by the engine's
                                grammar), logprobs / top_logprobs, stream_options.include_usage
    POST /v1/completions        prompts as text or token ids; echo + logprobs score the prompt
                                (max_tokens 0: scoring only, as lm-eval's local-completions asks)
    POST /v1/embeddings         harness.serve.scoring.embed: unit vectors, mean-pooled
    GET  /v1/models, GET /v1/models/{id}

Parsing and the answers' shapes are the pure modules (openai_requests, openai_responses), the
HTTP plumbing (errors, streaming, waiting on a job) is openai_http; this module runs them: each
generation is a `Job` on the engine through app.py's `Generation` (its own thread, stopped
within a decode step when the client hangs up), and one-off model work (prompt log-probs,
embeddings) goes through `engine.call` in a worker thread, so the event loop never waits for
the model. Every failure is OpenAI's error body with its status: 400 bad request,
404 unknown model or /v1 path, 405 wrong method, 413 body too large, 500 a failure in the model
(mid-stream: a last `data: {"error": ...}` event). Logprobs cover the tokens whose text was
returned: a stop string that cuts the text drops the scores of the tokens after the cut.
"""
from __future__ import annotations

import asyncio
import functools
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from harness.serve.app import json_response, read_body
from harness.serve.ollama_api import Job, ModelCard, Outcome
from harness.serve.ollama_api import Sampling as EngineSampling
from harness.serve.openai_api import method_not_allowed, model_not_found, model_object, models_list, not_found
from harness.serve.openai_http import (SSE, ScoredGeneration, first_item, openai_endpoint, served_model,
                                       stream)
from harness.serve.openai_fields import Sampling, parse_json
from harness.serve.openai_requests import (chat_prompt, context_error, parse_chat, parse_completion,
                                           parse_embeddings, room)
from harness.serve.openai_responses import (CompletionChoice, chat_chunk, chat_completion, chat_logprobs,
                                            chat_usage_chunk, completion, completion_chunk, completion_logprobs,
                                            completion_usage_chunk, embeddings, new_id, sse, usage)

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")


def add_openai_routes(app: FastAPI, engine, card: ModelCard) -> None:
    """The OpenAI API for the one served model, under /v1."""
    from harness.serve.scoring import embed, end_score, prompt_logprobs, token_bytes, token_piece
    lm = engine.lm
    served = served_model(engine, card)
    render = lm.chat_prompt if lm.has_chat_template else None
    # One token's text and bytes: read-only on the tokenizer (as the engine's own decoding)
    piece = functools.lru_cache(maxsize=1 << 16)(lambda i: token_piece(lm, i))
    raw = functools.lru_cache(maxsize=1 << 16)(lambda i: token_bytes(lm, i))

    async def body(request: Request) -> dict:
        return parse_json(await read_body(request))

    async def encode(prompt: str | tuple[int, ...]) -> list[int]:
        ids = await asyncio.to_thread(lm.encode, prompt) if isinstance(prompt, str) else list(prompt)
        return ids or [lm.prefix_token]

    def job(model: str, ids: list[int], sampling: Sampling, stream: bool, schema: dict | None = None,
            logprobs: int | None = None) -> Job:
        s = EngineSampling(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                           seed=sampling.seed, num_predict=room(len(ids), sampling, served.context_length),
                           stop=sampling.stop, num_ctx=served.context_length)
        return Job("openai", model, tuple(ids), stream, s, schema=schema, logprobs=logprobs)

    async def start(j: Job, request: Request) -> tuple[ScoredGeneration, str, object]:
        gen = ScoredGeneration(engine, j, request)
        gen.start()
        kind, value = await first_item(gen, request)
        return gen, kind, value

    async def finished(j: Job, request: Request) -> tuple[Outcome, list]:
        gen, kind, value = await start(j, request)
        return value, gen.delivered

    # ------------------------------------------------------------------------- chat

    async def chat(request: Request) -> Response:
        req = parse_chat(await body(request), served)
        ids = await encode(chat_prompt(req.messages, render))
        fits = context_error(len(ids), req.sampling.max_tokens, served.context_length)
        if fits is not None or room(len(ids), req.sampling, served.context_length) == 0:
            raise fits or context_error(len(ids), 1, served.context_length)
        fmt = req.response_format
        j = job(req.model, ids, req.sampling, req.stream, fmt.schema if fmt else None,
                req.top_logprobs if req.logprobs else None)

        def lp(scores: list) -> dict | None:
            return chat_logprobs(scores, piece, req.top_logprobs, raw) if req.logprobs else None

        if not req.stream:
            outcome, scores = await finished(j, request)
            return json_response(200, chat_completion(req, outcome.text, outcome.done_reason,
                                                      usage(len(ids), outcome.eval_count), logprobs=lp(scores),
                                                      fingerprint=served.fingerprint))
        gen, kind, value = await start(j, request)
        rid, created = new_id("chatcmpl"), int(time.time())

        def event(**kw) -> bytes:
            return sse(chat_chunk(req, rid, created, fingerprint=served.fingerprint, **kw))

        def delta(item) -> bytes:
            text, scores = item
            return event(content=text, logprobs=lp(scores))

        async def end(outcome: Outcome) -> list[bytes]:
            out = [event(finish_reason=outcome.done_reason)]
            if req.include_usage:
                out.append(sse(chat_usage_chunk(req, rid, created, usage(len(ids), outcome.eval_count),
                                                served.fingerprint)))
            return out + [sse("[DONE]")]

        return stream(gen, request, kind, value, [event(role=True)], delta, end)

    # ------------------------------------------------------------------------- completions

    async def completions(request: Request) -> Response:
        req = parse_completion(await body(request), served)
        prompts = []
        for p in req.prompts:
            ids = await encode(p)
            fits = context_error(len(ids), req.sampling.max_tokens, served.context_length, "prompt", req.echo)
            if fits is not None:
                raise fits
            prompts.append((p, ids))

        async def echoed(p, ids) -> str:
            """The prompt's text, shown first under echo."""
            if not req.echo:
                return ""
            return p if isinstance(p, str) else await asyncio.to_thread(lm.decode, ids)

        async def scored(ids: list[int], outcome: Outcome | None, generated: list) -> tuple[list, list]:
            """(the prompt's scores under echo, the generated tokens' scores plus the end token's
            when the generation stopped at EOS): one forward pass over the prompt and the answer."""
            if req.logprobs is None:
                return [], []
            hit_end = outcome is not None and outcome.eval_count > len(outcome.tokens)
            if not req.echo and not hit_end:
                return [], generated
            context = ids + (outcome.tokens if outcome else [])
            if not req.echo:
                return [], generated + [await asyncio.to_thread(
                    engine.call, lambda m: end_score(m, context, req.logprobs))]
            full = await asyncio.to_thread(engine.call, lambda m: prompt_logprobs(m, context, req.logprobs, hit_end))
            return full[:len(ids)], generated + full[len(context):]

        def lp(scores: list, offset: int) -> dict | None:
            return None if req.logprobs is None else completion_logprobs(scores, piece, req.logprobs, offset)

        def gen_job(ids: list[int]) -> Job | None:
            if room(len(ids), req.sampling, served.context_length) == 0:
                return None     # max_tokens 0 (echo): the prompt alone, scored
            return job(req.model, ids, req.sampling, req.stream, logprobs=req.logprobs)

        if not req.stream:
            choices, n_prompt, n_gen = [], 0, 0
            for p, ids in prompts:
                text = await echoed(p, ids)
                j, outcome, generated = gen_job(ids), None, []
                if j is not None:
                    outcome, generated = await finished(j, request)
                pre, scores = await scored(ids, outcome, generated)
                choices.append(CompletionChoice(text + (outcome.text if outcome else ""),
                                                outcome.done_reason if outcome else "length", lp(pre + scores, 0)))
                n = outcome.eval_count if outcome else 0
                n_prompt, n_gen = n_prompt + len(ids), n_gen + n
            return json_response(200, completion(req, choices, usage(n_prompt, n_gen), fingerprint=served.fingerprint))
        (p, ids), = prompts
        text = await echoed(p, ids)
        rid, created = new_id("cmpl"), int(time.time())
        sent = [len(text)]     # characters so far: the next piece's text_offset

        def event(piece_text: str, scores: list, **kw) -> bytes:
            chunk = completion_chunk(req, rid, created, piece_text, logprobs=lp(scores, sent[0]),
                                     fingerprint=served.fingerprint, **kw)
            sent[0] += len(piece_text)
            return sse(chunk)

        head_scores = (await scored(ids, None, []))[0] if req.echo else []   # the prompt's, before generating
        head = [sse(completion_chunk(req, rid, created, text, logprobs=lp(head_scores, 0),
                                     fingerprint=served.fingerprint))] if req.echo else []

        async def end(outcome: Outcome | None) -> list[bytes]:
            last = [] if outcome is None or outcome.eval_count == len(outcome.tokens) or req.logprobs is None else \
                [await asyncio.to_thread(engine.call, lambda m: end_score(m, ids + outcome.tokens, req.logprobs))]
            out = [event("", last, finish_reason=outcome.done_reason if outcome else "length")]
            if req.include_usage:
                out.append(sse(completion_usage_chunk(req, rid, created,
                                                      usage(len(ids), outcome.eval_count if outcome else 0),
                                                      served.fingerprint)))
            return out + [sse("[DONE]")]

        j = gen_job(ids)
        if j is None:
            async def scored_only() -> AsyncIterator[bytes]:
                for item in head + await end(None):
                    yield item
            return StreamingResponse(scored_only(), media_type=SSE)
        gen, kind, value = await start(j, request)
        return stream(gen, request, kind, value, head, lambda item: event(*item), end)

    # ------------------------------------------------------------------------- embeddings, models

    async def embeddings_(request: Request) -> Response:
        req = parse_embeddings(await body(request), served)
        encoded = [await encode(x) for x in req.inputs]
        for ids in encoded:
            fits = context_error(len(ids), None, served.context_length, "input")
            if fits is not None:
                raise fits
        vectors = await asyncio.to_thread(engine.call, lambda m: embed(m, encoded))
        return json_response(200, embeddings(req, vectors, sum(map(len, encoded))))

    async def models(request: Request) -> Response:
        return json_response(200, models_list(served))

    async def model(request: Request) -> Response:
        requested = request.path_params["model_id"]
        if not served.matches(requested):
            raise model_not_found(requested)
        return json_response(200, model_object(served))

    async def elsewhere(request: Request) -> Response:
        """Any other /v1 path (404), or a known one with the wrong method (405)."""
        path = request.url.path.rstrip("/") or "/"
        if path in ROUTES or path.startswith("/v1/models/"):
            raise method_not_allowed(request.method, path)
        raise not_found(request.url.path)

    for path, fn, verbs in (("/v1/chat/completions", chat, ["POST"]), ("/v1/completions", completions, ["POST"]),
                            ("/v1/embeddings", embeddings_, ["POST"]), ("/v1/models", models, ["GET"]),
                            ("/v1/models/{model_id:path}", model, ["GET"])):
        app.add_api_route(path, openai_endpoint(fn), methods=verbs, include_in_schema=False)
    for path in ("/v1", "/v1/{rest:path}"):
        app.add_api_route(path, openai_endpoint(elsewhere), include_in_schema=False,
                          methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
