"""The HTTP side of `harness.serve`: a ThreadingHTTPServer speaking the Ollama REST API.

    server = OllamaServer(("127.0.0.1", 0))
    server.serve_model(engine, card)      # a harness.serve_engine.Engine and its ModelCard
    server.serve_forever()

Routes: GET/HEAD / ("Ollama is running"), GET /api/version, GET /api/tags, GET /api/ps,
POST /api/show, POST /api/chat, POST /api/generate. HTTP/1.1 with keep-alive; streamed answers are
NDJSON, one line per chunk (chunked transfer encoding), never a blank line. Errors are JSON
{"error": ...}: 400 bad body, 404 unknown model or path, 405 wrong method, 500 a failure inside
the model (mid-stream: a last line {"error": ...}). Each request is logged through `logging`.

A generation whose client hangs up (closes or resets the connection, e.g. a judge request that
timed out) stops within one decode step, streamed or not, and frees the model for the next request;
it is logged as status 499 plus one "abandoned" line. A half-closed connection (the client shut
down its sending side) counts as gone, as in Ollama (Go's net/http cancels the request on EOF).
"""
from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import harness
from harness.ollama_api import (Abandoned, ApiError, ChatTemplate, ModelCard, chunk, final, loaded, parse_chat,
                                parse_generate, parse_json)

log = logging.getLogger("harness.serve")
MAX_BODY_BYTES = 64 << 20


class Handler(BaseHTTPRequestHandler):
    """One connection (HTTP/1.1 keep-alive); streams use chunked transfer encoding."""

    protocol_version = "HTTP/1.1"
    server_version = f"harness-serve/{harness.__version__}"
    timeout = 120                 # an idle keep-alive connection, or a client that stopped reading
    server: OllamaServer

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -- plumbing ---------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self.started, self.status, self.streaming = time.perf_counter_ns(), 0, False
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            with self.server.tracking(self):
                body = self._read_body()   # always read: the next request on this connection follows it
                routes = ROUTES.get(path)
                if routes is None:
                    raise ApiError(404, f"404 page not found: {path}")
                route = routes.get("GET" if method == "HEAD" else method)
                if route is None:
                    raise ApiError(405, f"method {method} not allowed on {path}")
                route(self, body)
        except ApiError as e:
            self._fail(e.status, e.message)
        except ConnectionError:   # the client went away while we answered
            self.close_connection = True
        except Exception as e:   # a bug or a failure inside the model: the client still gets JSON
            log.exception("%s %s failed", method, path)
            self._fail(500, f"{type(e).__name__}: {e}")
        finally:
            log.info('%s "%s %s" %s %.3fs', self.client_address[0], method, self.path, self.status,
                     (time.perf_counter_ns() - self.started) / 1e9)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "chunked request bodies are not supported; send a Content-Length")
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "invalid Content-Length header") from None
        if n > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"request body of {n} bytes is over the {MAX_BODY_BYTES} byte limit")
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _stream_line(self, obj: dict) -> bool:
        """One NDJSON line as one HTTP chunk (headers go out with the first); False: client gone."""
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
        try:
            if not self.streaming:
                self.status, self.streaming = 200, True
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            return True
        except OSError:
            self.close_connection = True
            return False

    def _end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _hung_up(self, poller: select.poll) -> bool:
        """True once the client is gone: its end of the connection reads EOF or was reset. While the
        connection is quiet this is one poll(2) with no wait (poll, unlike select, takes any fd
        number); readable data that is not EOF is a keep-alive client's next request, left for
        after this answer."""
        if not poller.poll(0):
            return False
        try:   # readable: EOF (b"") or data; MSG_PEEK leaves the data for the next request
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:   # ECONNRESET, ETIMEDOUT: gone as well
            return True

    def _fail(self, status: int, message: str) -> None:
        if self.streaming:   # headers are out: Ollama's way is a last line carrying the error
            if self._stream_line({"error": message}):
                self._end_stream()
            return
        try:
            self._send_json(status, {"error": message})
        except OSError:
            self.close_connection = True

    def log_request(self, code="-", size="-"):   # one line per request from _dispatch instead
        pass

    def log_message(self, format, *args):
        log.info("%s %s", self.client_address[0], format % args)

    # -- endpoints --------------------------------------------------------------------------------
    def root(self, _body: bytes) -> None:
        self._send(200, b"Ollama is running", "text/plain; charset=utf-8")

    def version(self, _body: bytes) -> None:
        self._send_json(200, {"version": harness.__version__})

    def tags(self, _body: bytes) -> None:
        self._send_json(200, self.server.card.tags())

    def ps(self, _body: bytes) -> None:
        self._send_json(200, self.server.card.ps())

    def show(self, body: bytes) -> None:
        req = parse_json(body)
        model = req.get("model") or req.get("name")   # older clients send "name"
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required (a string)")
        if not self.server.card.matches(model):
            raise ApiError(404, f"model '{model}' not found")
        self._send_json(200, self.server.card.show())

    def chat(self, body: bytes) -> None:
        self._generate(parse_chat(parse_json(body), self.server.card, self.server.template))

    def generate(self, body: bytes) -> None:
        self._generate(parse_generate(parse_json(body), self.server.card, self.server.template))

    def _generate(self, job) -> None:
        if job.prompt is None:
            return self._send_json(200, loaded(job))
        on_delta = (lambda text: self._stream_line(chunk(job, text))) if job.stream else (lambda text: True)
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        try:
            outcome = self.server.engine.run(job, on_delta, cancelled=lambda: self._hung_up(poller))
        except Abandoned as e:
            self.status, self.close_connection = self.status or 499, True   # nginx's "client closed request"
            log.info("%s abandoned %s %s: the client went away; generation stopped after %d tokens, %.3fs",
                     self.client_address[0], self.command, self.path, e.tokens,
                     (time.perf_counter_ns() - self.started) / 1e9)
            return
        outcome.total_duration = time.perf_counter_ns() - self.started
        if not job.stream:
            return self._send_json(200, final(job, outcome, outcome.text))
        if self._stream_line(final(job, outcome, "")):
            self._end_stream()


ROUTES = {
    "/": {"GET": Handler.root}, "/api/version": {"GET": Handler.version},
    "/api/tags": {"GET": Handler.tags}, "/api/ps": {"GET": Handler.ps}, "/api/show": {"POST": Handler.show},
    "/api/chat": {"POST": Handler.chat}, "/api/generate": {"POST": Handler.generate},
}


class OllamaServer(ThreadingHTTPServer):
    """A thread per connection; the engine serializes the model. Tracks requests in flight so a
    shutdown can let them finish."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int]):
        """Binds the socket (so a port in use fails before a slow model load); `serve_model` next."""
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.active, self.draining = 0, False
        self.idle = threading.Condition()
        super().__init__(address, Handler)

    def serve_model(self, engine, card: ModelCard) -> None:
        self.engine, self.card = engine, card
        self.template = ChatTemplate(engine.lm.chat_prompt if engine.lm.has_chat_template else None)

    @contextmanager
    def tracking(self, handler: Handler):
        with self.idle:
            if self.draining:   # a kept-alive connection after shutdown began
                handler.close_connection = True
                raise ApiError(503, "server is shutting down")
            self.active += 1
        try:
            yield
        finally:
            with self.idle:
                self.active -= 1
                self.idle.notify_all()
                handler.close_connection |= self.draining

    def drain(self, grace_s: float) -> bool:
        """Refuse new requests and wait up to grace_s for those in flight; True if all finished."""
        with self.idle:
            self.draining = True
            return self.idle.wait_for(lambda: self.active == 0, timeout=grace_s)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
