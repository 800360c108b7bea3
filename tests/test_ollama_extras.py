"""harness.serve's Ollama API beyond plain text: /api/embed and /api/embeddings, log-probs on
/api/generate and /api/chat (streamed and not), `format` (JSON / a JSON schema, enforced) and tool
calling. The real `ollama` client over real HTTP on 127.0.0.1: the session server `ollama_server`
(SmolLM2) and, for tools, a server of a tiny random Llama whose tokenizer carries a Hermes-style
chat template; the pure tool-call parsing without either."""
from __future__ import annotations

import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.serve.ollama_tools import parse_tool_calls

ollama = pytest.importorskip("ollama")
ROOT = Path(__file__).resolve().parent.parent
GREEDY = {"temperature": 0, "num_predict": 8}
Q = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(ollama_server):
    return ollama.Client(host=ollama_server.url, timeout=120)


def norm(v) -> float:
    return math.sqrt(sum(x * x for x in v))


# ----------------------------------------------------------------------------- embeddings

def test_embed_returns_unit_vectors_equal_to_in_process_embed(client, ollama_server, smollm2_lm):
    from harness.serve.scoring import embed
    texts = ["The sky is blue.", "Paris is in France."]
    r = client.embed(model=ollama_server.model, input=texts)
    assert r.model == ollama_server.model and len(r.embeddings) == 2
    assert r.prompt_eval_count == sum(len(smollm2_lm.encode(t)) for t in texts)
    assert r.total_duration > 0 and r.load_duration >= 0
    want = embed(smollm2_lm, texts)
    for got, ref in zip(r.embeddings, want):
        assert len(got) == 576 and abs(norm(got) - 1) < 1e-5
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
    one = client.embed(model=ollama_server.model, input=texts[0])   # a single string
    assert len(one.embeddings) == 1 and max(abs(a - b) for a, b in zip(one.embeddings[0], want[0])) < 1e-4
    assert client.embed(model=ollama_server.model, input=[]).embeddings == []   # loads the model only


def test_embed_dimensions_and_truncation(client, ollama_server):
    full = client.embed(model=ollama_server.model, input="A short text about cats.").embeddings[0]
    cut = client.embed(model=ollama_server.model, input="A short text about cats.", dimensions=32).embeddings[0]
    assert len(cut) == 32 and abs(norm(cut) - 1) < 1e-5
    assert max(abs(a - b / norm(full[:32])) for a, b in zip(cut, full[:32])) < 1e-5
    long = "one two three four five six seven eight nine ten eleven twelve"
    r = client.embed(model=ollama_server.model, input=long, options={"num_ctx": 4})   # truncate: the default
    assert r.prompt_eval_count == 4 and len(r.embeddings[0]) == 576
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=ollama_server.model, input=long, truncate=False, options={"num_ctx": 4})
    assert e.value.status_code == 400 and e.value.error == "input length exceeds maximum context length"
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=ollama_server.model, input="x", dimensions=10_000)
    assert e.value.status_code == 400 and "dimensions must be between 1 and 576" in e.value.error


def test_legacy_embeddings_are_the_unnormalised_vector(client, ollama_server):
    text = "The sky is blue."
    raw = client.embeddings(model=ollama_server.model, prompt=text).embedding
    unit = client.embed(model=ollama_server.model, input=text).embeddings[0]
    n = norm(raw)
    assert len(raw) == 576 and abs(n - 1) > 1e-3   # not normalised, as Ollama's /api/embeddings
    assert max(abs(a / n - b) for a, b in zip(raw, unit)) < 1e-5
    assert client.embeddings(model=ollama_server.model, prompt="").embedding == []


def test_show_names_the_pooling(client, ollama_server):
    info = client.show(ollama_server.model).modelinfo
    assert info["llama.pooling_type"] == 1   # GGUF / llama.cpp: 1 = mean


# ----------------------------------------------------------------------------- log-probs

def check_logprobs(entries, text: str, top: int) -> None:
    assert entries and "".join(e.token for e in entries) == text
    for e in entries:
        assert len(e.top_logprobs) == top and e.logprob <= 0
        assert top == 0 or e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5   # greedy


def test_generate_logprobs_streamed_and_not(client, ollama_server):
    kw = dict(model=ollama_server.model, prompt="Count: 1, 2, 3,", raw=True, options=GREEDY, logprobs=True,
              top_logprobs=3)
    r = client.generate(**kw)
    assert r.done_reason == "length" and len(r.logprobs) == r.eval_count == 8
    check_logprobs(r.logprobs, r.response, 3)
    chunks = list(client.generate(**kw, stream=True))
    streamed = [e for c in chunks for e in (c.logprobs or [])]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in r.logprobs]
    assert client.generate(model=ollama_server.model, prompt=Q, options=GREEDY).logprobs is None   # not asked


def test_chat_logprobs_streamed_and_not(client, ollama_server):
    kw = dict(model=ollama_server.model, messages=[{"role": "user", "content": Q}], options=GREEDY, logprobs=True)
    r = client.chat(**kw)
    check_logprobs(r.logprobs, r.message.content, 0)
    streamed = [e for c in client.chat(**kw, stream=True) for e in (c.logprobs or [])]
    assert [e.token for e in streamed] == [e.token for e in r.logprobs]
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(**dict(kw, top_logprobs=21))
    assert e.value.status_code == 400 and "top_logprobs" in e.value.error


def test_logprobs_stop_at_the_stop_string(client, ollama_server):
    """Tokens that held only text a stop string cut are not reported."""
    kw = dict(model=ollama_server.model, prompt="Count: 1, 2, 3, 4, 5, 6, 7, 8", raw=True, logprobs=True)
    free = client.generate(**kw, options={"temperature": 0, "num_predict": 12})
    stop = free.response.strip()[4:6]   # a piece well inside the free reply
    for stream in (False, True):
        chunks = list(client.generate(**kw, stream=True, options={"temperature": 0, "num_predict": 12, "stop": [stop]})) \
            if stream else [client.generate(**kw, options={"temperature": 0, "num_predict": 12, "stop": [stop]})]
        text = "".join(c.response for c in chunks)
        entries = [e for c in chunks for e in (c.logprobs or [])]
        assert chunks[-1].done_reason == "stop" and len(text) < len(free.response)
        joined = "".join(e.token for e in entries)
        assert joined.startswith(text) and len("".join(e.token for e in entries[:-1])) < len(text) <= len(joined)
        assert len(entries) < len(free.logprobs)


# ----------------------------------------------------------------------------- format

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"], "additionalProperties": False}


def test_format_schema_is_enforced_20_of_20(client, ollama_server):
    jsonschema = pytest.importorskip("jsonschema")

    def ask(seed: int):
        return client.chat(model=ollama_server.model, format=SCHEMA,
                           messages=[{"role": "user", "content": "Weather in Paris as JSON?"}],
                           options={"temperature": 1.0, "seed": seed, "num_predict": 40})

    with ThreadPoolExecutor(8) as pool:   # eight at a time: the server decodes them in one batch
        answers = list(pool.map(ask, range(20)))
    for seed, r in enumerate(answers):
        assert r.done_reason == "stop", (seed, r.message.content)
        jsonschema.validate(json.loads(r.message.content), SCHEMA)


def test_format_json_and_truncation_and_bad_schema(client, ollama_server):
    r = client.generate(model=ollama_server.model, prompt="A JSON object about a cat:", format="json",
                        options={"temperature": 0.7, "seed": 3, "num_predict": 60})
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.response), dict)
    else:
        assert r.response.lstrip().startswith("{")
    r = client.generate(model=ollama_server.model, prompt="Weather?", format=SCHEMA, options={"num_predict": 3})
    assert r.done_reason == "length" and r.response.startswith("{")
    with pytest.raises(ValueError):
        json.loads(r.response)   # cut short: not yet JSON, and said so by done_reason
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=ollama_server.model, prompt="x", format={"type": "nonsense"})
    assert e.value.status_code == 400 and "nonsense" in e.value.error
    import httpx   # the client refuses such a format before sending it
    bad = httpx.post(f"{ollama_server.url}/api/generate", json={"model": ollama_server.model, "prompt": "x",
                                                                "format": "yaml"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"].startswith("format must be")


# ----------------------------------------------------------------------------- tools

def test_parse_tool_calls_formats():
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>') \
        == ("", [call])
    two = ('Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
           '<tool_call>{"name": "now", "arguments": "{}"}</tool_call>')
    assert parse_tool_calls(two) == ("Let me check.", [call, {"function": {"name": "now", "arguments": {}}}])
    assert parse_tool_calls(' {"name": "get_weather", "parameters": {"city": "Paris"}} ') == ("", [call])
    assert parse_tool_calls('[{"name": "get_weather", "arguments": {"city": "Paris"}}]') == ("", [call])
    for plain in ('{"city": "Paris"}', "Paris is sunny.", "<tool_call>not json</tool_call>", '{"name": 3}'):
        assert parse_tool_calls(plain) == (plain, [])


HERMES = """{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


@pytest.fixture(scope="module")
def tool_server(smollm2_lm, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and the Hermes-style template above."""
    from harness.serve.process import spawn_server
    from models.checkpoint import build_model, save_checkpoint
    from models.llama import LLAMA_CONFIGS
    from models.tokenizer import HFTokenizer
    tok = smollm2_lm.tokenizer
    hermes = HFTokenizer(tok.backend, name=tok.name, eos_id=tok.eos_id, bos_id=tok.bos_id, add_bos=tok.add_bos,
                         chat_template=HERMES, vocab_size=tok.vocab_size)
    model = build_model("llama", dict(LLAMA_CONFIGS["llama-tiny"], vocab_size=tok.vocab_size, context_length=1024))
    folder = save_checkpoint(tmp_path_factory.mktemp("tools") / "hermes", model, hermes, {})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    server = spawn_server([f"model={folder}", "host=127.0.0.1", "port=0", "name=hermes"], env=env, cwd=ROOT,
                          stderr=sys.stderr, timeout=120)
    yield server, hermes
    server.stop()


def test_tools_reach_the_prompt_and_calls_come_back(tool_server):
    from models.tokenizer import render_chat
    server, tok = tool_server
    c = ollama.Client(host=server.url, timeout=120)
    assert "tools" in c.show("hermes").capabilities
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                                 "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "sunny, 21C", "tool_name": "get_weather"},
               {"role": "user", "content": "And in Rome?"}]
    r = c.chat(model="hermes", messages=history, tools=[TOOL], options={"temperature": 0, "num_predict": 4})
    want = render_chat(tok, [{"role": m["role"], "content": m["content"], **({"tool_calls": [
        {"type": "function", "function": m["tool_calls"][0]["function"]}]} if "tool_calls" in m else {})}
        for m in history], tools=[TOOL])
    assert '"name": "get_weather"' in want and "<tool_response>sunny, 21C</tool_response>" in want
    assert r.done and r.prompt_eval_count == len(tok.encode(want))   # the tools and the history, rendered
    # a reply forced (by a schema) into the bare {"name", "arguments"} form comes back as a tool call
    schema = {"type": "object", "properties": {"name": {"const": "get_weather"},
                                               "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                                                             "required": ["city"], "additionalProperties": False}},
              "required": ["name", "arguments"], "additionalProperties": False}
    for stream in (False, True):
        kw = dict(model="hermes", messages=history[:1], tools=[TOOL], format=schema,
                  options={"temperature": 0, "num_predict": 200})
        chunks = list(c.chat(**kw, stream=True)) if stream else [c.chat(**kw)]
        calls = [tc for ch in chunks for tc in (ch.message.tool_calls or [])]
        assert chunks[-1].done_reason == "stop" and len(calls) == 1, chunks
        assert calls[0].function.name == "get_weather" and isinstance(calls[0].function.arguments["city"], str)
        assert "".join(ch.message.content or "" for ch in chunks) == ""
