"""API-served models as eval backends: `model=ollama:<name>` and `model=openai:<name>`.

Against the project's own server (`python -m harness.serve`, the session's `ollama_server` fixture,
which serves both APIs on one port): the backends reproduce the in-process model's greedy responses
and MMLU predictions, refuse what their API cannot answer with one line, and a rerun is answered
from the on-disk cache. Faults (503 / 429 then success, a 400, a server refusing echo) come from
small real HTTP servers on 127.0.0.1.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from harness.cli import UserError
from harness.config import rewrite_argv
from models.api_lm import ChatPrompt
from models.ollama_lm import OllamaLM
from models.openai_lm import OpenAILM
from tasks.instruction_data import ALPACA_STOP, alpaca_prompt
from clitools import run_module
from test_cli import ENV, assert_one_error_line
from fake_servers import FakeOpenAI
from test_judge import CountingProxy, FakeOllama, chat_body

ENTRIES = [{"instruction": "Name a primary color.", "input": ""},
           {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse."}]
MMLU = ["task=mmlu", "task.subjects=[abstract_algebra,anatomy,astronomy]", "task.limit=5"]
MAX_NEW = 40


def prompts_for(lm) -> list[str]:
    """Chat prompts (the model's template) for both entries, and one raw Alpaca-style prompt."""
    chats = [lm.chat_prompt([{"role": "user", "content": e["instruction"] + (f"\n\n{e['input']}" if e["input"] else "")}])
             for e in ENTRIES]
    return [*chats, alpaca_prompt(ENTRIES[1])]


def greedy(lm) -> list[str]:
    return lm.generate(prompts_for(lm), max_new_tokens=MAX_NEW, stop=ALPACA_STOP, temperature=0.0, seed=123)


@pytest.fixture(scope="module")
def in_process(smollm2_lm):
    return greedy(smollm2_lm)


def harness(*args, tmp_path):
    """`python -m harness args`, in this process (clitools.run_module): a fresh interpreter would add
    only a torch import."""
    return run_module("harness", *args, env=dict(ENV, HARNESS_CACHE=str(tmp_path / "cache")))


# --- against harness.serve ---------------------------------------------------------------------

def test_ollama_generates_as_in_process_and_reruns_from_the_cache(ollama_server, in_process, tmp_path):
    proxy = CountingProxy(ollama_server.url)
    try:
        lm = OllamaLM(ollama_server.model, proxy.url, cache_dir=str(tmp_path / "c"), progress=False)
        assert isinstance(lm.chat_prompt([{"role": "user", "content": "x"}]), ChatPrompt)
        assert greedy(lm) == in_process
        assert (proxy.counts.get("/api/chat"), proxy.counts.get("/api/generate")) == (2, 1)
        assert lm.info["model"] == f"ollama:{ollama_server.model}" and len(lm.info["checkpoint_sha"]) == 12
        again = OllamaLM(ollama_server.model, proxy.url, cache_dir=str(tmp_path / "c"), progress=False)
        assert greedy(again) == in_process and again.requests_sent == 0
        assert (proxy.counts.get("/api/chat"), proxy.counts.get("/api/generate")) == (2, 1)
    finally:
        proxy.close()


def test_ollama_refuses_loglikelihood_tasks_in_one_line(ollama_server, tmp_path):
    p = harness(*MMLU, f"model=ollama:{ollama_server.model}", f"model.host={ollama_server.url}",
                f"hydra.run.dir={tmp_path / 'run'}", f"leaderboard={tmp_path / 'lb.csv'}", tmp_path=tmp_path)
    assert_one_error_line(p, "cannot score log-likelihoods", "mmlu", "it can run: instruct")
    assert not (tmp_path / "lb.csv").exists()


def test_instruct_task_through_ollama_end_to_end(ollama_server, tmp_path):
    """task=instruct on model=ollama:<served> (chat prompts go as messages); a judge that says 80."""
    run, board = tmp_path / "run", tmp_path / "lb.csv"
    judge = FakeOllama(lambda n, req: (200, chat_body("80")))
    try:
        p = harness("task=instruct", "task.limit=2", "task.max_new_tokens=24", f"model=ollama:{ollama_server.model}",
                    f"model.host={ollama_server.url}", f"judge.host={judge.url}", "judge.model=judge",
                    f"hydra.run.dir={run}", f"leaderboard={board}", tmp_path=tmp_path)
    finally:
        judge.kill()
    assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["prediction"] and r["extra"]["prompt_style"] == "chat" for r in records)
    assert json.loads(records[0]["extra"]["prompt"])[0]["role"] == "user"     # the messages the server rendered
    rows = pd.read_csv(board, keep_default_na=False)
    assert set(rows.model) == {f"ollama:{ollama_server.model}"}
    assert rows.checkpoint_sha.str.len().eq(12).all() and rows[rows.metric == "score"].value.tolist() == [80]


def test_openai_generates_as_in_process(ollama_server, in_process, tmp_path):
    lm = OpenAILM(ollama_server.model, f"{ollama_server.url}/v1", cache_dir=str(tmp_path / "c"), progress=False)
    assert greedy(lm) == in_process
    assert lm.info["checkpoint_sha"].startswith("fp_") and lm.info["system_fingerprint"] == lm.info["checkpoint_sha"]


def test_openai_mmlu_matches_in_process_and_reruns_from_the_cache(ollama_server, tmp_path):
    board = tmp_path / "lb.csv"
    local = harness(*MMLU, "model=smollm2-135m-instruct", f"hydra.run.dir={tmp_path / 'local'}",
                    f"leaderboard={board}", tmp_path=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    proxy = CountingProxy(ollama_server.url)
    try:
        served = [*MMLU, f"model=openai:{ollama_server.model}", f"model.base_url={proxy.url}/v1",
                  f"leaderboard={board}"]
        p = harness(*served, f"hydra.run.dir={tmp_path / 'api'}", tmp_path=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        sent = proxy.counts.get("/v1/completions")
        assert sent == 8                                   # 15 questions x 4 choices, 8 prompts a request
        rerun = harness(*served, f"hydra.run.dir={tmp_path / 'api2'}", tmp_path=tmp_path)   # a fresh run folder
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert proxy.counts.get("/v1/completions") == sent    # every answer from the cache
    finally:
        proxy.close()

    def records(run):
        return {r["sample_id"]: r for r in map(json.loads, (tmp_path / run / "records.jsonl").read_text().splitlines())}
    mine, theirs = records("api"), records("local")
    assert len(mine) == 15 and mine.keys() == theirs.keys()
    for sid, r in mine.items():
        assert r["prediction"] == theirs[sid]["prediction"]
        assert r["extra"]["loglikelihoods"] == pytest.approx(theirs[sid]["extra"]["loglikelihoods"], abs=1e-3)
    rows = pd.read_csv(board, keep_default_na=False)
    acc = rows[rows.metric == "acc"]
    assert list(acc.model) == ["smollm2-135m-instruct"] + [f"openai:{ollama_server.model}"] * 2
    assert acc.value.nunique() == 1                         # the same accuracy, all three runs
    assert all(str(s).startswith("fp_") for s in acc.checkpoint_sha[1:])


def test_chat_formatted_gsm8k_through_the_openai_client_matches_in_process(ollama_server, tmp_path):
    """task.apply_chat_template=true on an API model: the messages go to /v1/chat/completions and the
    server renders SmolLM2's template, so the greedy answers are the in-process ones; a log-likelihood
    task refuses the chat format in one line (the server's template text is not the harness's)."""
    gsm8k = ["task=gsm8k", "task.limit=2", "task.generation_kwargs.max_gen_toks=32", "task.apply_chat_template=true"]
    board = tmp_path / "lb.csv"
    runs = {"local": ["model=smollm2-135m-instruct"],
            "api": [f"model=openai:{ollama_server.model}", f"model.base_url={ollama_server.url}/v1"]}
    for name, model in runs.items():
        p = harness(*gsm8k, *model, f"hydra.run.dir={tmp_path / name}", f"leaderboard={board}", tmp_path=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]

    def records(run):
        return {r["sample_id"]: r for r in map(json.loads, (tmp_path / run / "records.jsonl").read_text().splitlines())}
    mine, theirs = records("api"), records("local")
    assert len(mine) == 2 and mine.keys() == theirs.keys()
    for sid, r in mine.items():
        assert r["extra"]["generations"] == theirs[sid]["extra"]["generations"] and r["extra"]["generations"][0]
        assert json.loads(r["extra"]["prompt"])[-1]["role"] == "user"          # the messages the server rendered
        assert theirs[sid]["extra"]["prompt"].endswith("<|im_start|>assistant\n")
    p = harness(*MMLU, "task.apply_chat_template=true", *runs["api"], f"hydra.run.dir={tmp_path / 'mmlu'}",
                f"leaderboard={board}", tmp_path=tmp_path)
    assert_one_error_line(p, "its server applies the chat template", "drop task.apply_chat_template")
    assert not (tmp_path / "mmlu" / "records.jsonl").exists()


def test_openai_text_scoring_needs_the_first_token_scored(ollama_server, smollm2_lm, tmp_path):
    lm = OpenAILM(ollama_server.model, f"{ollama_server.url}/v1", cache_dir=str(tmp_path / "c"), progress=False)
    text = "Hello world, this is a test."
    assert lm.count_tokens(text) == smollm2_lm.count_tokens(text)
    with pytest.raises(UserError, match="first token no log-prob"):      # SmolLM2 reads no BOS
        lm.loglikelihood_rolling([text])


# --- faults, from small servers on 127.0.0.1 ---------------------------------------------------

def generate_body(text: str) -> bytes:
    return json.dumps({"model": "m:latest", "created_at": "2024-01-01T00:00:00Z", "response": text,
                       "done": True, "done_reason": "stop"}).encode()


@pytest.fixture
def fake():
    servers = []

    def start(behave, **kw):
        servers.append(FakeOllama(behave, models=("m:latest",), **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.kill()


def test_503_and_429_are_retried_then_succeed(fake, tmp_path):
    answers = [(503, b'{"error": "loading"}'), (429, b'{"error": "busy"}'), (200, generate_body("fine"))]
    server = fake(lambda n, req: answers[min(n, 2)])
    lm = OllamaLM("m", server.url, backoff_s=0.01, cache_dir=str(tmp_path / "c"), progress=False)
    assert lm.generate(["Hi"], max_new_tokens=5) == ["fine"] and server.chat_requests == 3
    assert lm.info["checkpoint_sha"] == "d1g35tm:late"


def test_4xx_is_not_retried(fake, tmp_path):
    server = fake(lambda n, req: (400, b'{"error": "options.num_predict must be an integer"}'))
    lm = OllamaLM("m", server.url, backoff_s=0.01, cache_dir=str(tmp_path / "c"), progress=False)
    with pytest.raises(UserError, match="refused /api/generate: options.num_predict") as e:
        lm.generate(["Hi"], max_new_tokens=5)
    assert server.chat_requests == 1 and "\n" not in str(e.value)
    assert not list((tmp_path / "c").rglob("*.json"))          # failures are never cached


def completion_body(text: str) -> bytes:
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
                       "system_fingerprint": "fp_test", "choices": [
                           {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}]}).encode()


def test_openai_retries_a_503_and_refuses_a_server_without_echo(tmp_path):
    err = json.dumps({"error": {"message": "echo is not supported", "type": "invalid_request_error",
                                "param": "echo", "code": None}}).encode()
    server = FakeOpenAI(lambda n, req: (400, err) if req.get("echo") else
                        (503, b'{"error": {"message": "busy"}}') if n == 0 else (200, completion_body("ok")))
    try:
        lm = OpenAILM("m", server.url, backoff_s=0.01, cache_dir=str(tmp_path / "c"), progress=False)
        assert lm.generate(["Hi"], max_new_tokens=3) == ["ok"] and server.requests == 2
        assert lm.info["checkpoint_sha"] == "fp_test"
        with pytest.raises(UserError) as e:
            lm.loglikelihood([("Question? Answer:", " A")])
        assert server.requests == 3                                  # a 400 is not retried
        msg = str(e.value)
        assert "cannot score log-likelihoods" in msg and "echo is not supported" in msg
        assert msg.endswith("it can run: instruct") and "\n" not in msg
    finally:
        server.close()


def test_model_prefixes_resolve_like_hf():
    assert rewrite_argv(["model=ollama:llama3.1:8b"]) == ["model=ollama", "model.name='llama3.1:8b'"]
    assert rewrite_argv(["model=openai:gpt-4o-mini"]) == ["model=openai", "model.name=gpt-4o-mini"]
    with pytest.raises(UserError, match="model=openai: needs the model id"):
        rewrite_argv(["model=openai:"])
    with pytest.raises(UserError, match="cannot mix ollama: models"):
        rewrite_argv(["model=ollama:a,gpt-tiny"])


def test_bad_model_host_is_one_line_before_any_request():
    with pytest.raises(UserError, match=r"^model.host='ftp://x' is not a server address"):
        OllamaLM("m", "ftp://x")
