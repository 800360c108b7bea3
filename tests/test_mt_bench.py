"""MT-Bench: the rating parser, options, scoring against a scripted judge over real HTTP (FakeOllama:
which prompt each turn gets, what it contains, how replies become scores, an outage, the second
pass), hand-checked metrics, and `python -m harness task=mt_bench` end to end with SmolLM2 as
both the model and the judge (the project's own Ollama-compatible server)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from harness.cli import UserError
from harness.judge import OllamaJudge
from tasks.base import Record, TaskError
from tasks.mt_bench import MTBenchTask
from tasks.mt_bench_data import parse_rating
from clitools import ENV, run_module
from test_cli import lines
from test_judge import FakeOllama, chat_body

NOWHERE = "http://127.0.0.1:9"      # never contacted: the judge connects on first use


def judge_at(url, tmp_path, **kw) -> OllamaJudge:
    kw = {"model": "judge", "cache_dir": str(tmp_path / "cache"), "progress": False, "retries": 1,
          "backoff_s": 0.01, **kw}
    return OllamaJudge(url, **kw)


def asked(req) -> tuple[str, int]:
    """(the question's first words, the turn) a judge request is about."""
    user = req["messages"][1]["content"]
    turn = 2 if user.startswith("<|The Start of") else 1
    first = user.split("### User:\n")[1] if turn == 2 else user.split("[Question]\n")[1]
    return first[:20], turn


@pytest.fixture(scope="module")
def tiny_lm():
    from models.registry import load_lm
    return load_lm("gpt-tiny", progress=False)


@pytest.mark.parametrize("reply, score, error", [
    ("Fine answer. Rating: [[7.5]]", 7.5, None), ("[[8]]", 8, None), ("Rating: [8]", 8, None),
    ('Format "Rating: [[5]]" ... so: [[3]]', 3, None), ("[[10]] and [2]", 10, None), ("[[ 1 ]]", 1, None), ("[[7.]]", 7, None),
    ("A lovely answer, well done!", None, "no [[rating]] in reply"), ("  ", None, "empty reply"),
    ("[[11]]", None, "rating 11 out of range 1-10"), ("[[0]]", None, "out of range"), ("[[-3]]", None, "no [[rating]]"),
])
def test_parse_rating(reply, score, error):
    got, why = parse_rating(reply)
    assert got == score and (why is None if error is None else error in why)


def test_samples_options_and_version(tmp_path):
    judge = judge_at(NOWHERE, tmp_path)
    task = MTBenchTask(judge)
    samples = task.samples()
    assert len(samples) == 80 and samples[0].id == "q081" and len({s.id for s in samples}) == 80
    maths = MTBenchTask(judge, categories=["math", "writing"], limit=12).samples()
    assert [s.id for s in maths] == [f"q{i:03d}" for i in [*range(81, 91), 111, 112]]
    assert maths[-1].data["reference"][1] and maths[0].data["category"] == "writing"
    assert [s.id for s in MTBenchTask(judge, categories="coding").samples()][:2] == ["q121", "q122"]
    with pytest.raises(TaskError, match=r"no MT-Bench category 'maths'; use null \(all\) or some of: coding, "
                                        r"extraction, humanities, math, reasoning, roleplay, stem, writing$"):
        MTBenchTask(judge, categories=["maths"])
    with pytest.raises(UserError, match="task.max_new_tokens"):
        MTBenchTask(judge, max_new_tokens=0)
    assert task.reply_tokens == 512 and MTBenchTask(judge_at(NOWHERE, tmp_path, num_predict=64)).reply_tokens == 64
    base = task.version
    assert MTBenchTask(judge, limit=3).version == base
    assert MTBenchTask(judge_at(NOWHERE, tmp_path, model="other")).version == base   # judge model: own column
    assert MTBenchTask(judge_at(NOWHERE, tmp_path, json_format=True)).version != base  # constrained verdicts
    for changed in (MTBenchTask(judge_at(NOWHERE, tmp_path, harden=False)), MTBenchTask(judge, max_new_tokens=64),
                    MTBenchTask(judge, categories=["math"]), MTBenchTask(judge_at(NOWHERE, tmp_path, num_predict=64))):
        assert changed.version != base


def test_missing_data_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))
    with pytest.raises(TaskError, match=f"MT-Bench file {tmp_path}/mt_bench/question.jsonl not found.*HARNESS_DATA"):
        MTBenchTask(judge_at(NOWHERE, tmp_path))


def test_scripted_judge_prompts_parsing_and_metrics(tmp_path, smollm2_lm):
    script = {("Compose an engaging ", 1): "Vivid. Rating: [[7.5]]",
              ("Compose an engaging ", 2): "Every sentence starts with A. Rating: [8]",
              ("The vertices of a tr", 1): "I like it.",
              ("The vertices of a tr", 2): "Perfect! [[11]]"}
    seen = {}

    def behave(n, req):
        seen[asked(req)] = req["messages"]
        return 200, chat_body(script[asked(req)])

    server = FakeOllama(behave)
    try:
        judge = judge_at(server.url, tmp_path)
        task = MTBenchTask(judge, categories=["writing", "math"], max_new_tokens=6)
        samples = [s for s in task.samples() if s.id in ("q081", "q111")]
        records = task.score(smollm2_lm, samples)
    finally:
        server.kill()
    assert [r.sample_id for r in records] == ["q081", "q111"] and server.chat_requests == 4
    writing, maths = records
    for r, s in zip(records, samples):
        a1, a2 = r.prediction
        assert a1 and a2 and r.extra["prompt_format"] == "chat"
        p1, p2 = r.extra["prompts"]          # the second turn is asked after the model's own first answer
        assert p2 == smollm2_lm.chat_prompt([{"role": "user", "content": s.data["turns"][0]},
                                             {"role": "assistant", "content": a1},
                                             {"role": "user", "content": s.data["turns"][1]}])
        system, user = seen[(s.data["turns"][0][:20], 2)]
        assert judge.fence(a1) in user["content"] and judge.fence(a2) in user["content"]
        assert s.data["turns"][1] in user["content"] and "<<<DATA-" in system["content"]
        assert "focus on the assistant's answer to the second" in system["content"]
    # math: FastChat's math prompts with the GPT-4 reference; writing: none
    ref = maths.target
    m1, m2 = seen[("The vertices of a tr", 1)][1]["content"], seen[("The vertices of a tr", 2)][1]["content"]
    assert ref[0] in m1 and "[The Start of Reference Answer]" in m1 and ref[0] in m2 and ref[1] in m2
    assert maths.extra["judge_prompts"] == ["single-math-v1", "single-math-v1-multi-turn"]
    assert writing.target is None and writing.extra["judge_prompts"] == ["single-v1", "single-v1-multi-turn"]
    assert "Reference" not in seen[("Compose an engaging ", 1)][1]["content"]
    # [[7.5]] / [8] / no rating / [[11]]
    assert writing.scores == {"turn1": 7.5, "turn2": 8.0} and maths.scores == {"turn1": None, "turn2": None}
    assert maths.extra["errors"] == ["no [[rating]] in reply", "rating 11 out of range 1-10"]
    assert not any(r.extra["retry"] for r in records) and writing.extra["judge_digest"] == "d1g35tjudge:latest"

    m = task.metrics(records)
    assert set(m) == {"score", "score_turn1", "score_turn2", "score_math", "score_writing"}
    assert (m["score"].value, m["score"].stderr, m["score"].n, m["score"].n_unscored) == (7.75, 0.25, 2, 2)
    assert [(m[k].value, m[k].n, m[k].n_unscored) for k in ("score_turn1", "score_turn2", "score_writing")] == [
        (7.5, 1, 1), (8.0, 1, 1), (7.75, 2, 0)]
    assert math.isnan(m["score_math"].value) and (m["score_math"].n, m["score_math"].n_unscored) == (0, 2)
    assert task.judge_reliability == {"judge_unscored_rate": 0.5, "judge_swap_consistency": None,
                                      "judge_agreement": None}
    assert task.unscored_reason(records) is None
    assert task.unscored_reason([maths]) == (
        "no sample was scored: judge.model=judge answered 2 of 2 judgements without a readable [[rating]] in "
        "1-10: no [[rating]] in reply (1), rating 11 out of range 1-10 (1) (final; the replies are in "
        "records.jsonl, extra.judge_replies: try a larger judge.num_predict or another judge.model in a new "
        "hydra.run.dir)")


def test_turn2_outage_marks_retry_and_a_rerun_scores(tmp_path, tiny_lm):
    state = {"down": True}

    def behave(n, req):
        if asked(req)[1] == 2 and state["down"]:
            return 503, b'{"error": "busy"}'
        return 200, chat_body(f"Rating: [[{asked(req)[1] + 4}]]")

    server = FakeOllama(behave)
    try:
        first = MTBenchTask(judge_at(server.url, tmp_path), limit=2, max_new_tokens=4)
        records = first.score(tiny_lm, first.samples())
        assert [r.scores for r in records] == [{"turn1": 5.0, "turn2": None}] * 2
        assert all(r.extra["retry"] and r.extra["judge_failed"] == [False, True] for r in records)
        assert [r.extra["errors"][1] for r in records] == ["HTTP 503 after 2 attempts", "HTTP 503 after 2 attempts"]
        assert records[0].extra["prompt_format"] == "transcript"      # gpt-tiny has no chat template
        assert records[0].extra["prompts"][1].startswith(records[0].extra["prompts"][0])
        assert first.unscored_reason([Record("q0", "h", ["", ""], None, {"turn1": None, "turn2": None},
                                             {"errors": ["timeout after 2 attempts"] * 2,
                                              "judge_failed": [True, True], "retry": True})]) == (
            f"no sample was scored: the judge at judge.host={server.url} failed for all 2 of 2 judgements: "
            "timeout after 2 attempts (2); rerun the same hydra.run.dir to retry them")
        state["down"] = False              # what the engine does on a rerun: score those questions again
        second = MTBenchTask(judge_at(server.url, tmp_path), limit=2, max_new_tokens=4)
        again = second.score(tiny_lm, second.samples())
    finally:
        server.kill()
    assert [r.scores for r in again] == [{"turn1": 5.0, "turn2": 6.0}] * 2
    assert all(r.extra["cached"] == [True, False] and not r.extra["retry"] for r in again)   # turn 1: the cache
    assert second.metrics(again)["score"].value == 5.5


def test_self_consistency_agreement(tmp_path, tiny_lm):
    # the sampled second pass (temperature > 0) agrees on turn 1, not on turn 2
    def behave(n, req):
        sampled, turn = req["options"]["temperature"] > 0, asked(req)[1]
        return 200, chat_body(f"[[{3 if sampled and turn == 2 else 7}]]")

    server = FakeOllama(behave)
    try:
        task = MTBenchTask(judge_at(server.url, tmp_path, self_consistency=True), limit=2, max_new_tokens=4)
        records = task.score(tiny_lm, task.samples())
    finally:
        server.kill()
    assert server.chat_requests == 8 and records[0].extra["second_scores"] == {"turn1": 7.0, "turn2": 3.0}
    m = task.metrics(records)
    assert (m["judge_agreement"].value, m["judge_agreement"].n) == (0.5, 4) and m["score"].value == 7
    assert task.judge_reliability["judge_agreement"] == 0.5 and task.judge_reliability["judge_unscored_rate"] == 0


def test_cli_end_to_end(ollama_server, tmp_path):
    # SmolLM2-135M as model and as its own judge. In free text it never writes a [[rating]] (the
    # scripted tests cover that path); judge.json_format=true holds it to {"rating": "[[n]]"} by
    # grammar, so every turn is rated and the run appends rows.
    run = tmp_path / "run"
    env = dict(ENV, HARNESS_CACHE=str(tmp_path / "cache"))
    p = run_module("harness", "task=mt_bench", "model=smollm2-135m-instruct", f"judge.host={ollama_server.url}",
                   f"judge.model={ollama_server.model}", "task.limit=3", "task.max_new_tokens=12",
                   "judge.num_predict=24", "judge.json_format=true", f"leaderboard={tmp_path / 'lb.csv'}",
                   f"hydra.run.dir={run}", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = pd.read_csv(tmp_path / "lb.csv").set_index("metric")
    assert {"score", "score_turn1", "score_turn2", "score_writing"} == set(rows.index)
    assert (rows.loc["score", "n"], rows.loc["score", "n_unscored"]) == (6, 0) and 1 <= rows.loc["score", "value"] <= 10
    records = [json.loads(line) for line in lines((run / "records.jsonl").read_text())]
    assert [r["sample_id"] for r in records] == ["q081", "q082", "q083"]
    for r in records:
        assert len(r["prediction"]) == 2 and all(r["prediction"]) and set(r["scores"]) == {"turn1", "turn2"}
        assert all(json.loads(reply)["rating"].startswith("[[") for reply in r["extra"]["judge_replies"])
        assert r["extra"]["prompt_format"] == "chat" and r["extra"]["retry"] is False


def test_cli_scored_run_appends_rows(tmp_path):
    judge = FakeOllama(lambda n, req: (200, chat_body(f"Fine. Rating: [[{asked(req)[1] + 5}]]")))
    board, run = tmp_path / "lb.csv", tmp_path / "run"
    try:
        p = run_module("harness", "task=mt_bench", "model=gpt-tiny", f"judge.host={judge.url}", "judge.model=judge",
                       "task.limit=2", "task.categories=[writing,math]", "task.max_new_tokens=4",
                       f"leaderboard={board}", f"hydra.run.dir={run}", env=dict(ENV, HARNESS_CACHE=str(tmp_path / "c")))
    finally:
        judge.kill()
    assert p.returncode == 0, p.stderr[-3000:]
    rows = pd.read_csv(board).set_index("metric")
    assert set(rows.index) == {"score", "score_turn1", "score_turn2", "score_writing"}
    assert (rows.loc["score", "value"], rows.loc["score", "n"], rows.loc["score", "n_unscored"]) == (6.5, 4, 0)
    assert rows.loc["score_turn2", "value"] == 7 and set(rows.task) == {"mt_bench"}
    assert set(rows.judge_model) == {"judge"} and set(rows.judge_digest) == {"d1g35tjudge:latest"}
    assert set(rows.judge_unscored_rate) == {0.0} and rows.judge_agreement.isna().all()
