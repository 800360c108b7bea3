"""harness.serve: the real `ollama` client (and curl) against our Ollama-compatible server running
SmolLM2 (the session fixture `ollama_server`), answers compared with in-process TorchLM.generate;
the CLI's bad-input errors and shutdown on the tiny random-init model; incremental detokenization
with a real tokenizer. Every request goes to 127.0.0.1."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ollama = pytest.importorskip("ollama")

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 24}


@pytest.fixture(scope="module")
def client(ollama_server):
    return ollama.Client(host=ollama_server.url, timeout=120)


def greedy_reference(lm, prompt: str, n: int = 24, stop=()) -> str:
    return lm.generate([prompt], max_new_tokens=n, stop=stop)[0]


def post(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, r.read()


# ----------------------------------------------------------------------------- chat and generate

def test_chat_greedy_equals_in_process_generate(client, ollama_server, smollm2_lm):
    r = client.chat(model=ollama_server.model, messages=FRANCE, stream=False, options=GREEDY)
    prompt = smollm2_lm.chat_prompt(FRANCE)
    assert "Paris" in r.message.content
    assert r.message.role == "assistant" and r.done and r.done_reason == "stop"
    assert r.message.content == greedy_reference(smollm2_lm, prompt)
    assert r.prompt_eval_count == len(smollm2_lm.encode(prompt))
    assert r.eval_count > 0 and r.total_duration >= r.eval_duration > 0


def test_chat_stream_concatenates_to_the_non_streamed_answer(client, ollama_server):
    # Japanese text: multi-byte characters split across tokens exercise the "\ufffd" hold-back
    messages = [{"role": "user", "content": "Say 'good morning' in Japanese, then in French."}]
    opts = {"temperature": 0, "num_predict": 32}
    whole = client.chat(model=ollama_server.model, messages=messages, stream=False, options=opts)
    parts = list(client.chat(model=ollama_server.model, messages=messages, stream=True, options=opts))
    assert all(p.message.role == "assistant" and not p.done for p in parts[:-1])
    last = parts[-1]
    assert last.done and last.message.content == "" and last.done_reason == whole.done_reason
    assert last.eval_count == whole.eval_count and last.prompt_eval_count == whole.prompt_eval_count
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert not any("\ufffd" in p.message.content for p in parts)


def test_generate_templated_raw_and_streamed(client, ollama_server, smollm2_lm):
    q = "What is the capital of France?"
    r = client.generate(model=ollama_server.model, prompt=q, options=GREEDY)
    assert r.response == greedy_reference(smollm2_lm, smollm2_lm.chat_prompt([{"role": "user", "content": q}]))
    raw = "The three primary colors are"
    r = client.generate(model=f"{ollama_server.model}:latest", prompt=raw, raw=True, options=GREEDY)
    assert r.response == greedy_reference(smollm2_lm, raw) and r.model == f"{ollama_server.model}:latest"
    parts = list(client.generate(model=ollama_server.model, prompt=raw, raw=True, stream=True, options=GREEDY))
    assert "".join(p.response for p in parts) == r.response and parts[-1].done
    sys_r = client.generate(model=ollama_server.model, prompt=q, system="Answer in one word.", options=GREEDY)
    assert sys_r.response == greedy_reference(smollm2_lm, smollm2_lm.chat_prompt(
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": q}]))


def test_empty_prompt_answers_load(client, ollama_server):
    r = client.generate(model=ollama_server.model, prompt="")
    assert r.done and r.done_reason == "load" and r.response == ""
    r = client.chat(model=ollama_server.model, messages=[])
    assert r.done and r.done_reason == "load"


def test_stop_strings_cut_before_the_stop(client, ollama_server, smollm2_lm):
    opts = dict(GREEDY, stop=["Paris"])
    r = client.chat(model=ollama_server.model, messages=FRANCE, stream=False, options=opts)
    ref = greedy_reference(smollm2_lm, smollm2_lm.chat_prompt(FRANCE), stop=["Paris"])
    assert r.message.content == ref and "Paris" not in ref and ref.strip()
    assert r.done_reason == "stop"
    parts = list(client.chat(model=ollama_server.model, messages=FRANCE, stream=True, options=opts))
    assert "".join(p.message.content for p in parts) == ref


def test_num_predict_limits_tokens(client, ollama_server, smollm2_lm):
    r = client.generate(model=ollama_server.model, prompt="Once upon a time", raw=True,
                        options={"temperature": 0, "num_predict": 3})
    assert r.eval_count == 3 and r.done_reason == "length"
    assert r.response == greedy_reference(smollm2_lm, "Once upon a time", n=3)


def test_seed_reproducible_and_equal_to_in_process_sampling(client, ollama_server, smollm2_lm):
    msgs = [{"role": "user", "content": "Write a short poem about autumn leaves."}]
    opts = {"temperature": 1.0, "seed": 7, "num_predict": 24}
    a = client.chat(model=ollama_server.model, messages=msgs, options=opts).message.content
    b = client.chat(model=ollama_server.model, messages=msgs, options=opts).message.content
    assert a == b
    # Ollama's defaults top_k 40 / top_p 0.9 apply, with the same sampler as TorchLM.generate
    ref = smollm2_lm.generate([smollm2_lm.chat_prompt(msgs)], max_new_tokens=24, temperature=1.0,
                              top_k=40, top_p=0.9, seed=7)[0]
    assert a == ref
    others = {client.chat(model=ollama_server.model, messages=msgs, options=dict(opts, seed=s)).message.content
              for s in (1, 2)}
    assert others != {a}


def test_num_ctx_truncates_the_prompt_from_the_left(client, ollama_server, smollm2_lm):
    from models.generate import generate_tokens
    text = " ".join(f"word{i}" for i in range(300))
    r = client.generate(model=ollama_server.model, prompt=text, raw=True,
                        options={"temperature": 0, "num_predict": 4, "num_ctx": 64})
    assert r.prompt_eval_count == 60 and r.eval_count == 4   # 64 minus room for the 4 requested
    ids = smollm2_lm.encode(text)[-60:]
    new = generate_tokens(smollm2_lm.model, [ids], max_new_tokens=4, eos_ids=smollm2_lm.stop_ids())[0]
    assert r.response == smollm2_lm.tokenizer.decode(new)

# ----------------------------------------------------------------------------- metadata

def test_list_show_ps_version(client, ollama_server, smollm2_path):
    from models.registry import MODELS
    pinned = MODELS["smollm2-135m-instruct"].files[smollm2_path.name]
    tag = f"{ollama_server.model}:latest"
    (m,) = client.list().models
    assert m.model == tag and m.digest == pinned and m.size == smollm2_path.stat().st_size
    assert m.details.format == "gguf" and m.details.family == "llama" and m.details.quantization_level == "Q4_1"
    show = client.show(ollama_server.model)
    info = show.modelinfo
    assert info["general.architecture"] == "llama" and info["llama.context_length"] == 8192
    assert info["llama.embedding_length"] == 576 and 130e6 < info["general.parameter_count"] < 140e6
    assert show.capabilities == ["completion"] and "im_start" in show.template
    (p,) = client.ps().models
    assert p.model == tag and p.digest == pinned and p.context_length == 4096
    status, body = get(f"{ollama_server.url}/api/version")
    assert status == 200 and json.loads(body)["version"]
    assert get(ollama_server.url) == (200, b"Ollama is running")
    head = urllib.request.Request(ollama_server.url, method="HEAD")
    with urllib.request.urlopen(head, timeout=30) as r:
        assert r.status == 200 and r.read() == b""


# ----------------------------------------------------------------------------- errors

def test_unknown_model_is_404(client):
    for call in (lambda: client.chat(model="nope", messages=FRANCE),
                 lambda: client.generate(model="nope", prompt="hi"),
                 lambda: client.show("nope:latest")):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404 and "model 'nope" in e.value.error and "not found" in e.value.error


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"", "missing request body"),
    (b'{"messages": []}', "model is required"),
    (b'{"model": "M", "messages": "hello"}', "messages"),
    (b'{"model": "M", "messages": [{"content": "hi"}]}', "role"),
    (b'{"model": "M", "messages": [{"role": "user", "content": 5}]}', "content"),
    (b'{"model": "M", "messages": [], "options": {"temperature": "hot"}}', "temperature"),
    (b'{"model": "M", "messages": [], "options": {"stop": [1]}}', "stop"),
    (b'{"model": "M", "messages": [], "stream": "yes"}', "stream"),
    (b'{"model": "M", "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}', "images"),
])
def test_bad_chat_bodies_are_400(ollama_server, body, needle):
    body = body.replace(b'"M"', json.dumps(ollama_server.model).encode())
    status, reply = post(f"{ollama_server.url}/api/chat", body)
    assert status == 400 and needle in reply["error"], reply


def test_unknown_path_and_method(ollama_server):
    status, reply = post(f"{ollama_server.url}/api/nothing", b"{}")
    assert status == 404 and "error" in reply
    status, reply = post(f"{ollama_server.url}/api/tags", b"{}")
    assert status == 405


def test_ignored_fields_are_accepted(client, ollama_server):
    r = client.chat(model=ollama_server.model, messages=FRANCE, keep_alive="5m", format="", think=False,
                    tools=[], options={"temperature": 0, "num_predict": 4, "repeat_penalty": 1.1, "mirostat": 0})
    assert r.done and r.eval_count == 4


def test_client_disconnect_mid_stream_frees_the_model(client, ollama_server):
    host, port = ollama_server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": ollama_server.model, "prompt": "Count to one thousand:", "raw": True,
                       "options": {"temperature": 0, "num_predict": 2000}}).encode()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    # the abandoned generation stops at its next write; this request then runs normally
    r = client.generate(model=ollama_server.model, prompt="Hello", raw=True,
                        options={"temperature": 0, "num_predict": 4})
    assert r.eval_count == 4 and r.total_duration < 60e9


# ----------------------------------------------------------------------------- concurrency, curl

def test_four_concurrent_clients_get_their_lone_answers(ollama_server):
    prompts = ["Name a color.", "What is 2 + 2?", "Name a fruit.", "What is the opposite of hot?"]
    opts = {"temperature": 0, "num_predict": 16}

    def ask(q: str, stream: bool) -> str:
        c = ollama.Client(host=ollama_server.url, timeout=120)
        msgs = [{"role": "user", "content": q}]
        if stream:
            return "".join(p.message.content for p in c.chat(model=ollama_server.model, messages=msgs,
                                                              stream=True, options=opts))
        return c.chat(model=ollama_server.model, messages=msgs, options=opts).message.content

    lone = [ask(q, False) for q in prompts]
    assert len(set(lone)) == 4
    got: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, ask(prompts[i], i % 2 == 0)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [got.get(i) for i in range(4)] == lone


def test_curl_stream(ollama_server, client):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = {"model": ollama_server.model, "prompt": "The sky is", "raw": True,
            "options": {"temperature": 0, "num_predict": 12}}
    p = subprocess.run(["curl", "-sN", f"{ollama_server.url}/api/generate", "-d", json.dumps(body)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    assert lines[-1] == "" and all(line.strip() for line in lines[:-1])   # no blank lines
    parts = [json.loads(line) for line in lines[:-1]]
    assert parts[-1]["done"] and parts[-1]["done_reason"] == "length" and parts[-1]["eval_count"] == 12
    whole = client.generate(model=ollama_server.model, prompt="The sky is", raw=True, options=body["options"])
    assert "".join(x["response"] for x in parts) == whole.response


# ----------------------------------------------------------------------------- the CLI

def serve(*args, timeout=120):
    """`python -m harness.serve args` for arguments it refuses: in this process (clitools.run_module), as
    a fresh interpreter would add only a torch import."""
    from clitools import run_module
    return run_module("harness.serve", *args, env=ENV)


def one_error_line(p) -> str:
    assert p.returncode == 2, p.stdout + p.stderr
    errs = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errs) == 1 and "Traceback" not in p.stderr and p.stdout == "", p.stderr
    return errs[0]


def tiny_checkpoint(folder: Path, num_classes: int = 0) -> Path:
    from models.checkpoint import build_model, save_checkpoint
    from models.gpt import GPT_CONFIGS
    from models.tokenizer import gpt2_tokenizer
    model = build_model("gpt", dict(GPT_CONFIGS["gpt-tiny"], num_classes=num_classes))
    return save_checkpoint(folder, model, gpt2_tokenizer(), {}, labels=["ham", "spam"] if num_classes else None)


def test_cli_bad_input(tmp_path):
    assert "unknown model 'nope'" in one_error_line(serve("model=nope"))
    assert "nor an existing path" in one_error_line(serve(f"model={tmp_path}/missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    assert "cannot read GGUF file" in one_error_line(serve(f"model={tmp_path}/junk.gguf"))
    spam = tiny_checkpoint(tmp_path / "spam", num_classes=2)
    assert "is a classifier" in one_error_line(serve(f"model={spam}"))
    assert "port" in one_error_line(serve("model=gpt-tiny", "port=70000"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert "cannot listen on 127.0.0.1" in one_error_line(serve("model=gpt-tiny", f"port={port}"))


def test_served_name_defaults(tmp_path, smollm2_path):
    from omegaconf import OmegaConf

    from harness.serve import served_name
    folder = tiny_checkpoint(tmp_path / "my-ckpt.v2")
    for source, want in ((str(folder), "my-ckpt.v2"), (str(smollm2_path), "SmolLM2-135M-Instruct.Q4_1"),
                         ("gpt-tiny", "gpt-tiny")):
        assert served_name(OmegaConf.create({"name": None, "model": {"name": source}})) == want
    assert served_name(OmegaConf.create({"name": "judge", "model": {"name": "gpt-tiny"}})) == "judge"


def test_cli_serves_a_checkpoint_folder_and_stops_gracefully_on_sigterm(tmp_path):
    from models.download import sha256_file
    folder = tiny_checkpoint(tmp_path / "ckpt")
    proc = subprocess.Popen([sys.executable, "-m", "harness.serve", f"model={folder}", "port=0", "name=tiny",
                             "dtype=bfloat16"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny on http://127.0.0.1:"), line + proc.stderr.read()
        c = ollama.Client(host=line.split()[-1], timeout=60)
        (m,) = c.list().models
        assert m.model == "tiny:latest" and m.digest == sha256_file(folder / "model.safetensors")
        assert m.details.format == "safetensors" and m.details.family == "gpt2"
        assert m.details.quantization_level == "BF16" and c.show("tiny").modelinfo["harness.dtype"] == "bfloat16"
        stream = c.generate(model="tiny", prompt="Hello", stream=True, options={"num_predict": 200, "seed": 1})
        first = next(stream)
        proc.send_signal(signal.SIGTERM)        # the request in flight still completes
        rest = list(stream)
        assert not first.done and rest[-1].done and rest[-1].eval_count >= 1
        assert proc.wait(timeout=60) == 0
        assert "SIGTERM: shutting down" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- incremental detokenization

def test_stream_decoder_deltas_concatenate_to_the_final_text():
    from harness.serve.engine import StreamDecoder
    from models.tokenizer import gpt2_tokenizer
    tok = gpt2_tokenizer()
    text = "Café ☕ — 日本語のテキスト END of story END again"
    ids = tok.encode(text)
    for stop in ([], ["END"], ["story E", "xyz"], ["ス"]):
        d = StreamDecoder(tok.decode, stop)
        deltas = []
        for n in range(1, len(ids) + 1):
            deltas.append(d.push(ids[:n]))
            if d.stopped:
                break
        final, rest = d.finish(ids[:n])
        deltas.append(rest)
        cut = min((text.find(s) for s in stop if s in text), default=len(text))
        assert final == text[:cut] and "".join(deltas) == final
        assert not any("\ufffd" in x for x in deltas)
        assert all(s not in "".join(deltas) for s in stop)


def test_is_loopback():
    from harness.serve import is_loopback
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_parse_sampling_defaults_and_edges():
    from harness.serve.ollama_api import ApiError, Sampling, parse_sampling
    assert parse_sampling(None) == Sampling(temperature=0.8, top_k=40, top_p=0.9, seed=None, num_predict=-1)
    s = parse_sampling({"temperature": 1e-9, "seed": -1, "stop": "###", "num_ctx": 512, "mirostat": 2})
    assert s.temperature == 0 and s.seed is None and s.stop == ("###",) and s.num_ctx == 512
    assert parse_sampling({"temperature": 0.7, "top_p": 0}).temperature == 0   # keeps the top token only
    for bad in ({"temperature": -1}, {"top_p": float("nan")}, {"seed": 1.5}, {"num_ctx": 0},
                {"num_predict": True}, {"stop": ["a", None]}):
        with pytest.raises(ApiError) as e:
            parse_sampling(bad)
        assert e.value.status == 400 and next(iter(bad)) in e.value.message
