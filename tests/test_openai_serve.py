"""The OpenAI API of `python -m harness.serve`, through the real `openai` SDK over real HTTP on
127.0.0.1, against the served SmolLM2 (one server subprocess for the session: conftest's
`ollama_server`, which serves both APIs): chat (plain, streamed, stop, seed, max_tokens, JSON
modes, logprobs), completions (echo + logprobs equal in-process TorchLM.loglikelihood), models,
embeddings (equal scoring.embed in process), error bodies; and lm-eval's own `local-completions`
backend scoring MMLU through /v1/completions with the predictions of `python -m harness task=mmlu`;
a client hanging up mid-stream stops the generation."""
from __future__ import annotations

import json
import math

from concurrent.futures import ThreadPoolExecutor

import pytest

from clitools import run_module

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
httpx = pytest.importorskip("httpx")

ASK = [{"role": "user", "content": "What is the capital of France?"}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0,
                                                                               "maximum": 120}}}


@pytest.fixture(scope="module")
def client(ollama_server):
    return openai.OpenAI(base_url=ollama_server.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(ollama_server):
    return ollama_server.model


def text_of(r) -> str:
    return r.choices[0].message.content


def test_chat_plain_and_streamed_are_the_same_greedy_text(client, model, smollm2_lm):
    r = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=30)
    assert text_of(r) == smollm2_lm.generate([smollm2_lm.chat_prompt(ASK)], max_new_tokens=30)[0]
    assert "Paris" in text_of(r) and r.choices[0].finish_reason == "stop" and r.model == model
    assert r.usage.prompt_tokens == len(smollm2_lm.encode(smollm2_lm.chat_prompt(ASK)))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text_of(r)
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_stop_seed_and_max_tokens(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, temperature=0, stop=[" is"], logprobs=True)
    assert text_of(r) == "The capital of France" and r.choices[0].finish_reason == "stop"
    assert "".join(t.token for t in r.choices[0].logprobs.content) == text_of(r)   # trimmed at the cut
    story = [{"role": "user", "content": "Tell me a story."}]
    a, b, c = (text_of(client.chat.completions.create(model=model, messages=story, temperature=1.0, seed=s,
                                                      max_tokens=12)) for s in (7, 7, 8))
    assert a == b and a != c
    r = client.chat.completions.create(model=model, messages=story, max_completion_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=20, temperature=0, stop=[" 6"])
    assert r.choices[0].text == " 4, 5," and r.choices[0].finish_reason == "stop"


def test_json_answers_parse_and_validate_every_time(client, model):
    """8 sampled answers (temperature 0.8, a seed each), json_object and json_schema in turn: every
    one is complete JSON that validates (the engine's grammar, not the model's goodwill). Twenty in a
    row are tests/test_ollama_extras.py's (same engine) and tests/test_constrained.py's."""
    formats = [({"type": "json_object"}, {"type": "object"}),
               ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}, PERSON)]
    ask = [{"role": "user", "content": "Describe a person as a short JSON object with a name and an age."}]

    def ask_json(seed: int):
        return client.chat.completions.create(model=model, messages=ask, temperature=0.8, seed=seed, max_tokens=100,
                                              response_format=formats[seed % 2][0])

    with ThreadPoolExecutor(8) as pool:   # eight at a time: the server decodes them in one batch
        answers = list(pool.map(ask_json, range(8)))
    for seed, r in enumerate(answers):
        assert r.choices[0].finish_reason == "stop", text_of(r)
        jsonschema.validate(json.loads(text_of(r)), formats[seed % 2][1])
    cut = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=3,
                                         response_format=formats[1][0])
    assert cut.choices[0].finish_reason == "length"      # truncated JSON says so


def test_chat_logprobs_shapes(client, model):
    story = [{"role": "user", "content": "Tell me a story."}]
    r = client.chat.completions.create(model=model, messages=story, temperature=0, max_tokens=8, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.token == t.top_logprobs[0].token and t.logprob == t.top_logprobs[0].logprob for t in content)
    assert bytes(b for t in content for b in t.bytes).decode() == text_of(r)
    chunks = list(client.chat.completions.create(model=model, messages=story, temperature=0, max_tokens=8,
                                                 logprobs=True, top_logprobs=1, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)
    plain = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completions_echo_logprobs_equal_in_process_loglikelihood(client, model, smollm2_lm):
    pairs = [("The capital of France is", " Paris"), ("Question: 2+2=", " 4"), ("Once upon a time", " there was")]
    for (context, continuation), want in zip(pairs, smollm2_lm.loglikelihood(pairs)):
        ctx, cont = smollm2_lm._encode_pair(context, continuation)
        r = client.completions.create(model=model, prompt=ctx + cont, max_tokens=0, echo=True, logprobs=2)
        lp = r.choices[0].logprobs
        assert r.choices[0].text == smollm2_lm.decode(ctx + cont) and r.usage.completion_tokens == 0
        assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ctx + cont)
        assert sum(lp.token_logprobs[len(ctx):]) == pytest.approx(want, abs=1e-3)
        assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0,
                                  echo=True, logprobs=0)
    assert r.choices[0].text.startswith("The capital of France is") and len(r.choices[0].logprobs.tokens) == 5 + 3
    streamed = client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == \
        client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6, temperature=0).choices[0].text


def test_models_and_embeddings(client, model, smollm2_lm):
    from harness.serve.scoring import embed
    assert [m.id for m in client.models.list()] == [model]
    assert client.models.retrieve(model).id == client.models.retrieve(f"{model}:latest").id == model
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"
    texts = ["hello world", "The capital of France is Paris."]
    r = client.embeddings.create(model=model, input=texts)
    vectors = [d.embedding for d in r.data]
    assert len(vectors) == 2 and all(len(v) == smollm2_lm.model.config.d_model for v in vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-5) for v in vectors)
    for got, want in zip(vectors, embed(smollm2_lm, texts)):
        assert got == pytest.approx(want, abs=1e-5)
    assert r.usage.prompt_tokens == sum(len(smollm2_lm.encode(t)) for t in texts)


def test_errors_are_openai_shaped(client, model, ollama_server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    for kw, param in (({"n": 2}, "n"), ({"temperature": 3}, "temperature"), ({"messages": []}, "messages")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": model, "messages": ASK, **kw})
        assert e.value.param == param and e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x " * 5000, max_tokens=5)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "$ref": "#/nowhere"}}})
    with pytest.raises(openai.NotFoundError) as e:
        client.get("/nowhere", cast_to=object)
    assert e.value.code == "unknown_url"
    for method, path, status in (("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405),
                                 ("POST", "/v1/chat/completions", 400)):
        resp = httpx.request(method, ollama_server.url + path, content=b"{nope")
        assert resp.status_code == status and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_lm_evals_local_completions_scores_mmlu_as_the_cli_does(ollama_server, smollm2_path, tmp_path):
    """lm-eval's own API backend (its requests, its tokenizer, its parsing of the answers) over
    /v1/completions, against `python -m harness task=mmlu` in process: same predictions."""
    transformers = pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from tasks.mmlu import MMLUTask
    from tasks.multiple_choice import first_argmax
    subjects, limit = ["anatomy", "astronomy"], 2
    run = tmp_path / "run"
    tok = tmp_path / "tokenizer"       # lm-eval tokenizes: the GGUF's tokenizer as transformers reads it
    transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent),
                                               gguf_file=smollm2_path.name).save_pretrained(tok)
    api = LocalCompletionsAPI(base_url=ollama_server.url + "/v1/completions", model=ollama_server.model,
                              tokenizer=str(tok), tokenizer_backend="huggingface", batch_size=4, max_retries=1)
    samples = MMLUTask(subjects, limit=limit).samples()
    args = [(s.data["context"], c) for s in samples for c in s.data["continuations"]]
    lls = [ll for ll, _ in api.loglikelihood([Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)],
                                             disable_tqdm=True)]
    # the CLI in this process (clitools.run_module): a fresh interpreter would add only a torch import
    cli = run_module("harness", "task=mmlu", "model=smollm2-135m-instruct", f"task.subjects=[{','.join(subjects)}]",
                     f"task.limit={limit}", f"leaderboard={tmp_path / 'lb.csv'}", f"hydra.run.dir={run}")
    assert cli.returncode == 0, cli.stderr[-3000:]
    records = {r["sample_id"]: r for r in map(json.loads, (run / "records.jsonl").read_text().splitlines())}
    at = 0
    for s in samples:
        k = len(s.data["continuations"])
        record = records[s.id]
        assert lls[at:at + k] == pytest.approx(record["extra"]["loglikelihoods"], abs=1e-3)
        assert s.data["labels"][first_argmax(lls[at:at + k])] == record["prediction"]
        at += k
    assert len(records) == len(samples) == len(subjects) * limit


def test_a_client_that_hangs_up_mid_stream_stops_the_generation(model, ollama_server):
    """app.py's Generation watches the connection for /v1 as for /api: the engine stops within a
    decode step (logged as "abandoned") and the model is free for the next request at once."""
    import time
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", ollama_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["object"] == "chat.completion.chunk"
    deadline = time.monotonic() + 30
    while "abandoned POST /v1/chat/completions" not in ollama_server.log.read_text():
        assert time.monotonic() < deadline, "the generation did not stop after the client left"
        time.sleep(0.2)
    stopped = ollama_server.log.read_text().split("abandoned POST /v1/chat/completions")[-1]
    assert int(stopped.split("stopped after ")[1].split(" tokens")[0]) < 400
