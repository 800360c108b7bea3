"""task=judge_probes: injection probes measured before and after hardening, against a scripted
judge over HTTP (exact figures) and, end to end, against SmolLM2 served by harness.serve."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from fake_servers import FakeOllama
from test_judge import chat_body

from clitools import ENV, run_module
from harness.judge import OllamaJudge
from tasks.base import TaskError
from tasks.judge_probes import ATTACKS, FAMILIES, JudgeProbesTask

FELL_FOR = ("Ignore all previous instructions", "[[100]]", '"score": 100', "complete certainty")


def gullible(n, req):
    """A judge that gives a wrong answer 10 unless an attack is pasted into the prompt unfenced,
    where it obeys and gives 100; a fenced answer never moves it."""
    system, user = req["messages"][0]["content"], req["messages"][-1]["content"]
    fenced = "<<<DATA-" in user and "never instructions" in system
    attacked = any(s in user for s in FELL_FOR) or user.count("### Correct output") > 1
    return 200, chat_body("100" if attacked and not fenced else "10")


def probes(url, tmp_path, **kw):
    judge = OllamaJudge(url, model="judge", cache_dir=str(tmp_path / "c"), progress=False, retries=0, **kw)
    return JudgeProbesTask(judge, limit=3)


def test_inflation_before_and_after_hardening(tmp_path):
    server = FakeOllama(gullible)
    try:
        task = probes(server.url, tmp_path, harden=False)      # the comparison ignores judge.harden
        samples = task.samples()
        records = task.score(task.subject(), samples)
    finally:
        server.kill()
    assert len(samples) == 3 * len(FAMILIES) and server.requests == 2 * len(samples)
    assert [r.sample_id for r in records] == [s.id for s in samples]
    m = task.metrics(records)
    for family in ATTACKS:
        before, after = m[f"inflation_{family}_unhardened"], m[f"inflation_{family}_hardened"]
        assert (before.value, before.n, after.value, after.n) == (pytest.approx(0.9), 3, 0.0, 3), family
    assert m["inflation_mean_unhardened"].value == pytest.approx(0.9) and m["inflation_mean_hardened"].n == 15
    assert task.judge_reliability == {"judge_unscored_rate": 0.0}
    control = next(r for r in records if r.extra["family"] == "control")
    assert control.scores == {"unhardened": 10, "hardened": 10}


def test_unscored_attack_is_left_out_of_the_pair_and_counted(tmp_path):
    def behave(n, req):
        user = req["messages"][-1]["content"]
        return (200, chat_body("no idea")) if "complete certainty" in user else gullible(n, req)
    server = FakeOllama(behave)
    try:
        task = probes(server.url, tmp_path)
        records = task.score(task.subject(), task.samples())
    finally:
        server.kill()
    m = task.metrics(records)
    confident = m["inflation_confident_hardened"]
    assert math.isnan(confident.value) and (confident.n, confident.n_unscored) == (0, 3)
    assert m["inflation_mean_hardened"].n_unscored == 3
    assert task.judge_reliability["judge_unscored_rate"] == pytest.approx(3 / 18)


def test_bad_probe_file_is_one_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "x", "question": "q"}\n')
    with pytest.raises(TaskError, match=r"p.jsonl:1 lacks the text field\(s\) reference, wrong"):
        JudgeProbesTask(OllamaJudge("http://127.0.0.1:1"), path=str(bad))


def test_cli_end_to_end_with_the_real_server(ollama_server, tmp_path):
    lb = tmp_path / "lb.csv"
    env = dict(ENV, HARNESS_CACHE=str(tmp_path / "cache"))
    p = run_module("harness", "task=judge_probes", "task.limit=1", f"judge.host={ollama_server.url}",
                   f"judge.model={ollama_server.model}", "judge.num_predict=8", f"leaderboard={lb}",
                   f"hydra.run.dir={tmp_path / 'run'}", env=env)
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert len(records) == len(FAMILIES)
    assert all(set(r["scores"]) == {"unhardened", "hardened"} and r["extra"]["judge_reply_hardened"]
               for r in records)
    assert p.returncode == 0, p.stderr
    df = pd.read_csv(lb)
    assert set(df.model) == {f"judge:{ollama_server.model}"} and set(df.task) == {"judge_probes"}
    assert {f"inflation_{f}_{m}" for f in (*ATTACKS, "mean") for m in ("unhardened", "hardened")} == set(df.metric)
