"""judge=openai: the same Judge over an OpenAI-compatible server, through the real `openai` client:
scripted faults on 127.0.0.1 and, end to end, harness.serve's /v1 routes with SmolLM2 as the judge."""
from __future__ import annotations

import json

import pytest
from fake_servers import FakeOpenAI

from harness.judge import JudgeConfigError, OpenAIJudge

ITEM = ("Name a colour.", "Blue.", "Red.")


def completion(content: str) -> bytes:
    return json.dumps({"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]}).encode()


def judge_at(url, tmp_path, model="m", **kw):
    kw = {"timeout": 5, **kw}
    return OpenAIJudge(url, model=model, cache_dir=str(tmp_path / "c"), progress=False, retries=1,
                       backoff_s=0.01, api_key_env=None, **kw)


def test_grades_retries_and_caches(tmp_path):
    seen = []

    def behave(n, req):
        seen.append(req)
        return (503, b'{"error": {"message": "busy"}}') if n == 0 else (200, completion("Score: 70"))
    server = FakeOpenAI(behave)
    try:
        grade = judge_at(server.url, tmp_path).grade(*ITEM)
        again = judge_at(server.url, tmp_path).grade(*ITEM)
    finally:
        server.kill()
    assert (grade.score, grade.parse, grade.cached) == (70, "fallback", False) and again.cached
    assert server.requests == 2                                    # one 503, one answer, then the cache
    body = seen[-1]
    assert (body["model"], body["temperature"], body["seed"], body["max_tokens"]) == ("m", 0.0, 123, 32)
    assert "<<<DATA-" in body["messages"][1]["content"]           # hardened by default


def test_outage_is_unscored_and_transient(tmp_path):
    server = FakeOpenAI(lambda n, req: (502, b'{"error": {"message": "down"}}'))
    try:
        grade = judge_at(server.url, tmp_path).grade(*ITEM)
    finally:
        server.kill()
    assert grade.score is None and grade.transient and grade.error == "HTTP 502 after 2 attempts"


@pytest.mark.parametrize("status, says", [(401, "refused the API key"), (404, "is not served"),
                                          (400, "rejected the request (HTTP 400")])
def test_final_errors_are_one_line(tmp_path, status, says):
    server = FakeOpenAI(lambda n, req: (status, b'{"error": {"message": "no"}}'))
    try:
        with pytest.raises(JudgeConfigError, match=r"judge.base_url=http://127.0.0.1:\d+/v1") as e:
            judge_at(server.url, tmp_path).grade(*ITEM)
    finally:
        server.kill()
    assert says in str(e.value) and "\n" not in str(e.value)


def test_unknown_model_and_bad_address(tmp_path):
    server = FakeOpenAI(lambda n, req: (200, completion("1")))
    try:
        with pytest.raises(JudgeConfigError, match=r"judge model 'gpt-9' is not served .* \(it serves: m\)"):
            _ = OpenAIJudge(server.url, model="gpt-9", api_key_env=None, progress=False).digest
    finally:
        server.kill()
    with pytest.raises(JudgeConfigError, match="judge.base_url='localhost:8000' is not a server address"):
        OpenAIJudge("localhost:8000")


def test_real_server_over_v1(ollama_server, tmp_path):
    judge = judge_at(ollama_server.url + "/v1", tmp_path, model=ollama_server.model, style="mt_bench",
                     num_predict=24, harden=False, timeout=120)   # a real model on a loaded 2-core machine
    grades = judge.grade_many([ITEM, ("Add 2 and 2.", "4", "5")])
    assert len(grades) == 2 and all(g.raw and not g.transient for g in grades)
    assert all((g.score is None) == (g.error is not None) for g in grades)
    assert judge.digest == ollama_server.model                    # the served id stands for the digest
