"""The HTTP side of `harness.serve`: a FastAPI app run by uvicorn, and what every API on it shares.

    sock = bind("127.0.0.1", 0)               # bound before the (slow) model load
    app = create_app(engine, card)            # a harness.serve.engine.Engine and its ModelCard
    Server(app, grace_s=30, on_ready=print_ready).run_on(sock)

An API is a function adding its routes, create_app(engine, card, apis=(add_ollama_routes, ...)); the
default is the Ollama API (harness.serve.ollama_routes). Shared here: `endpoint` (errors as JSON),
`read_body` / `json_body`, `Generation` (a job on the engine in a thread, stopped when the client
hangs up), `RequestLog`, `Server` and `bind`.

HTTP/1.1 with keep-alive (uvicorn, h11); request bodies with Content-Length or chunked. Errors are
JSON (Ollama's {"error": ...} unless an API says otherwise): 400 bad body, 404 unknown model or path,
405 wrong method, 413 body over 64 MiB, 500 a failure inside the model. One log line per request.

Generation runs in a thread of its own while the event loop watches the connection (ASGI receive():
`http.disconnect`). A client that hangs up (closes or resets the connection, or shuts down its
sending side, as Ollama's Go server also takes it) stops the generation within one decode step,
streamed or not, and frees the model for the next request; it is logged as status 499 plus one
"abandoned" line. A keep-alive client that pipelines its next request is not taken for one that left
(h11 holds the next request until this answer is complete).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import harness
from harness.serve.ollama_api import Abandoned, ApiError, Job, ModelCard, parse_json

log = logging.getLogger("harness.serve")
MAX_BODY_BYTES = 64 << 20


# ----------------------------------------------------------------------------- plumbing

def json_response(status: int, obj: dict) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False).encode(), status_code=status,
                    media_type="application/json; charset=utf-8")


def ndjson(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def ollama_error(status: int, message: str) -> dict:
    return {"error": message}


def endpoint(fn: Callable, error_body: Callable[[int, str], dict] = ollama_error) -> Callable:
    """A route whose ApiError becomes a JSON error body (Ollama's {"error": ...} unless error_body
    says otherwise) with its status, and any other exception a 500 (logged with its traceback), so
    a client always gets JSON."""
    async def route(request: Request) -> Response:
        try:
            return await fn(request)
        except ApiError as e:
            return json_response(e.status, error_body(e.status, e.message))
        except ClientDisconnect:   # gone while sending its body: nobody to answer
            request.state.status = 499
            return Response(status_code=499)
        except Exception as e:
            log.exception("%s %s failed", request.method, request.url.path)
            return json_response(500, error_body(500, f"{type(e).__name__}: {e}"))
    route.__name__ = fn.__name__
    return route


async def read_body(request: Request) -> bytes:
    """The whole body (Content-Length or chunked), at most MAX_BODY_BYTES."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body of {length} bytes is over the {MAX_BODY_BYTES} byte limit")
    parts, n = [], 0
    async for part in request.stream():
        n += len(part)
        if n > MAX_BODY_BYTES:
            raise ApiError(413, f"request body is over the {MAX_BODY_BYTES} byte limit")
        parts.append(part)
    return b"".join(parts)


async def json_body(request: Request) -> dict:
    return parse_json(await read_body(request))


def elapsed_ns(request: Request) -> int:
    """Nanoseconds since the request arrived (RequestLog notes when)."""
    now = time.perf_counter_ns()
    return now - request.scope.get("state", {}).get("started_ns", now)


class RequestLog:
    """ASGI middleware: one log line per HTTP request (client, method, path, status, seconds). A
    route may set request.state.status (499: abandoned before any answer went out)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter_ns(), [0]
        scope.setdefault("state", {})["started_ns"] = started

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope["query_string"] else "")
            client = (scope.get("client") or ("-",))[0]
            shown = scope["state"].get("status") or status[0] or 499
            log.info('%s "%s %s" %s %.3fs', client, scope["method"], path, shown,
                     (time.perf_counter_ns() - started) / 1e9)


# ----------------------------------------------------------------------------- generation

class Generation:
    """One job on the engine, in a thread of its own; what it produces arrives on an asyncio queue:
    ("delta", (text, scores)) while streaming (scores: the TokenScores of the tokens behind text, empty
    unless the job asked for log-probs), then ("done", Outcome) | ("abandoned", Abandoned) |
    ("error", exception). `gone` is set when the client hangs up: the engine stops within one step."""

    def __init__(self, engine, job: Job, request: Request):
        self.engine, self.job, self.request = engine, job, request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.gone = threading.Event()
        self.why = "the client went away"
        self.watcher: asyncio.Task | None = None
        # the scores of every piece of text handed out: tokens past a stop string (text never
        # returned) are not in it
        self.delivered: list = []

    threads: set[threading.Thread] = set()   # generations still running, for a clean exit

    def start(self) -> None:
        self.watcher = asyncio.ensure_future(self._watch())
        thread = threading.Thread(target=self._work, name="generate", daemon=True)
        Generation.threads.add(thread)
        thread.start()

    def _put(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:   # the event loop is closed: the server stopped, nobody waits for this
            pass

    def _on_delta(self, text: str, scores: list) -> bool:
        if self.gone.is_set():
            return False
        self.delivered.extend(scores)
        if self.job.stream:
            self._put(("delta", (text, scores)))
        return True

    def _work(self) -> None:
        try:
            self._run()
        finally:
            Generation.threads.discard(threading.current_thread())

    def _run(self) -> None:
        try:
            self._put(("done", self.engine.run(self.job, self._on_delta, cancelled=self.gone.is_set)))
        except Abandoned as e:
            req = self.request
            log.info("%s abandoned %s %s: %s; generation stopped after %d tokens, %.3fs",
                     req.client.host if req.client else "-", req.method, req.url.path, self.why, e.tokens,
                     elapsed_ns(req) / 1e9)
            self._put(("abandoned", e))
        except BaseException as e:   # ApiError (a bad context id), or a failure inside the model
            if not isinstance(e, ApiError):
                log.exception("%s %s failed", self.request.method, self.request.url.path)
            self._put(("error", e))

    async def _watch(self) -> None:
        """Waits for the client to hang up. The body is read already, so receive() answers only
        http.disconnect (a pipelined next request stays in h11's buffer until this answer ends)."""
        try:
            while (await self.request.receive())["type"] != "http.disconnect":
                pass
        except Exception:   # the connection is already torn down
            pass
        self.hang_up()

    def hang_up(self) -> None:
        self.gone.set()
        self.queue.put_nowait(("gone", None))

    def finish(self) -> None:
        """The answer is complete (or abandoned): stop watching, and stop the engine if it still runs."""
        self.gone.set()
        if self.watcher is not None:
            self.watcher.cancel()

    async def next(self) -> tuple[str, Any]:
        """The next item; ("gone", None) only while the engine has not answered yet."""
        return await self.queue.get()

    async def first(self, shutting_down: Callable[[], Response]) -> tuple[str, Any]:
        """The first item past the client-gone notices: ("delta", ...) or ("done", Outcome). An
        engine error is raised; a job whose client left raises Answered(499, nothing goes out),
        one cut off by the end of uvicorn's shutdown grace period Answered(shutting_down())."""
        request = self.request
        try:
            kind, value = await self.next()
            while kind == "gone":   # the engine notices within one step and answers "abandoned"
                kind, value = await self.next()
        except asyncio.CancelledError:
            self.why = "the server is shutting down"
            self.finish()
            log.warning("%s %s still running when the shutdown grace period ran out; stopped",
                        request.method, request.url.path)
            raise Answered(shutting_down()) from None
        except BaseException:
            self.finish()
            raise
        if kind != "delta":
            self.finish()
        if kind == "abandoned":
            request.state.status = 499   # nginx's "client closed request"
            raise Answered(Response(status_code=499))
        if kind == "error":
            raise value
        return kind, value


class Answered(Exception):
    """The request ends with `response` and nothing else: its client left (499) or the server is
    shutting down (503)."""

    def __init__(self, response: Response):
        super().__init__("answered")
        self.response = response


RouteAdder = Callable[[FastAPI, Any, ModelCard], None]


def create_app(engine, card: ModelCard, apis: tuple[RouteAdder, ...] | None = None) -> FastAPI:
    """The app serving `engine`: each of `apis` adds its routes (default: the Ollama API,
    harness.serve.ollama_routes.add_ollama_routes; another API, such as OpenAI's, is one more function
    of the same shape). Unknown paths are 404 and wrong methods 405, with Ollama's {"error": ...} body."""
    if apis is None:   # imported here: the route modules import this one's helpers
        from harness.serve.ollama_routes import add_ollama_routes
        apis = (add_ollama_routes,)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.card = engine, card

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        path = request.url.path
        if e.status_code == 404:
            return json_response(404, {"error": f"404 page not found: {path}"})
        if e.status_code == 405:
            return json_response(405, {"error": f"method {request.method} not allowed on {path}"})
        return json_response(e.status_code, {"error": str(e.detail)})

    for add_routes in apis:
        add_routes(app, engine, card)
    app.add_middleware(RequestLog)
    return app


# ----------------------------------------------------------------------------- the server

def bind(host: str, port: int) -> socket.socket:
    """A listening socket (so a port in use fails before a slow model load); OSError if taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server(uvicorn.Server):
    """uvicorn with this project's shutdown: SIGTERM/SIGINT stop accepting and let requests in flight
    finish (up to grace_s, then they are cancelled, which stops their generation), and the process
    exits 0; a second signal exits at once (status 128 + signal)."""

    def __init__(self, app, grace_s: float, on_ready: Callable[[], None] = lambda: None):
        config = uvicorn.Config(app, http="h11", loop="asyncio", lifespan="off", log_config=None,
                                access_log=False, server_header=False, timeout_keep_alive=120,
                                timeout_graceful_shutdown=grace_s,
                                headers=[("server", f"harness-serve/{harness.__version__}")])
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_ready()

    @contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:   # unlike uvicorn's, no re-raise of the signal afterwards: a graceful stop exits 0
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:   # a second signal: leave now, generations in flight or not
            logging.shutdown()
            os._exit(128 + sig)
        self.should_exit = True
        log.info("%s: shutting down", signal.Signals(sig).name)

    def run_on(self, sock: socket.socket) -> None:
        self.run(sockets=[sock])
        # generations cut off by the grace period stop within a decode step: wait for them, as torch
        # aborts the process when the interpreter exits under a running thread
        deadline = time.monotonic() + 60
        for thread in list(Generation.threads):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
