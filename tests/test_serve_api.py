"""harness.serve's Ollama API beyond chat and generate, and what the HTTP stack (FastAPI on uvicorn)
adds: chunked request bodies, keep-alive, /api/pull of the served model, 501 for model management,
keep_alive 0, /api/generate's context / template / suffix and /api/chat's tools (refused without
template support; rendered and parsed: tests/test_ollama_extras.py). The real `ollama` client where it exposes the behaviour, raw
HTTP where it hides it; the session server `ollama_server` (SmolLM2 on 127.0.0.1)."""
from __future__ import annotations

import http.client
import json
import socket

import pytest

from harness.serve.ollama_api import (ApiError, ChatTemplate, ModelCard, parse_chat, parse_keep_alive,
                                      render_go_template)

ollama = pytest.importorskip("ollama")

Q = "What is the capital of France?"
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def client(ollama_server):
    return ollama.Client(host=ollama_server.url, timeout=120)


def address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def raw_request(server, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request on a fresh socket (Connection: close); (status, body after the headers)."""
    with socket.create_connection(address(server), timeout=60) as s:
        s.sendall(head + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    header, _, rest = data.partition(b"\r\n\r\n")
    return int(header.split()[1]), rest


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, data = out + data[:n], data[n + 2:]
    return out


# ----------------------------------------------------------------------------- HTTP

def test_chunked_request_body_is_accepted(ollama_server):
    body = json.dumps({"model": ollama_server.model, "prompt": "Hello", "raw": True, "stream": False,
                       "options": {"temperature": 0, "num_predict": 3}}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    status, rest = raw_request(ollama_server, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Transfer-Encoding: chunked\r\nConnection: close\r\n", chunks + b"0\r\n\r\n")
    assert status == 200, rest
    assert json.loads(rest)["eval_count"] == 3


def test_keep_alive_serves_requests_on_one_connection(ollama_server):
    host, port = address(ollama_server)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("GET", "/api/version")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["version"]
        sock = conn.sock
        body = json.dumps({"model": ollama_server.model, "prompt": "Hi", "raw": True, "stream": False,
                           "options": {"temperature": 0, "num_predict": 2}})
        conn.request("POST", "/api/generate", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["eval_count"] == 2
        assert conn.sock is sock   # the same connection answered both
    finally:
        conn.close()


def test_body_over_the_limit_is_413(ollama_server):
    status, rest = raw_request(ollama_server, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Length: 100000000\r\nConnection: close\r\n")
    assert status == 413 and "limit" in json.loads(rest)["error"]


# ----------------------------------------------------------------------------- model management

def test_pull_of_the_served_model_is_a_no_op(client, ollama_server):
    lines = list(client.pull(ollama_server.model, stream=True))
    assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
    assert any(p.digest and p.total == p.completed for p in lines)
    assert client.pull(f"{ollama_server.model}:latest").status == "success"
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3.1:8b")
    assert e.value.status_code == 404 and "harness.serve serves only" in e.value.error


def test_model_management_is_501(client, ollama_server, tmp_path):
    name = ollama_server.model
    for call in (lambda: client.push(name), lambda: client.create(model="other", from_=name),
                 lambda: client.copy(name, "other"), lambda: client.delete(name)):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 501 and "harness.serve serves one fixed model" in e.value.error
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"x" * 100_000)
    with pytest.raises(ollama.ResponseError) as e:   # the client streams the file: a chunked body
        client.create_blob(blob)
    assert e.value.status_code == 501 and "blob upload is not supported" in e.value.error
    status, _ = raw_request(ollama_server, b"HEAD /api/blobs/sha256:abc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
    assert status == 501
    status, rest = raw_request(ollama_server, b"GET /api/delete HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
    assert status == 405 and "not allowed" in json.loads(rest)["error"]


# ----------------------------------------------------------------------------- keep_alive, context, template

def test_keep_alive_zero_answers_unload(client, ollama_server):
    r = client.generate(model=ollama_server.model, prompt="", keep_alive=0)
    assert r.done and r.done_reason == "unload"
    assert client.chat(model=ollama_server.model, messages=[], keep_alive="0s").done_reason == "unload"
    assert client.generate(model=ollama_server.model, prompt="", keep_alive="5m").done_reason == "load"
    # a request with text still generates (the one model stays loaded)
    r = client.generate(model=ollama_server.model, prompt="Hi", raw=True, keep_alive=0, options=GREEDY)
    assert r.done_reason in ("stop", "length") and r.eval_count > 0
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=ollama_server.model, prompt="", keep_alive="soon")
    assert e.value.status_code == 400 and "keep_alive" in e.value.error


def test_parse_keep_alive():
    assert parse_keep_alive(None) is None and parse_keep_alive(0) == 0 and parse_keep_alive("0") == 0
    assert parse_keep_alive("0s") == 0 and parse_keep_alive("0m0s") == 0 and parse_keep_alive(-1) == -1
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400 and parse_keep_alive("1.5s") == 1.5
    assert parse_keep_alive("-1m") == -60 and parse_keep_alive(2.5) == 2.5
    for bad in ("5", "m", "5 m", "", True, [1]):
        with pytest.raises(ApiError) as e:
            parse_keep_alive(bad)
        assert e.value.status == 400 and "keep_alive" in e.value.message


def test_render_go_template():
    values = {"System": "", "Prompt": "Hi", "Response": ""}
    assert render_go_template("{{ .Prompt }}", values) == "Hi"
    t = "{{- if .System }}[S]{{ .System }}[/S]\n{{ else }}[no system]\n{{- end }}\n[U]{{ .Prompt }}{{/* note */}} [A]"
    assert render_go_template(t, values) == "[no system]\n[U]Hi [A]"
    assert render_go_template(t, dict(values, System="Be brief.")) == "[S]Be brief.[/S]\n\n[U]Hi [A]"
    assert render_go_template("{{ if .Prompt }}{{ if .System }}a{{ else }}b{{ end }}{{ end }}", values) == "b"
    assert render_go_template("x  {{- .Prompt -}}  y", values) == "xHiy"
    for bad in ("{{ .Messages }}", "{{ range .Messages }}{{ end }}", "{{ if .Prompt }}x", "{{ end }}",
                "{{ else }}", "{{ json .Prompt }}"):
        with pytest.raises(ApiError) as e:
            render_go_template(bad, values)
        assert e.value.status == 400 and "template" in e.value.message


def test_context_round_trip(client, ollama_server, smollm2_lm):
    first = client.generate(model=ollama_server.model, prompt=Q, options=GREEDY)
    prompt = smollm2_lm.chat_prompt([{"role": "user", "content": Q}])
    assert first.context == smollm2_lm.encode(prompt + first.response)
    q2 = "And of Italy?"
    second = client.generate(model=ollama_server.model, prompt=q2, context=first.context, options=GREEDY)
    prefix = smollm2_lm.decode(first.context)
    whole = prefix + smollm2_lm.chat_prompt([{"role": "user", "content": q2}])
    assert second.prompt_eval_count == len(smollm2_lm.encode(whole))
    assert second.response == smollm2_lm.generate([whole], max_new_tokens=GREEDY["num_predict"])[0]
    assert second.context == smollm2_lm.encode(whole + second.response)
    streamed = list(client.generate(model=ollama_server.model, prompt=q2, context=first.context, stream=True,
                                    options=GREEDY))
    assert streamed[-1].context == second.context and not any(p.context for p in streamed[:-1])
    raw = client.generate(model=ollama_server.model, prompt="The sky is", raw=True, options=GREEDY)
    assert raw.context is None   # as Ollama: raw requests return no context
    for bad, needle in (([10**9], "outside this model's vocabulary"), ([-1], "context[0]")):
        with pytest.raises(ollama.ResponseError) as e:
            list(client.generate(model=ollama_server.model, prompt=Q, context=bad, stream=True, options=GREEDY))
        assert e.value.status_code == 400 and needle in e.value.error
    body = json.dumps({"model": ollama_server.model, "prompt": Q, "context": [1, "a"]}).encode()
    status, rest = raw_request(ollama_server, b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                               b"Content-Length: %d\r\n" % len(body), body)
    assert status == 400 and json.loads(rest)["error"].startswith("context[1] must be a token id")


def test_template_and_suffix_are_honoured_or_refused(client, ollama_server, smollm2_lm):
    name = ollama_server.model
    templated = client.generate(model=name, prompt=Q, options=GREEDY)
    own = client.show(name).template
    assert client.generate(model=name, prompt=Q, template=own, options=GREEDY).response == templated.response
    plain = client.generate(model=name, prompt="The sky is", template="{{ .Prompt }}", options=GREEDY)
    assert plain.response == client.generate(model=name, prompt="The sky is", raw=True, options=GREEDY).response
    custom = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n{{ .Prompt }}"
    r = client.generate(model=name, prompt=Q, template=custom + "<|im_end|>\n<|im_start|>assistant\n",
                        options=GREEDY)
    text = f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
    assert r.response == smollm2_lm.generate([text], max_new_tokens=GREEDY["num_predict"])[0]
    assert r.prompt_eval_count == len(smollm2_lm.encode(text))
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=name, prompt=Q, template="{{ range .Messages }}{{ .Content }}{{ end }}")
    assert e.value.status_code == 400 and "{{ range .Messages }} is not supported" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=name, prompt="def add(a, b):", suffix="    return c")
    assert e.value.status_code == 400 and "does not support insert" in e.value.error


def test_tools_without_template_support_are_400(client, ollama_server):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    assert "tools" not in client.show(ollama_server.model).template
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=ollama_server.model, messages=[{"role": "user", "content": Q}], tools=[tool])
    assert e.value.status_code == 400 and e.value.error == f"{ollama_server.model} does not support tools"


def card(template: str) -> ModelCard:
    return ModelCard(name="m", digest="0" * 64, size=1, modified_at="", details={}, model_info={},
                     template=template, parameters="", context_length=64)


def test_tools_refusal_depends_on_the_template():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    template = ChatTemplate(None)
    with pytest.raises(ApiError) as e:
        parse_chat(body, card("{{ .Prompt }}"), template)
    assert e.value.message == "m does not support tools"
    assert card("{% if tools %}...{% endif %}").show()["capabilities"] == ["completion", "tools"]
    seen = []   # a template that takes tools gets them, and the reply is parsed for calls
    job = parse_chat(body, card("{% if tools %}...{% endif %}"),
                     ChatTemplate(lambda messages, tools=None: seen.append(tools) or "prompt"))
    assert seen == [[tool]] and job.tools and job.prompt == "prompt"
    with pytest.raises(ApiError) as e:   # a tool without a function name
        parse_chat(dict(body, tools=[{"type": "function"}]), card("{% if tools %}{% endif %}"), template)
    assert e.value.status == 400 and e.value.message.startswith("tools[0] must be an object")
    assert parse_chat(dict(body, tools=[]), card("x"), template).prompt == "user: hi\nassistant:"


# ----------------------------------------------------------------------------- the app with a fake engine

class FailingEngine:
    """Hands out one piece of text, then fails: as a model that breaks mid-generation."""

    class lm:
        has_chat_template = False
        chat_prompt = None

    def __init__(self, after: int):
        self.after = after

    def run(self, job, on_delta, cancelled=lambda: False):
        for _ in range(self.after):
            on_delta("piece ", [])
        raise RuntimeError("the model broke")


@pytest.mark.parametrize("after", [0, 1])
def test_model_failure_is_500_or_a_last_stream_line(after, caplog):
    from fastapi.testclient import TestClient

    from harness.serve.app import create_app
    app = create_app(FailingEngine(after), card("{{ .Prompt }}"))
    body = {"model": "m", "prompt": "Hi", "raw": True}
    with TestClient(app) as tc, caplog.at_level("INFO", logger="harness.serve"):
        r = tc.post("/api/generate", json=dict(body, stream=False))
        assert r.status_code == 500 and r.json() == {"error": "RuntimeError: the model broke"}
        r = tc.post("/api/generate", json=body)
        lines = [json.loads(line) for line in r.text.splitlines()]
        if after:   # headers were out with the first piece: Ollama's last line carrying the error
            assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
            assert lines == [{"model": "m", "created_at": lines[0]["created_at"], "response": "piece ",
                              "done": False}, {"error": "RuntimeError: the model broke"}]
        else:       # nothing went out yet: a plain 500
            assert r.status_code == 500 and lines == [{"error": "RuntimeError: the model broke"}]
    logged = [rec.getMessage() for rec in caplog.records if '"POST /api/generate"' in rec.getMessage()]
    assert len(logged) == 2 and " 500 " in logged[0] and logged[1].split()[3] == ("200" if after else "500")


# ----------------------------------------------------------------------------- hang-ups and shutdown

COUNTING = "Count from 1 to 1000: 1, 2, 3,"
LONG = {"temperature": 0, "num_predict": 3000}


def long_request(server, stream: bool = False) -> bytes:
    body = json.dumps({"model": server.model, "prompt": COUNTING, "raw": True, "stream": stream,
                       "options": LONG}).encode()
    return b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_half_closed_connection_counts_as_gone(ollama_server):
    """A client that shuts down its sending side is gone (Go's net/http, Ollama's, cancels on EOF)."""
    import time
    before = ollama_server.log.read_text().count(" abandoned POST ")
    with socket.create_connection(address(ollama_server), timeout=60) as s:
        s.sendall(long_request(ollama_server))
        time.sleep(1.0)
        s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 30
        while ollama_server.log.read_text().count(" abandoned POST ") == before and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = [x for x in ollama_server.log.read_text().splitlines() if " abandoned POST " in x][before:]
    assert len(lines) == 1 and "the client went away" in lines[0], lines


def spawned(tmp_path, *args):
    import os
    from pathlib import Path

    from harness.serve.process import spawn_server
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    err = open(tmp_path / "stderr.log", "w")
    return spawn_server(["host=127.0.0.1", "port=0", *args], env=env, cwd=root, stderr=err, timeout=120), err


def test_generation_past_the_shutdown_grace_is_stopped_and_answered_503(tmp_path, smollm2_path):
    import signal
    import time
    server, err = spawned(tmp_path, "model=smollm2-135m-instruct", "shutdown_grace_s=1")
    try:
        with socket.create_connection(address(server), timeout=60) as s:
            s.sendall(long_request(server))
            time.sleep(1.0)
            t = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            reply = s.makefile("rb").read()
        assert reply.startswith(b"HTTP/1.1 503") and reply.endswith(b'{"error": "server is shutting down"}'), reply
        assert server.process.wait(timeout=30) == 0 and time.monotonic() - t < 15
    finally:
        server.stop()
        err.close()
    log = (tmp_path / "stderr.log").read_text()
    assert "SIGTERM: shutting down" in log and "abandoned POST /api/generate: the server is shutting down" in log


def test_second_signal_exits_at_once(tmp_path, smollm2_path):
    import signal
    import time
    # SmolLM2, not gpt-tiny: gpt-tiny's 256-token context ends the generation within a second, so the
    # server could finish its graceful stop between the two signals (and the second then found the
    # default handler back); 5000 tokens of SmolLM2 are still decoding when both signals arrive
    server, err = spawned(tmp_path, "model=smollm2-135m-instruct", "name=tiny")
    try:
        with socket.create_connection(address(server), timeout=60) as s:
            body = json.dumps({"model": "tiny", "prompt": "Hi", "raw": True, "stream": False,
                               "options": {"num_predict": 5000, "seed": 1}}).encode()
            s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)   # would wait for the generation
            time.sleep(0.3)
            t = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=10) == 128 + signal.SIGTERM and time.monotonic() - t < 5
    finally:
        server.stop()
        err.close()
