"""harness.serve.openai_api/_fields/_requests/_responses (the OpenAI API as data) and harness.serve.scoring (the log-probs and
embeddings behind it), without HTTP: every parse function on good and bad bodies; every builder's
output parsed by the real `openai` package's types; the real `openai` client talking to the parse
and build functions through an in-memory transport (httpx's MockTransport: no socket), streaming
and errors included; and the model-side parity on the tiny random-init models: prompt log-probs
summed over a continuation equal TorchLM.loglikelihood (so lm-eval's local-completions scores the
same through the API), generated tokens' log-probs equal a plain forward's, embeddings are unit
vectors that do not depend on what they are batched with."""
from __future__ import annotations

import base64
import json
import math
import struct

import pytest

from harness.serve.openai_api import (ApiError, ServedModel, error_body, fingerprint, model_not_found, model_object,
                                      models_list, not_found, server_error)
from harness.serve.openai_fields import parse_json
from harness.serve.openai_requests import (ChatRequest, JsonFormat, chat_prompt, context_error, parse_chat,
                                           parse_completion, parse_embeddings, parse_response_format, room)
from harness.serve.openai_responses import (CompletionChoice, TokenScore, chat_chunk, chat_completion, chat_logprobs,
                                            chat_usage_chunk, completion, completion_chunk, completion_logprobs,
                                            completion_usage_chunk, embeddings, encode_embedding, new_id, sse,
                                            usage)

openai = pytest.importorskip("openai")
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

SERVED = ServedModel(id="tiny:latest", context_length=256, vocab_size=1000, embedding_dim=64, created=1700000000,
                     fingerprint=fingerprint("abc", "float32/cpu"))
HELLO = [{"role": "user", "content": "Hello"}]


def chat(**body) -> ChatRequest:
    return parse_chat({"model": "tiny", "messages": HELLO, **body}, SERVED)


def completion_req(**body):
    return parse_completion({"model": "tiny", "prompt": "Once upon", **body}, SERVED)


def embed_req(**body):
    return parse_embeddings({"model": "tiny", "input": "hello", **body}, SERVED)


def close(a: list[list[float]], b: list[list[float]], tol: float) -> bool:
    return len(a) == len(b) and all(x == pytest.approx(y, abs=tol) for x, y in zip(a, b))


def fails(fn, *args, status: int = 400, param: str | None = None, code: str | None = None, match: str = ""):
    with pytest.raises(ApiError) as e:
        fn(*args)
    err = e.value
    assert err.status == status, err.message
    if param is not None:
        assert err.param == param, err.message
    if code is not None:
        assert err.code == code, err.message
    assert match in err.message
    body = error_body(err)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return err


# ----------------------------------------------------------------------------- parsing

def test_parse_json_bad_bodies():
    assert parse_json(b'{"a": 1}') == {"a": 1}
    fails(parse_json, b"", match="empty")
    fails(parse_json, b"{nope", match="could not parse")
    fails(parse_json, b"[1, 2]", match="JSON object, got array")
    fails(parse_json, b"\xff\xfe", match="could not parse")
    fails(parse_json, b"[" * 100000 + b"]" * 100000)
    assert parse_json(b'{"a": "x\\ud800y"}') == {"a": "x\ufffdy"}


def test_errors_have_openai_types_and_codes():
    assert error_body(ApiError(400, "bad", param="x", code="c")) == \
        {"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": "c"}}
    assert error_body(model_not_found("m"))["error"]["code"] == "model_not_found"
    assert model_not_found("m").status == 404
    assert server_error().status == 500 and server_error().type == "server_error"
    assert not_found("/v1/nope").status == 404
    assert ApiError(429, "slow").type == "rate_limit_error"
    assert ApiError(503, "busy").type == "server_error"


def test_parse_chat_defaults():
    req = chat()
    assert req.model == "tiny" and req.messages == ({"role": "user", "content": "Hello"},)
    assert not req.stream and not req.include_usage and not req.logprobs and req.top_logprobs == 0
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.max_tokens, s.stop) == (1.0, 1.0, None, None, None, ())
    assert req.response_format is None


def test_parse_chat_fields():
    req = chat(messages=[{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                      {"type": "text", "text": "there"}]},
                         {"role": "assistant", "content": None},
                         {"role": "user", "content": "?", "name": "bob"}],
               stream=True, stream_options={"include_usage": True}, stop="\n", seed=7, temperature=0.5,
               top_p=0.9, top_k=40, max_tokens=10, max_completion_tokens=5, n=1, logprobs=True, top_logprobs=3,
               presence_penalty=0, user="u", metadata={"a": "b"}, tools=[], parallel_tool_calls=False)
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant", "user"]
    assert req.messages[1]["content"] == "Hi there" and req.messages[2]["content"] == ""
    assert req.stream and req.include_usage and req.logprobs and req.top_logprobs == 3
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.max_tokens, s.stop) == (0.5, 0.9, 40, 7, 5, ("\n",))
    assert chat(stop=["a", "", "b"]).sampling.stop == ("a", "b")
    assert chat(max_tokens=3.0).sampling.max_tokens == 3
    assert chat(temperature=0).sampling.temperature == 0.0
    assert chat(top_p=0).sampling.temperature == 0.0          # only the most likely token: greedy
    assert chat(seed=-1).sampling.seed == (1 << 64) - 1       # torch's generator takes [0, 2**64)
    assert chat(top_k=-1).sampling.top_k is None
    assert chat(model="TINY:latest").model == "TINY:latest"


@pytest.mark.parametrize("patch, param, match", [
    ({"model": None}, "model", "model parameter"),
    ({"model": 3}, "model", "expected a string"),
    ({"messages": None}, "messages", "Missing required"),
    ({"messages": []}, "messages", "empty array"),
    ({"messages": "hi"}, "messages", "expected an array"),
    ({"messages": ["hi"]}, "messages[0]", "expected an object"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "role"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "Missing"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "expected a string or an array"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "text only"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type", "video"),
    ({"n": 2}, "n", "one choice"),
    ({"n": 0}, "n", "between 1 and 128"),
    ({"temperature": 2.5}, "temperature", "between 0.0 and 2.0"),
    ({"temperature": -1}, "temperature", "between"),
    ({"temperature": "hot"}, "temperature", "expected a number"),
    ({"temperature": True}, "temperature", "expected a number"),
    ({"top_p": 1.5}, "top_p", "between"),
    ({"seed": 1.5}, "seed", "expected an integer"),
    ({"seed": 1 << 70}, "seed", "between -9223372036854775808 and"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_completion_tokens": -5}, "max_completion_tokens", "greater than or equal to 1"),
    ({"stop": 5}, "stop", "expected a string or an array"),
    ({"stop": ["a", 1]}, "stop[1]", "expected a string"),
    ({"stream": "yes"}, "stream", "expected a boolean"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream'"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "boolean"),
    ({"logprobs": 1}, "logprobs", "expected a boolean"),
    ({"top_logprobs": 2}, "top_logprobs", "'logprobs' must be true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"frequency_penalty": 3}, "frequency_penalty", "between"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"response_format": "json"}, "response_format", "expected an object"),
])
def test_parse_chat_bad_bodies(patch, param, match):
    body = {"model": "tiny", "messages": HELLO, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    fails(parse_chat, body, SERVED, param=param, match=match)


def test_unknown_model_is_openais_404():
    err = fails(parse_chat, {"model": "gpt-4o", "messages": HELLO}, SERVED, status=404, code="model_not_found")
    assert "`gpt-4o` does not exist" in err.message
    assert SERVED.matches("tiny") and SERVED.matches("Tiny:Latest") and not SERVED.matches("tiny:7b")


def test_response_format_becomes_a_neutral_json_constraint():
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == JsonFormat({"type": "object"}, kind="json_object")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    got = parse_response_format({"type": "json_schema", "json_schema": {"name": "thing", "schema": schema,
                                                                          "strict": True}})
    assert got == JsonFormat(schema, name="thing", strict=True, kind="json_schema")
    assert parse_response_format({"type": "json_schema", "json_schema": {"name": "x"}}).schema == {}
    assert chat(response_format={"type": "json_object"}).response_format.kind == "json_object"
    fails(parse_response_format, {"type": "xml"}, param="response_format.type", match="\"xml\"")
    fails(parse_response_format, {}, param="response_format.type")
    fails(parse_response_format, {"type": "json_schema"}, param="response_format.json_schema")
    fails(parse_response_format, {"type": "json_schema", "json_schema": {"schema": schema}},
          param="response_format.json_schema.name")
    fails(parse_response_format, {"type": "json_schema", "json_schema": {"name": "a b"}},
          param="response_format.json_schema.name")
    fails(parse_response_format, {"type": "json_schema", "json_schema": {"name": "a", "schema": []}},
          param="response_format.json_schema.schema")


def test_chat_prompt_template_and_fallback():
    msgs = ({"role": "system", "content": "S"}, {"role": "user", "content": "U"})
    assert chat_prompt(msgs, None) == "system: S\nuser: U\nassistant:"
    assert chat_prompt(msgs, lambda m: "|".join(x["content"] for x in m)) == "S|U"

    def strict(_m):
        raise ValueError("roles must alternate")
    fails(chat_prompt, msgs, strict, param="messages", match="roles must alternate")


def test_parse_completion_prompts():
    req = completion_req()
    assert req.prompts == ("Once upon",) and req.sampling.max_tokens == 16 and not req.echo and req.logprobs is None
    assert completion_req(prompt=["a"]).prompts == ("a",)
    assert completion_req(prompt=[1, 2, 3]).prompts == ((1, 2, 3),)
    assert completion_req(prompt=[[1, 2], [3]]).prompts == ((1, 2), (3,))
    assert completion_req(prompt=["a", "b"]).prompts == ("a", "b")
    assert completion_req(prompt="").prompts == ("",)
    req = completion_req(prompt=[[5, 6, 7]], echo=True, max_tokens=0, logprobs=1, temperature=0, seed=1234)
    assert req.echo and req.logprobs == 1 and req.sampling.max_tokens == 0 and req.sampling.temperature == 0
    assert completion_req(logprobs=0).logprobs == 0
    assert completion_req(best_of=1, n=1, suffix="").prompts == ("Once upon",)
    assert completion_req(stream=True, stream_options={"include_usage": True}).include_usage


@pytest.mark.parametrize("patch, param, match", [
    ({"prompt": None}, "prompt", "Missing"),
    ({"prompt": []}, "prompt", "empty array"),
    ({"prompt": [[]]}, "prompt[0]", "empty array"),
    ({"prompt": 5}, "prompt", "expected a string or an array"),
    ({"prompt": [1, "a"]}, "prompt[0]", "expected a string or an array"),
    ({"prompt": [[1, 1000]]}, "prompt[0]", "outside the vocabulary"),
    ({"prompt": [[1, -1]]}, "prompt[0]", "outside the vocabulary"),
    ({"prompt": [[1, True]]}, "prompt[0]", "integer token id"),
    ({"prompt": [[1, 2.5]]}, "prompt[0]", "integer token id"),
    ({"max_tokens": 0}, "max_tokens", "only with echo"),
    ({"max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ({"logprobs": 6}, "logprobs", "between 0 and 5"),
    ({"logprobs": True}, "logprobs", "expected an integer"),
    ({"echo": "yes"}, "echo", "boolean"),
    ({"n": 3}, "n", "one choice"),
    ({"best_of": 2}, "best_of", "one choice"),
    ({"suffix": "end"}, "suffix", "fill-in-the-middle"),
    ({"stream": True, "prompt": ["a", "b"]}, "prompt", "one prompt at a time"),
    ({"model": "other"}, "model", "does not exist"),
])
def test_parse_completion_bad_bodies(patch, param, match):
    body = {"model": "tiny", "prompt": "x", **patch}
    body = {k: v for k, v in body.items() if v is not None}
    fails(parse_completion, body, SERVED, status=404 if param == "model" else 400, param=param, match=match)


def test_parse_embeddings():
    assert embed_req().inputs == ("hello",) and embed_req().encoding_format == "float"
    assert embed_req(input=["a", "b"]).inputs == ("a", "b")
    assert embed_req(input=[1, 2]).inputs == ((1, 2),)
    assert embed_req(encoding_format="base64").encoding_format == "base64"
    assert embed_req(dimensions=64).inputs == ("hello",)
    fails(parse_embeddings, {"model": "tiny", "input": "x", "dimensions": 32}, SERVED, param="dimensions",
          match="64")
    fails(parse_embeddings, {"model": "tiny", "input": "x", "encoding_format": "int8"}, SERVED,
          param="encoding_format")
    fails(parse_embeddings, {"model": "tiny", "input": ""}, SERVED, param="input", match="empty string")
    fails(parse_embeddings, {"model": "tiny", "input": ["a", ""]}, SERVED, param="input[1]")
    fails(parse_embeddings, {"model": "tiny"}, SERVED, param="input", match="Missing")
    fails(parse_embeddings, {"model": "tiny", "input": ["a"] * 2049}, SERVED, param="input", match="2048")
    fails(parse_embeddings, {"model": "tiny", "input": {"a": 1}}, SERVED, param="input")


def test_context_checks():
    assert context_error(100, None, 256) is None
    assert context_error(200, 56, 256) is None
    err = context_error(200, 57, 256)
    assert err.status == 400 and err.code == "context_length_exceeded" and err.param == "messages"
    assert "257 tokens (200 in the messages, 57 in the completion)" in err.message
    assert context_error(300, None, 256, "prompt").param == "prompt"
    assert context_error(256, 1, 256, "prompt", echo=True) is None       # scoring a full-context prompt
    assert context_error(257, 0, 256, "prompt", echo=True) is not None
    s = chat().sampling
    assert room(200, s, 256) == 56 and room(300, s, 256) == 0
    assert room(10, chat(max_tokens=5).sampling, 256) == 5


# ----------------------------------------------------------------------------- responses, checked by the SDK's types

def piece(i: int) -> str:
    return {1: "Hel", 2: "lo", 3: "!", 4: "é", 5: " world"}.get(i, f"<{i}>")


SCORES = [TokenScore(1, -0.5, ((1, -0.5), (2, -1.5), (3, -2.0))), TokenScore(2, -0.1, ((2, -0.1), (4, -3.0))),
          TokenScore(4, -float("inf"), ((5, -0.01),))]


def test_chat_completion_parses_as_openais_type():
    req = chat(logprobs=True, top_logprobs=2)
    lp = chat_logprobs(SCORES, piece, req.top_logprobs)
    body = chat_completion(req, "Hello", "stop", usage(5, 3), logprobs=lp, fingerprint=SERVED.fingerprint)
    c = ChatCompletion.model_validate(body)
    assert c.object == "chat.completion" and c.id.startswith("chatcmpl-") and c.model == "tiny"
    assert c.choices[0].message.content == "Hello" and c.choices[0].message.role == "assistant"
    assert c.choices[0].finish_reason == "stop"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (5, 3, 8)
    assert c.system_fingerprint.startswith("fp_") and len(c.system_fingerprint) == 13
    content = c.choices[0].logprobs.content
    assert [t.token for t in content] == ["Hel", "lo", "é"]
    assert content[2].bytes == [0xC3, 0xA9] and content[2].logprob == -9999.0
    assert [t.token for t in content[0].top_logprobs] == ["Hel", "lo"]          # top 2 of 3
    assert content[0].top_logprobs[1].logprob == -1.5
    assert json.loads(json.dumps(body)) == body                                  # plain JSON (no inf/NaN)
    plain = ChatCompletion.model_validate(chat_completion(chat(), "x", "length", usage(1, 1), created=5))
    assert plain.choices[0].logprobs is None and plain.created == 5 and plain.choices[0].finish_reason == "length"
    assert chat_logprobs(SCORES, piece, 0)["content"][0]["top_logprobs"] == []


def test_chat_stream_chunks_parse_as_openais_type():
    req = chat(stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=1)
    rid, created = new_id("chatcmpl"), 1700000001
    chunks = [chat_chunk(req, rid, created, role=True),
              chat_chunk(req, rid, created, content="Hel", logprobs=chat_logprobs(SCORES[:1], piece, 1)),
              chat_chunk(req, rid, created, content="lo", logprobs=chat_logprobs(SCORES[1:2], piece, 1)),
              chat_chunk(req, rid, created, finish_reason="stop"),
              chat_usage_chunk(req, rid, created, usage(4, 2))]
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert {p.id for p in parsed} == {rid} and {p.created for p in parsed} == {created}
    assert all(p.object == "chat.completion.chunk" for p in parsed)
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[0].choices[0].delta.content == ""
    assert "".join(p.choices[0].delta.content or "" for p in parsed[:4]) == "Hello"
    assert parsed[1].choices[0].logprobs.content[0].top_logprobs[0].token == "Hel"
    assert [p.choices[0].finish_reason for p in parsed[:4]] == [None, None, None, "stop"]
    assert parsed[3].choices[0].delta.content is None
    assert all(c["usage"] is None for c in chunks[:4]) and parsed[4].choices == []
    assert parsed[4].usage.total_tokens == 6
    no_usage = chat_chunk(chat(stream=True), rid, created, content="x")
    assert "usage" not in no_usage and ChatCompletionChunk.model_validate(no_usage).usage is None


def test_sse_framing():
    assert sse({"a": "é"}) == 'data: {"a": "é"}\n\n'.encode()
    assert sse("[DONE]") == b"data: [DONE]\n\n"


def test_completion_parses_as_openais_type():
    req = completion_req(prompt=[[1, 2]], echo=True, logprobs=2, max_tokens=1)
    scores = [TokenScore(1, None, ())] + SCORES[1:]
    lp = completion_logprobs(scores, piece, req.logprobs)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [0, 3, 5] and lp["tokens"] == ["Hel", "lo", "é"]
    assert lp["top_logprobs"][1] == {"lo": -0.1, "é": -3.0} and lp["token_logprobs"][2] == -9999.0
    body = completion(req, [CompletionChoice("Hello", "length", lp)], usage(2, 1), fingerprint="fp_x")
    # The echoed first token has no log-prob: null, as OpenAI and vLLM answer and lm-eval expects. The
    # SDK's type says List[float]; its client reads responses without validating (construct_type), so
    # the null reaches the caller (test_sdk_completions_and_echo). Validate the rest strictly:
    strict = json.loads(json.dumps(body))
    strict["choices"][0]["logprobs"]["token_logprobs"][0] = 0.0
    strict["choices"][0]["logprobs"]["top_logprobs"][0] = {}
    Completion.model_validate(strict)
    from openai._models import construct_type
    c = construct_type(type_=Completion, value=body)
    assert c.choices[0].logprobs.token_logprobs[0] is None
    assert c.object == "text_completion" and c.id.startswith("cmpl-") and c.system_fingerprint == "fp_x"
    assert c.choices[0].text == "Hello" and c.choices[0].logprobs.tokens == ["Hel", "lo", "é"]
    assert c.usage.total_tokens == 3
    many = Completion.model_validate(completion(completion_req(prompt=["a", "b"]),
                                                [CompletionChoice("x", "stop"), CompletionChoice("y", "length")],
                                                usage(2, 2)))
    assert [(ch.index, ch.text, ch.finish_reason) for ch in many.choices] == [(0, "x", "stop"), (1, "y", "length")]
    assert completion_logprobs(SCORES, piece, 0, offset=7)["top_logprobs"][0] == {}
    assert completion_logprobs(SCORES, piece, 0, offset=7)["text_offset"][0] == 7


def test_completion_stream_chunks_parse_as_openais_type():
    req = completion_req(stream=True, stream_options={"include_usage": True})
    rid = new_id("cmpl")
    chunks = [completion_chunk(req, rid, 1, "Hel"), completion_chunk(req, rid, 1, "lo", finish_reason="length"),
              completion_usage_chunk(req, rid, 1, usage(2, 2))]
    # Before the last text chunk finish_reason is null (OpenAI's streams; the SDK's type, shared with the
    # whole answer, says a literal, and its stream reader does not validate): strict from the last on.
    from openai._models import construct_type
    parsed = [construct_type(type_=Completion, value=chunks[0])] + [Completion.model_validate(c) for c in chunks[1:]]
    assert parsed[0].choices[0].finish_reason is None
    assert "".join(c.choices[0].text for c in parsed[:2]) == "Hello" and parsed[1].choices[0].finish_reason == "length"
    assert parsed[2].choices == [] and parsed[2].usage.total_tokens == 4 and chunks[0]["usage"] is None


def test_embeddings_parse_as_openais_type_float_and_base64():
    vectors = [[0.6, 0.8, 0.0], [1.0, 0.0, -0.0]]
    body = embeddings(embed_req(input=["a", "b"]), vectors, prompt_tokens=2)
    e = CreateEmbeddingResponse.model_validate(body)
    assert e.object == "list" and [d.index for d in e.data] == [0, 1] and e.data[0].object == "embedding"
    assert e.data[0].embedding == pytest.approx(vectors[0]) and e.usage.total_tokens == 2
    b64 = embeddings(embed_req(input=["a", "b"], encoding_format="base64"), vectors, prompt_tokens=2)
    assert isinstance(b64["data"][0]["embedding"], str)
    # little-endian float32, which the SDK decodes when it asked for base64 (its default: see
    # test_sdk_embeddings_base64_by_default, through the client itself)
    decoded = [list(struct.unpack(f"<{len(v)}f", base64.b64decode(d["embedding"])))
               for v, d in zip(vectors, b64["data"])]
    assert close(decoded, vectors, 1e-7)
    assert struct.unpack("<2f", base64.b64decode(encode_embedding([0.5, -2.0], "base64"))) == (0.5, -2.0)


def test_models_list_parses_as_openais_type():
    body = models_list(SERVED)
    assert body["object"] == "list"
    m = Model.model_validate(body["data"][0])
    assert (m.id, m.object, m.created, m.owned_by) == ("tiny:latest", "model", 1700000000, "harness")
    assert model_object(SERVED) == body["data"][0]


# ----------------------------------------------------------------------------- the model side

@pytest.fixture(scope="module", params=["gpt-tiny", "llama-tiny"])
def lm(request):
    from models.registry import load_lm
    return load_lm(request.param, progress=False)


PAIRS = [("The quick brown", " fox jumps over"), ("Question: 2+2=", " 4"), ("", "Hello there"),
         ("A long context " * 20, " and its end")]


def test_prompt_logprobs_sum_to_loglikelihood(lm):
    from harness.serve.scoring import prompt_logprobs
    expected = lm.loglikelihood(PAIRS)
    for (context, continuation), want in zip(PAIRS, expected):
        ctx, cont = lm._encode_pair(context, continuation)
        scores = prompt_logprobs(lm, ctx + cont, top_k=3)
        assert len(scores) == len(ctx) + len(cont) and scores[0].logprob is None and scores[0].top == ()
        assert [s.id for s in scores] == ctx + cont
        assert sum(s.logprob for s in scores[len(ctx):]) == pytest.approx(want, abs=1e-4)
        for s in scores[1:]:
            values = [lp for _, lp in s.top]
            assert len(s.top) == 3 and values == sorted(values, reverse=True)
            top = dict(s.top)
            if s.id in top:
                assert s.logprob == pytest.approx(top[s.id], abs=1e-6)
            else:
                assert s.logprob <= values[-1] + 1e-6


def test_prompt_logprobs_edges(lm):
    from harness.serve.scoring import prompt_logprobs
    assert prompt_logprobs(lm, []) == []
    assert prompt_logprobs(lm, [5]) == [TokenScore(5, None, ())]
    assert all(s.top == () for s in prompt_logprobs(lm, [5, 6, 7]))
    with pytest.raises(ValueError, match="context"):
        prompt_logprobs(lm, [1] * (lm.max_length + 1))


def test_lm_evals_local_completions_scores_through_the_api_as_in_process(lm):
    """The request lm-eval's local-completions sends for loglikelihood (token ids, echo, max_tokens 1,
    logprobs 1), answered through parse/build and read back by lm-eval's own parse_logprobs."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    served = served_for(lm)
    for (context, continuation), want in zip(PAIRS, lm.loglikelihood(PAIRS)):
        ctx, cont = lm._encode_pair(context, continuation)
        body = {"model": "tiny", "prompt": [ctx + cont], "temperature": 0, "max_tokens": 1, "logprobs": 1,
                "seed": 1234, "echo": True}
        out = json.loads(json.dumps(answer_completion(lm, served, parse_completion(body, served))))
        assert out["choices"][0]["logprobs"]["token_logprobs"][0] is None
        (got, greedy), = LocalCompletionsAPI.parse_logprobs(out, tokens=[ctx + cont], ctxlens=[len(ctx)])
        assert got == pytest.approx(want, abs=1e-4)
        from harness.serve.scoring import prompt_logprobs
        argmax = all(s.id == s.top[0][0] for s in prompt_logprobs(lm, ctx + cont, 1)[len(ctx):])
        assert greedy == argmax


def test_end_token_score_is_the_next_position_of_the_same_forward(lm):
    """A generation that stopped at EOS made one more token than it returns: its score (what a legacy
    completion lists last) is the likeliest end token after prompt + answer, equal with or without
    the prompt's own scores from the same pass."""
    from harness.serve.scoring import end_score, prompt_logprobs
    ids = lm.encode("Once upon a time")
    end = end_score(lm, ids, top_k=3)
    assert end.id in lm.stop_ids() and len(end.top) == 3
    with_end = prompt_logprobs(lm, ids, top_k=3, end=True)
    assert len(with_end) == len(ids) + 1 and with_end[-1].id == end.id
    assert with_end[-1].logprob == pytest.approx(end.logprob, abs=1e-5)
    assert [s.logprob for s in with_end[:-1]] == pytest.approx([s.logprob for s in prompt_logprobs(lm, ids, 3)])
    after = prompt_logprobs(lm, ids + [end.id], top_k=0)[-1]
    assert after.logprob == pytest.approx(end.logprob, abs=1e-4)


def test_generated_logprobs_equal_a_plain_forward(lm):
    from harness.serve.scoring import generate_with_logprobs, prompt_logprobs
    ids = lm.encode("Once upon a time")
    for kw in ({}, {"temperature": 1.0, "seed": 3}, {"temperature": 0.7, "top_p": 0.9, "sample_top_k": 20, "seed": 9}):
        tokens, scores = generate_with_logprobs(lm, ids, max_new_tokens=8, top_k=4, **kw)
        assert [s.id for s in scores] == tokens and len(tokens) == 8
        ref = prompt_logprobs(lm, ids + tokens, top_k=4)[len(ids):]
        for s, r in zip(scores, ref):
            assert s.logprob == pytest.approx(r.logprob, abs=1e-4)
            assert [t for t, _ in s.top] == [t for t, _ in r.top]
            assert [lp for _, lp in s.top] == pytest.approx([lp for _, lp in r.top], abs=1e-4)
        if not kw:
            assert all(s.id == s.top[0][0] for s in scores)     # greedy picks the most likely token


def test_on_logits_hook_changes_nothing(lm):
    import torch

    from harness.serve.scoring import LogprobRecorder
    from models.generate import generate_tokens
    prompts = [lm.encode("Hello"), lm.encode("A much longer prompt than that")]
    plain = generate_tokens(lm.model, prompts, max_new_tokens=6, eos_ids=[], temperature=1.0,
                            generator=torch.Generator().manual_seed(1))
    rec = LogprobRecorder(0)
    hooked = generate_tokens(lm.model, prompts, max_new_tokens=6, eos_ids=[], temperature=1.0,
                             generator=torch.Generator().manual_seed(1), on_logits=rec)
    assert hooked == plain and len(rec.steps) == 6
    assert [s.id for s in rec.scores(1)] == hooked[1] and all(s.top == () for s in rec.scores(0))
    assert rec.latest(1) == rec.scores(1)[-1]


def test_embeddings_are_unit_deterministic_and_padding_invariant(lm):
    from harness.serve.scoring import EMBEDDING_POOLING, POOLINGS, embed, embedding_dim
    assert EMBEDDING_POOLING in POOLINGS
    texts = ["hello world", "a considerably longer text that pads the others in its batch", "x"]
    batched = embed(lm, texts)
    assert len(batched) == 3 and all(len(v) == embedding_dim(lm) for v in batched)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-5) for v in batched)
    for text, v in zip(texts, batched):
        alone, = embed(lm, [text])
        assert alone == pytest.approx(v, abs=1e-5)
    assert embed(lm, texts) == batched
    assert close(embed(lm, [lm.encode("hello world")]), batched[:1], 1e-6)
    assert close(embed(lm, texts, batch_size=1), batched, 1e-5)
    last = embed(lm, texts, pooling="last")
    assert last[0] != pytest.approx(batched[0], abs=1e-3)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-5) for v in last)
    for text, v in zip(texts, last):
        assert embed(lm, [text], pooling="last")[0] == pytest.approx(v, abs=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        embed(lm, texts, pooling="cls")
    with pytest.raises(ValueError, match="context"):
        embed(lm, [[1] * (lm.max_length + 1)])


# ----------------------------------------------------------------------------- the real client, in memory

def served_for(lm) -> ServedModel:
    from harness.serve.scoring import embedding_dim
    return ServedModel(id="tiny:latest", context_length=lm.max_length, vocab_size=lm.model.config.vocab_size,
                       embedding_dim=embedding_dim(lm), created=1700000000, fingerprint=fingerprint("tiny"))


def _generate(lm, ids, sampling, n, top_k):
    """(tokens, their TokenScores, finish_reason, text) with the stop strings applied."""
    from harness.serve.scoring import generate_with_logprobs
    from models.protocol import cut_at_stop
    stop = sampling.stop
    tokens, scores = [], []
    if n > 0:
        tokens, scores = generate_with_logprobs(
            lm, ids, max_new_tokens=n, top_k=top_k, temperature=sampling.temperature, top_p=sampling.top_p,
            sample_top_k=sampling.top_k, seed=sampling.seed,
            should_stop=(lambda _r, t: any(s in lm.decode(t) for s in stop)) if stop else None)
    text = lm.decode(tokens)
    cut = cut_at_stop(text, stop)
    return tokens, scores, "stop" if cut != text or len(tokens) < n else "length", cut


def answer_completion(lm, served, req):
    from harness.serve.scoring import prompt_logprobs
    choices, n_prompt, n_gen = [], 0, 0
    for p in req.prompts:
        ids = (lm.encode(p) if isinstance(p, str) else list(p)) or [lm.prefix_token]
        err = context_error(len(ids), req.sampling.max_tokens, served.context_length, "prompt", req.echo)
        if err:
            raise err
        n = room(len(ids), req.sampling, served.context_length)
        tokens, scores, finish, text = _generate(lm, ids, req.sampling, n, req.logprobs or 0)
        prompt_text = p if isinstance(p, str) else lm.decode(ids)
        lp = None
        if req.logprobs is not None:
            pre = prompt_logprobs(lm, ids, req.logprobs) if req.echo else []
            lp = completion_logprobs(pre + scores, lambda i: lm.decode([i]), req.logprobs)
        choices.append(CompletionChoice((prompt_text if req.echo else "") + text, finish, lp))
        n_prompt, n_gen = n_prompt + len(ids), n_gen + len(tokens)
    return completion(req, choices, usage(n_prompt, n_gen), fingerprint=served.fingerprint)


def _httpx():
    """The HTTP library the installed SDK is built on: httpx2 (openai >= 3), httpx before."""
    try:
        import httpx2
        return httpx2
    except ImportError:
        import httpx
        return httpx


def make_transport(lm):
    """An in-memory OpenAI server over the parse/build functions (what the real routes do)."""
    httpx2 = _httpx()

    from harness.serve.scoring import embed
    served = served_for(lm)

    def handle(request):
        path = request.url.path
        if request.method == "GET" and path == "/v1/models":
            return models_list(served)
        body = parse_json(request.read())
        if path == "/v1/completions":
            return answer_completion(lm, served, parse_completion(body, served))
        if path == "/v1/embeddings":
            req = parse_embeddings(body, served)
            return embeddings(req, embed(lm, req.inputs),
                              sum(len(lm.encode(x)) if isinstance(x, str) else len(x) for x in req.inputs))
        if path != "/v1/chat/completions":
            raise not_found(path)
        req = parse_chat(body, served)
        ids = lm.encode(chat_prompt(req.messages, lm.chat_prompt if lm.has_chat_template else None))
        err = context_error(len(ids), req.sampling.max_tokens, served.context_length)
        if err:
            raise err
        tokens, scores, finish, text = _generate(lm, ids, req.sampling, room(len(ids), req.sampling,
                                                                             served.context_length),
                                                 req.top_logprobs)
        from harness.serve.scoring import token_bytes, token_piece
        piece, raw = (lambda i: token_piece(lm, i)), (lambda i: token_bytes(lm, i))
        if not req.stream:
            lp = chat_logprobs(scores, piece, req.top_logprobs, raw) if req.logprobs else None
            return chat_completion(req, text, finish, usage(len(ids), len(tokens)), logprobs=lp,
                                   fingerprint=served.fingerprint)
        rid, created = new_id("chatcmpl"), 1700000002
        events = [chat_chunk(req, rid, created, role=True)]
        for k, s in enumerate(scores):
            delta = lm.decode(tokens[:k + 1])[len(lm.decode(tokens[:k])):]
            lp = chat_logprobs([s], piece, req.top_logprobs, raw) if req.logprobs else None
            events.append(chat_chunk(req, rid, created, content=delta, logprobs=lp))
        events.append(chat_chunk(req, rid, created, finish_reason=finish))
        if req.include_usage:
            events.append(chat_usage_chunk(req, rid, created, usage(len(ids), len(tokens))))
        return b"".join(sse(e) for e in events) + sse("[DONE]")

    def transport(request):
        try:
            out = handle(request)
        except ApiError as e:
            return httpx2.Response(e.status, json=error_body(e))
        if isinstance(out, bytes):
            return httpx2.Response(200, content=out, headers={"content-type": "text/event-stream"})
        return httpx2.Response(200, json=out)
    return httpx2.MockTransport(transport)


@pytest.fixture(scope="module")
def client(lm):
    httpx2 = _httpx()
    return openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="unused", max_retries=0,
                         http_client=httpx2.Client(transport=make_transport(lm)))


def test_sdk_chat(client, lm):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.choices[0].message.content == lm.generate([chat_prompt(HELLO, None)], max_new_tokens=5)[0]
    assert len(r.choices[0].logprobs.content) == 5 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    again = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, seed=4)
    assert again.choices[0].message.content == client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=5, seed=4).choices[0].message.content


def test_sdk_chat_stream(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, logprobs=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 4
    assert sum(len(c.choices[0].logprobs.content) for c in chunks[1:-2]) == 4


def test_sdk_completions_and_echo(client, lm):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, temperature=0)
    assert r.choices[0].text == lm.generate(["Once upon a time"], max_new_tokens=3)[0]
    ids = lm.encode("Once upon a time")
    e = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = e.choices[0].logprobs
    assert e.choices[0].text == lm.decode(ids) and e.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])


def test_sdk_embeddings_base64_by_default(client, lm):
    from harness.serve.scoring import embed
    r = client.embeddings.create(model="tiny", input=["hello", "world"])     # the SDK asks for base64
    want = embed(lm, ["hello", "world"])
    assert close([d.embedding for d in r.data], want, 1e-6)
    f = client.embeddings.create(model="tiny", input="hello", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(want[0], abs=1e-6)


def test_sdk_models_and_errors(client):
    assert [m.id for m in client.models.list()] == ["tiny:latest"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, n=2)
    assert e.value.param == "n" and e.value.code == "unsupported_parameter" and e.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x " * 300, max_tokens=5)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny", input="x", dimensions=3)
    assert e.value.param == "dimensions"


MIXED = "héllo — 日本語 <|im_end|> end"


def check_token_bytes(lm):
    from harness.serve.scoring import token_bytes, token_piece
    ids = lm.tokenizer.encode(MIXED)
    raw = [token_bytes(lm, i) for i in ids]
    assert b"".join(raw).decode("utf-8") == MIXED
    assert any(b"\xef\xbf\xbd" in token_piece(lm, i).encode() for i in ids)      # split characters
    lp = chat_logprobs([TokenScore(i, -1.0, ((i, -1.0),)) for i in ids], lambda i: token_piece(lm, i), 1,
                       lambda i: token_bytes(lm, i))
    ChatCompletion.model_validate(chat_completion(chat(), MIXED, "stop", usage(1, len(ids)), logprobs=lp))
    assert bytes(b for t in lp["content"] for b in t["bytes"]).decode("utf-8") == MIXED
    assert lp["content"][0]["top_logprobs"][0]["bytes"] == list(raw[0])


def test_token_bytes_rebuild_split_characters_tiktoken():
    from models.registry import load_lm
    check_token_bytes(load_lm("gpt-tiny", progress=False))


def test_token_bytes_rebuild_split_characters_byte_level_gguf(smollm2_lm):
    check_token_bytes(smollm2_lm)


def test_token_bytes_rebuild_split_characters_sentencepiece():
    """A small SentencePiece vocabulary as a GGUF holds one (byte-fallback pieces <0xNN>, ▁ spaces):
    characters missing from it are spelled byte by byte, which token_bytes returns."""
    from types import SimpleNamespace

    from harness.serve.scoring import token_bytes
    from models.sp_tokenizer import sp_tokenizer
    pieces = ["\u2581", "h", "e", "l", "o", "\u2581h", "he", "ll", "llo", "\u2581hello", "é", "日"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    tok = sp_tokenizer({"general.architecture": "llama", "tokenizer.ggml.tokens": tokens,
                        "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
                        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                        "tokenizer.ggml.unknown_token_id": 0})
    lm = SimpleNamespace(tokenizer=tok, decode=tok.decode)
    text = "hello 日本 é"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())                       # 本 and the spaces fall back to bytes
    assert b"".join(token_bytes(lm, i) for i in ids) == (" " + text).encode("utf-8")   # Metaspace's prefix
    assert token_bytes(lm, 2) == b"</s>"
