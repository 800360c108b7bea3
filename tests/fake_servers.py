"""Model servers that misbehave on purpose, on 127.0.0.1: what a real server does only by accident
(503s, 429s, dropped connections, refusing echo) scripted request by request, to test retries,
refusals and unscored samples. Tests of real answers use `harness.serve` (conftest's ollama_server)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Answer = tuple[int, bytes]


class FakeServer:
    """GET answers `get(path)`; POST answers `behave(n, request_json)` (n counts POSTs from 0), or
    None to drop the connection unanswered. `requests`: POSTs seen."""

    def __init__(self, get: Callable[[str], Answer], behave: Callable[[int, dict], Answer | None], prefix: str = ""):
        self.behave, self.requests = behave, 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(*get(self.path))

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                n, owner.requests = owner.requests, owner.requests + 1
                answer = owner.behave(n, req)
                if answer is not None:
                    self._send(*answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{prefix}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kill(self):
        self.server.shutdown()
        self.server.server_close()      # the port now refuses connections

    close = kill


class FakeOllama(FakeServer):
    """Lists `models` at /api/tags, answers /api/version like Ollama; /api/chat answers
    `behave(n, request)`. `chat_requests` counts them."""

    def __init__(self, behave, models=("judge:latest",)):
        def get(path: str) -> Answer:
            if path == "/api/version":
                return 200, b'{"version": "0.0.0-fake"}'
            return 200, json.dumps({"models": [{"model": m, "name": m, "digest": "d1g35t" + m} for m in models]}).encode()
        super().__init__(get, behave)

    @property
    def chat_requests(self) -> int:
        return self.requests


class FakeOpenAI(FakeServer):
    """/v1/models lists "m"; POST /v1/completions answers behave(n, request)."""

    def __init__(self, behave):
        models = {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "test"}]}
        super().__init__(lambda path: (200, json.dumps(models).encode()), behave, prefix="/v1")
