"""The judge: reply parsing, faults of a misbehaving server, the reply cache.

Fault tests point the real `ollama` client at throwaway stdlib HTTP servers on 127.0.0.1 that
answer slowly, answer garbage, fail with 500, die mid-run or lack the model. The happy path (and
the cache's zero-request re-run) goes through the project's real Ollama-compatible server
(`ollama_server` fixture), counted by a transparent proxy.
"""
from __future__ import annotations

import functools
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fake_servers import FakeOllama  # noqa: F401  (other test files import it from here)

from harness.judge import Grade, JudgeConfigError, OllamaJudge
from harness.cli import UserError
from harness.judge.styles import get_style, parse_reply

Z, M = get_style("zero_to_hundred"), get_style("mt_bench")
ITEMS = [(f"Task {i}: name a colour.", "Blue.", f"Answer {i}: red.") for i in range(5)]


@pytest.mark.parametrize("style, reply, score, parse", [
    (Z, "85", 85, "strict"), (Z, " 100\n", 100, "strict"), (Z, "0", 0, "strict"),
    (Z, '{"score": 90}', 90, "strict"),
    (Z, "Score: 85", 85, "fallback"), (Z, "**Score:** 72\nIt misses a step.", 72, "fallback"),
    (Z, "85/100", 85, "fallback"), (Z, "Score: 85 out of 100", 85, "fallback"),
    (Z, "I would give it 85.", 85, "fallback"), (Z, "Reasoning first.\n\n64\n", 64, "fallback"),
    (M, "Close to the reference. Rating: [[7]]", 7, "strict"), (M, "[[7.5]]", 7.5, "strict"),
    (M, "Example [[5]] ... so my verdict: [[8]]", 8, "strict"),
    (M, '{"explanation": "fine", "rating": 6}', 6, "strict"),
    (M, "Rating: [7]", 7, "fallback"), (M, "rating: 7", 7, "fallback"), (M, "7 out of 10", 7, "fallback"),
    (M, "Explanation.\n\n8", 8, "fallback"),
])
def test_parse_scores(style, reply, score, parse):
    got = parse_reply(style, reply)
    assert (got.score, got.parse, got.error) == (score, parse, None)


@pytest.mark.parametrize("style, reply, error", [
    (Z, "101", "out of range 0-100"), (Z, "-3", "out of range"), (Z, '{"score": 190}', "out of range"),
    (Z, "170/100", "out of range"), (Z, "Score: 85.5", "not an integer"),
    (Z, "The response scores 8/10", "unparseable"), (Z, "Score: 9 out of 10", "unparseable"),
    (Z, "I cannot grade this.", "unparseable"), (Z, "1. good\n2. bad", "unparseable"), (Z, "  ", "empty"),
    (M, "[[11]]", "out of range 1-10"), (M, "[[0]]", "out of range"), (M, "Rating: 70/100", "unparseable"),
    (M, "It lists 3 items and 2 are wrong.", "unparseable"), (M, '{"rating": "good"}', "unparseable"),
])
def test_parse_unscored(style, reply, error):
    got = parse_reply(style, reply)
    assert got.score is None and got.parse is None and error in got.error


# --- throwaway servers ---------------------------------------------------------------------------

def chat_body(content: str) -> bytes:
    return json.dumps({"model": "judge:latest", "created_at": "2024-01-01T00:00:00Z",
                       "message": {"role": "assistant", "content": content}, "done": True,
                       "done_reason": "stop", "eval_count": 1, "prompt_eval_count": 1}).encode()


@pytest.fixture
def fake():
    servers = []

    def start(behave, **kw):
        servers.append(FakeOllama(behave, **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.kill()


def judge_for(url, tmp_path, **kw):
    kw = {"model": "judge", "retries": 1, "backoff_s": 0.01, "timeout": 5, "progress": False,
          "cache_dir": str(tmp_path / "cache"), **kw}
    return OllamaJudge(url, **kw)


def test_slow_server_times_out_then_unscored(fake, tmp_path):
    server = fake(lambda n, req: (time.sleep(1.0), (200, chat_body("90")))[1])
    judge = judge_for(server.url, tmp_path, timeout=0.2, retries=1)
    t0 = time.perf_counter()
    grades = judge.grade_many(ITEMS[:3])
    assert len(grades) == 3 and all(g.score is None for g in grades)
    assert all(g.error == "timeout after 2 attempts" for g in grades[:2])
    # two samples in a row used up their retries: the server is taken to be down, one try each
    assert grades[2].error == "timeout after 1 attempt" and server.chat_requests == 5
    assert all(g.transient for g in grades)                   # the judge failed, not its reply: retry
    assert time.perf_counter() - t0 < 3
    assert not list((tmp_path / "cache").rglob("*.json"))     # failures are not cached


def test_garbage_replies_are_unscored_and_cached(fake, tmp_path):
    server = fake(lambda n, req: (200, chat_body("What a lovely answer! I like it a lot.")))
    grades = judge_for(server.url, tmp_path).grade_many(ITEMS)
    assert len(grades) == len(ITEMS) and server.chat_requests == len(ITEMS)
    assert all(g.score is None and g.error == "unparseable reply" and "lovely" in g.raw for g in grades)
    assert not any(g.transient for g in grades)               # a real reply without a score is final
    again = judge_for(server.url, tmp_path).grade_many(ITEMS)      # temperature 0: same reply again
    assert server.chat_requests == len(ITEMS) and all(g.cached and not g.transient for g in again)
    assert [g.raw for g in again] == [g.raw for g in grades]


def test_unwritable_cache_still_grades(fake, tmp_path):
    server = fake(lambda n, req: (200, chat_body("75")))
    (blocker := tmp_path / "file").write_text("not a folder")
    grade = judge_for(server.url, tmp_path, cache_dir=str(blocker)).grade(*ITEMS[0])
    assert (grade.score, grade.cached) == (75, False)


def test_non_json_body_is_retried_then_unscored(fake, tmp_path):
    server = fake(lambda n, req: (200, b"<html>proxy error</html>"))
    grade = judge_for(server.url, tmp_path, retries=2).grade(*ITEMS[0])
    assert grade.score is None and "malformed response" in grade.error and server.chat_requests == 3
    assert grade.transient


def test_server_errors_are_retried(fake, tmp_path):
    server = fake(lambda n, req: (500, b'{"error": "busy"}') if n < 2 else (200, chat_body("85")))
    grade = judge_for(server.url, tmp_path, retries=3).grade(*ITEMS[0])
    assert (grade.score, grade.parse, grade.error, server.chat_requests) == (85, "strict", None, 3)
    assert not grade.transient
    assert server.chat_requests == 3
    too_few = fake(lambda n, req: (503, b'{"error": "busy"}') if n < 2 else (200, chat_body("85")))
    grade = judge_for(too_few.url, tmp_path / "other", retries=1).grade(*ITEMS[0])
    assert grade.score is None and grade.error == "HTTP 503 after 2 attempts" and grade.transient


def test_server_dies_mid_run(fake, tmp_path):
    def behave(n, req):
        if n < 2:
            return 200, chat_body(str(60 + n))
        threading.Thread(target=server.kill).start()   # dies while answering the third request
        return None
    server = fake(behave)
    grades = judge_for(server.url, tmp_path).grade_many(ITEMS)
    assert len(grades) == len(ITEMS)
    assert [g.score for g in grades[:2]] == [60, 61]
    assert all(g.score is None and "connection error" in g.error and g.transient for g in grades[2:])
    assert not any(g.transient for g in grades[:2])


def test_outage_is_not_cached_and_a_rerun_scores(fake, tmp_path):
    state = {"down": True}
    server = fake(lambda n, req: (503, b'{"error": "overloaded"}') if state["down"] else (200, chat_body("70")))
    grades = judge_for(server.url, tmp_path).grade_many(ITEMS[:3])
    assert all(g.score is None and g.transient and g.raw == "" for g in grades)
    assert not list((tmp_path / "cache").rglob("*.json"))     # an outage is never remembered
    state["down"] = False                                     # the judge is back: a rerun, a new process
    before = server.chat_requests
    again = judge_for(server.url, tmp_path).grade_many(ITEMS[:3])
    assert [(g.score, g.cached, g.transient) for g in again] == [(70, False, False)] * 3
    assert server.chat_requests == before + 3
    assert [g.prompt_hash for g in again] == [g.prompt_hash for g in grades]
    third = judge_for(server.url, tmp_path).grade_many(ITEMS[:3])   # now the replies are cached
    assert server.chat_requests == before + 3 and all(g.cached and g.score == 70 for g in third)


def test_concurrent_grades_keep_order(fake, tmp_path):
    def behave(n, req):
        number = req["messages"][-1]["content"].split("Answer ")[1].split(":")[0]
        time.sleep(0.05 * (5 - int(number)))           # later items answer first
        return 200, chat_body(str(10 * int(number)))
    server = fake(behave)
    grades = judge_for(server.url, tmp_path, concurrency=4).grade_many(ITEMS)
    assert [g.score for g in grades] == [0, 10, 20, 30, 40]


def test_model_not_found(fake, tmp_path):
    server = fake(lambda n, req: (404, b'{"error": "model \'judge\' not found"}'))
    with pytest.raises(JudgeConfigError, match=r"ollama pull judge`"):
        judge_for(server.url, tmp_path).grade(*ITEMS[0])              # listed, but chat says 404
    with pytest.raises(JudgeConfigError, match=r"ollama pull llama3.1:8b.*/api/tags") as e:
        judge_for(server.url, tmp_path, model="llama3.1:8b").grade_many(ITEMS)
    assert "judge:latest" in str(e.value) and isinstance(e.value, UserError)
    assert server.chat_requests == 1


@pytest.fixture
def plain_http(tmp_path):
    """`python -m http.server` on 127.0.0.1 serving an empty folder: 404 for GETs, 501 for POSTs."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_plain_http_server_is_not_ollama(plain_http, tmp_path):
    url, _ = plain_http
    with pytest.raises(JudgeConfigError) as e:
        judge_for(url, tmp_path).grade_many(ITEMS)            # GET /api/tags: 404 HTML page
    msg = str(e.value)
    assert f"judge.host={url} does not speak the Ollama API" in msg and "\n" not in msg
    assert "GET /api/version answered HTTP 404 'Error response" in msg and "File not found" in msg
    assert "ollama pull" not in msg and "<" not in msg


def test_plain_http_server_with_a_tags_file_fails_at_chat(plain_http, tmp_path):
    url, root = plain_http                                    # /api/tags is a static file: listing works
    (root / "api").mkdir()
    (root / "api" / "tags").write_text(json.dumps({"models": [{"model": "judge:latest", "digest": "d"}]}))
    judge = judge_for(url, tmp_path, retries=3, backoff_s=1.0)   # a retry would cost seconds
    t0 = time.perf_counter()
    with pytest.raises(JudgeConfigError, match=r"does not speak the Ollama API.*HTTP 404") as e:
        judge.grade(*ITEMS[0])                                # POST /api/chat: 501, not retried
    assert "ollama pull" not in str(e.value) and time.perf_counter() - t0 < 2


@pytest.mark.parametrize("host, why", [
    ("notaurl::::", "not a port number"), ("", "empty"), (None, "empty"), ("ftp://x", "scheme is 'ftp'"),
    ("http://127.0.0.1:99999", "not a port number"), ("127.0.0.1:0", "port 0"), ("http://", "neither"),
    ("http://[::1", "does not parse"), ("http://127.0.0.1:11434?x=1", "query"), ("127.0.0.1 :11434", "whitespace"),
])
def test_bad_host_is_one_line_at_construction(host, why):
    with pytest.raises(JudgeConfigError) as e:
        OllamaJudge(host)
    msg = str(e.value)
    assert msg.startswith(f"judge.host={host!r} is not a judge address") and why in msg
    assert "a valid value looks like http://127.0.0.1:11434" in msg and "\n" not in msg


@pytest.mark.parametrize("host", ["http://127.0.0.1:11434", "127.0.0.1", ":11434", "localhost:8080",
                                  "https://127.0.0.1/ollama", "[::1]:11434"])
def test_good_hosts_construct_without_contacting_anyone(host):
    assert OllamaJudge(host).host == host


def test_unreachable_at_start(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                      # closed again: nothing listens there
    judge = judge_for(f"http://127.0.0.1:{port}", tmp_path, retries=0)
    with pytest.raises(JudgeConfigError, match=rf"judge.host=http://127.0.0.1:{port}.*ollama serve"):
        judge.grade_many(ITEMS)


def test_bad_settings():
    with pytest.raises(UserError, match="unknown judge style"):
        OllamaJudge("http://127.0.0.1:1", style="five_stars")
    with pytest.raises(JudgeConfigError, match="concurrency"):
        OllamaJudge("http://127.0.0.1:1", concurrency=0)


# --- the real server ---------------------------------------------------------------------------

class CountingProxy:
    """Forwards every request to `upstream` unchanged, counting them by path."""

    def __init__(self, upstream: str):
        self.counts: dict[str, int] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                owner.counts[self.path] = owner.counts.get(self.path, 0) + 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                req = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=120) as r:
                        status, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, data = e.code, e.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("style", ["zero_to_hundred", "mt_bench"])
def test_real_server_grades_and_cache_makes_no_requests(ollama_server, tmp_path, style):
    proxy = CountingProxy(ollama_server.url)
    try:
        kw = dict(model=ollama_server.model, style=style, num_predict=24, timeout=120)
        first = judge_for(proxy.url, tmp_path, **kw).grade_many(ITEMS[:2])
        assert len(first) == 2 and all(isinstance(g, Grade) and g.raw and not g.cached for g in first)
        assert all((g.score is None) == (g.parse is None) == (g.error is not None) for g in first)
        assert proxy.counts.get("/api/chat") == 2
        judge = judge_for(proxy.url, tmp_path, **kw)
        assert judge.digest                            # the model's digest from /api/tags
        assert judge.client._not_ollama() is None      # harness.serve answers /api/version like Ollama
        second = judge.grade_many(ITEMS[:2])           # a new judge, same cache folder
        assert proxy.counts.get("/api/chat") == 2      # zero chat requests
        assert [(g.score, g.raw, g.prompt_hash) for g in second] == [(g.score, g.raw, g.prompt_hash)
                                                                      for g in first]
        assert all(g.cached for g in second)
    finally:
        proxy.close()
