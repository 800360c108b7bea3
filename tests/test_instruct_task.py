"""The judged instruction task: samples and metrics, scoring with a real model, and end to end
through `python -m harness task=instruct` against the project's Ollama-compatible server (the
commands run in this process, clitools.run_module: same entry point, status and output)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from harness.judge import OllamaJudge
from tasks.base import Record, TaskError
from tasks.instruct import InstructTask, bootstrap_ci95, judge_input
from tasks.instruction_data import instruction_split
from clitools import ENV, run_module
from test_cli import assert_one_error_line, lines
from test_judge import CountingProxy, FakeOllama, chat_body

NOWHERE = "http://127.0.0.1:9"      # never contacted: the judge connects on first use


def offline_judge(tmp_path, **kw) -> OllamaJudge:
    kw = {"model": "judge", "cache_dir": str(tmp_path / "cache"), "progress": False, **kw}
    return OllamaJudge(NOWHERE, **kw)


def record(i, score, model="judge", digest="sha256:abc", error=None, retry=False):
    return Record(f"test/{i:04d}", "h", "resp", "ref", {"score": score},
                  {"judge_model": model, "judge_digest": digest, "error": error, "retry": retry})


@pytest.fixture(scope="module")
def tiny_lm():
    from models.registry import load_lm
    return load_lm("llama-tiny", progress=False)


def test_samples_are_the_held_out_split(tmp_path):
    task = InstructTask(offline_judge(tmp_path))
    samples = task.samples()
    split = instruction_split()
    assert len(samples) == len(split.test) and len({s.id for s in samples}) == len(samples)
    train = {(e["instruction"], e["input"]) for e in split.train}
    assert not any((s.data["instruction"], s.data["input"]) in train for s in samples)
    assert [s.id for s in InstructTask(offline_judge(tmp_path), limit=3).samples()] == [s.id for s in samples[:3]]
    assert judge_input(samples[0].data).endswith(samples[0].data["instruction"] if not samples[0].data["input"]
                                                 else samples[0].data["input"])


def test_version_tracks_what_changes_scores(tmp_path):
    base = InstructTask(offline_judge(tmp_path)).version
    assert InstructTask(offline_judge(tmp_path), limit=2).version == base
    assert InstructTask(offline_judge(tmp_path, model="other")).version == base   # judge model: own column
    for changed in (InstructTask(offline_judge(tmp_path, style="mt_bench")),
                    InstructTask(offline_judge(tmp_path, json_format=True)),
                    InstructTask(offline_judge(tmp_path), max_new_tokens=64),
                    InstructTask(offline_judge(tmp_path), prompt_style="alpaca"),
                    InstructTask(offline_judge(tmp_path), split="val")):
        assert changed.version != base


def test_bad_settings(tmp_path):
    with pytest.raises(TaskError, match="prompt_style"):
        InstructTask(offline_judge(tmp_path), prompt_style="fancy")
    with pytest.raises(TaskError, match="split"):
        InstructTask(offline_judge(tmp_path), split="dev")


def test_metrics_mean_interval_and_unscored(tmp_path):
    task = InstructTask(offline_judge(tmp_path))
    records = [record(i, s) for i, s in enumerate([80.0, None, 60.0, 100.0, None, 40.0])]
    m = task.metrics(records)
    assert m["score"].value == 70.0 and (m["score"].n, m["score"].n_unscored) == (4, 2)
    assert m["score"].stderr == pytest.approx(math.sqrt(((10**2 * 2 + 30**2 * 2) / 3) / 4))
    low, high = m["score_ci95_low"].value, m["score_ci95_high"].value
    assert 40 <= low < 70 < high <= 100 and m["score_ci95_low"].n_unscored == 2
    assert (low, high) == bootstrap_ci95([80.0, 60.0, 100.0, 40.0], task.seed)   # deterministic
    assert task.judge_keys.model == "judge" and task.judge_keys.digest == "sha256:abc"
    none = task.metrics([record(0, None), record(1, None)])
    assert all(math.isnan(v.value) and (v.n, v.n_unscored) == (0, 2) for v in none.values())


def test_unscored_reason(tmp_path, caplog):
    task = InstructTask(offline_judge(tmp_path))
    assert task.unscored_reason([record(0, None, error="unparseable reply"), record(1, 55.0)]) is None
    down = [record(i, None, error=e, retry=True) for i, e in
            enumerate(["timeout after 4 attempts"] * 2 + ["timeout after 1 attempt"] * 3)]
    assert task.unscored_reason(down) == (
        f"no sample was scored: the judge at judge.host={NOWHERE} failed for all 5 samples: timeout after "
        "1 attempt (3), timeout after 4 attempts (2); rerun the same hydra.run.dir to retry them")
    mixed = down[:2] + [record(7, None, error="unparseable reply"), record(8, None, error="empty reply")]
    reason = task.unscored_reason(mixed)
    assert "failed for 2 of 4 samples: timeout after 4 attempts (2); rerun the same hydra.run.dir" in reason
    assert "judge.model=judge answered 2 of 4 samples without a readable score: " in reason
    assert "unparseable reply (1), empty reply (1) (final;" in reason and "\n" not in reason
    assert "no samples to judge" in task.unscored_reason([])
    with caplog.at_level("WARNING", logger="tasks.instruct"):       # a partial outage is not silent
        task.metrics(down[:2] + [record(5, 80.0)])
    assert "2 of 3 samples are unscored because the judge failed" in caplog.text


def test_metrics_refuse_records_of_another_judge(tmp_path):
    task = InstructTask(offline_judge(tmp_path))
    with pytest.raises(TaskError, match="graded by judge 'llama3.1:8b'.*new hydra.run.dir"):
        task.metrics([record(0, 50.0), record(1, 70.0, model="llama3.1:8b")])


def test_score_with_garbage_judge_keeps_every_sample(tmp_path, tiny_lm):
    server = FakeOllama(lambda n, req: (200, chat_body("Hmm, hard to say.")))
    try:
        judge = OllamaJudge(server.url, model="judge", cache_dir=str(tmp_path / "c"), progress=False)
        task = InstructTask(judge, limit=3, max_new_tokens=4)
        records = task.score(tiny_lm, task.samples())
    finally:
        server.kill()
    assert [r.sample_id for r in records] == [s.id for s in task.samples()]
    assert all(r.scores == {"score": None} and r.extra["error"] == "unparseable reply" for r in records)
    assert all(r.extra["retry"] is False for r in records)          # the judge answered: final
    assert task.unscored_reason(records).startswith(
        "no sample was scored: judge.model=judge answered all 3 samples without a readable score: "
        "unparseable reply (3) (final;")
    assert all(r.extra["prompt_style"] == "alpaca" and "### Response:" in r.extra["prompt"] for r in records)
    m = task.metrics(records)
    assert (m["score"].n, m["score"].n_unscored) == (0, 3) and task.judge_keys.digest == "d1g35tjudge:latest"


def test_judge_outage_marks_retry_and_a_rerun_scores(tmp_path, tiny_lm):
    state = {"down": True}
    server = FakeOllama(lambda n, req: (503, b'{"error": "busy"}') if state["down"] else (200, chat_body("64")))
    try:
        def task():
            judge = OllamaJudge(server.url, model="judge", cache_dir=str(tmp_path / "c"), progress=False,
                                retries=1, backoff_s=0.01)
            return InstructTask(judge, limit=3, max_new_tokens=4)
        first = task()
        records = first.score(tiny_lm, first.samples())
        assert all(r.scores == {"score": None} and r.extra["retry"] is True for r in records)
        assert [r.extra["error"] for r in records] == ["HTTP 503 after 2 attempts"] * 2 + ["HTTP 503 after 1 attempt"]
        assert first.unscored_reason(records) == (
            f"no sample was scored: the judge at judge.host={server.url} failed for all 3 samples: HTTP 503 "
            "after 2 attempts (2), HTTP 503 after 1 attempt (1); rerun the same hydra.run.dir to retry them")
        state["down"] = False                # what the engine does on a rerun: score those samples again
        second = task()
        again = second.score(tiny_lm, second.samples())
    finally:
        server.kill()
    assert [r.sample_id for r in again] == [r.sample_id for r in records]
    assert all(r.scores == {"score": 64} and r.extra["retry"] is False and not r.extra["cached"] for r in again)
    assert second.unscored_reason(again) is None and second.metrics(again)["score"].value == 64


def test_score_with_real_model_and_judge(ollama_server, smollm2_lm, tmp_path):
    judge = OllamaJudge(ollama_server.url, model=ollama_server.model, cache_dir=str(tmp_path / "c"),
                        progress=False)
    task = InstructTask(judge, limit=2, max_new_tokens=16)
    records = task.score(smollm2_lm, task.samples())
    assert len(records) == 2
    for r, s in zip(records, task.samples()):
        assert r.prediction and r.target == s.data["output"] and r.extra["judge_reply"]
        assert r.extra["prompt_style"] == "chat" and r.extra["judge_digest"] == judge.digest
        assert (r.scores["score"] is None) == (r.extra["error"] is not None)


# --- the CLI ---------------------------------------------------------------------------------------

def instruct_cli(tmp_path, host, model, *extra):
    # The val split: the 135M judge reads a score in one of its first 3 replies (none on test's),
    # and a run with no scored sample appends no rows. Unhardened: the fence's longer prompt costs
    # the 135M judge its one readable score (task=judge_probes measures hardening, not this test).
    env = dict(ENV, HARNESS_CACHE=str(tmp_path / "cache"))
    args = ["task=instruct", "model=smollm2-135m-instruct", f"judge.host={host}", f"judge.model={model}",
            "task.split=val", "task.limit=3", "task.max_new_tokens=32", "judge.harden=false", f"leaderboard={tmp_path / 'lb.csv'}", *extra]
    return run_module("harness", *args, env=env)


def test_cli_end_to_end_resume_and_cache(ollama_server, tmp_path):
    proxy = CountingProxy(ollama_server.url)
    try:
        run = tmp_path / "run"
        p = instruct_cli(tmp_path, proxy.url, ollama_server.model, f"hydra.run.dir={run}")
        assert p.returncode == 0, p.stderr
        df = pd.read_csv(tmp_path / "lb.csv")
        assert set(df.metric) == {"score", "score_ci95_low", "score_ci95_high"}
        row = df[df.metric == "score"].iloc[0]
        assert row.n + row.n_unscored == 3 and row.task == "instruct"
        assert row.judge_model == ollama_server.model and isinstance(row.judge_digest, str) and row.judge_digest
        records = [json.loads(line) for line in lines((run / "records.jsonl").read_text())]
        assert len(records) == 3 and proxy.counts["/api/chat"] == 3
        for r in records:
            assert r["extra"]["prompt"] and r["extra"]["judge_reply"] and "score" in r["scores"]
            assert isinstance(r["prediction"], str)

        before, stored = dict(proxy.counts), (run / "records.jsonl").read_bytes()
        p = instruct_cli(tmp_path, proxy.url, ollama_server.model, f"hydra.run.dir={run}")  # resume
        assert p.returncode == 0, p.stderr
        assert "reusing 3 finished records of 3" in p.stdout + p.stderr
        assert proxy.counts == before and (run / "records.jsonl").read_bytes() == stored
        assert len(pd.read_csv(tmp_path / "lb.csv")) == 3                     # a finished run appends once

        p = instruct_cli(tmp_path, proxy.url, ollama_server.model, f"hydra.run.dir={tmp_path / 'run2'}")
        assert p.returncode == 0, p.stderr                                   # a new run dir: cache
        assert proxy.counts["/api/chat"] == 3
        df = pd.read_csv(tmp_path / "lb.csv")
        assert len(df) == 6 and df[df.metric == "score"].value.nunique(dropna=False) == 1
    finally:
        proxy.close()


def test_cli_bad_judge_host_stops_before_the_model_loads(tmp_path):
    # the checkpoint does not exist: had the model been loaded first, that would be the error
    env = dict(ENV, HARNESS_CACHE=str(tmp_path / "cache"))
    p = run_module("harness", "task=instruct", "model=checkpoint", f"model.name={tmp_path / 'no-such-checkpoint'}",
                   "judge.host=notaurl::::", f"hydra.run.dir={tmp_path / 'run'}", f"leaderboard={tmp_path / 'lb.csv'}",
                   env=env)
    assert_one_error_line(p, "judge.host='notaurl::::'", "a valid value looks like http://127.0.0.1:11434")
    assert "no-such-checkpoint" not in p.stderr and not (tmp_path / "lb.csv").exists()


def test_cli_unknown_judge_model(ollama_server, tmp_path):
    p = instruct_cli(tmp_path, ollama_server.url, "llama3.1:8b", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_error_line(p, "ollama pull llama3.1:8b", "judge.model")
    assert not (tmp_path / "lb.csv").exists()


def test_cli_judge_outage_appends_nothing_and_a_rerun_scores(tmp_path):
    state = {"down": True}
    judge = FakeOllama(lambda n, req: (503, b'{"error": "busy"}') if state["down"] else (200, chat_body("64")))
    board, run = tmp_path / "lb.csv", tmp_path / "run"
    args = ["task=instruct", "model=llama-tiny", f"judge.host={judge.url}", "judge.model=judge", "judge.retries=0",
            "task.limit=2", "task.max_new_tokens=4", f"leaderboard={board}", f"hydra.run.dir={run}"]
    env = dict(ENV, HARNESS_CACHE=str(tmp_path / "cache"))

    def cli():
        return run_module("harness", *args, env=env)

    try:
        p = cli()
        assert_one_error_line(p, "no sample was scored", "failed for all 2 samples", "rerun the same hydra.run.dir")
        assert not board.exists() and len(lines((run / "records.jsonl").read_text())) == 2
        state["down"] = False                              # the judge is back: the same run folder scores
        p = cli()
        assert p.returncode == 0, p.stderr[-3000:]
        row = pd.read_csv(board).set_index("metric").loc["score"]
        assert (row.value, row.n, row.n_unscored) == (64.0, 2, 0)
        p = cli()                                          # finished: nothing new to append
        assert p.returncode == 0 and len(pd.read_csv(board)) == 3
    finally:
        judge.kill()


def test_self_consistency_second_pass_and_reliability(tmp_path, tiny_lm):
    # The scripted judge answers 80 greedily and, sampled (the second pass), 80 for the first two
    # samples and 40 for the third: agreement 2/3. Reliability reaches the leaderboard row.
    from harness.evaluate import judge_reliability

    asked = []

    def behave(n, req):
        asked.append((req["options"]["temperature"], req["options"]["seed"]))
        sampled = req["options"]["temperature"] > 0
        return 200, chat_body("40" if sampled and n == 5 else "80")
    server = FakeOllama(behave)
    try:
        judge = OllamaJudge(server.url, model="judge", cache_dir=str(tmp_path / "c"), progress=False,
                            self_consistency=True, consistency_temperature=0.7, concurrency=1)
        task = InstructTask(judge, limit=3, max_new_tokens=4)
        records = task.score(tiny_lm, task.samples())
    finally:
        server.kill()
    assert [r.scores["score"] for r in records] == [80, 80, 80]
    assert [r.extra["score_2"] for r in records] == [80, 80, 40] and server.requests == 6
    m = task.metrics(records)
    assert m["score"].value == 80                               # the second pass is never averaged in
    assert judge_reliability(task) == {"judge_unscored_rate": 0.0, "judge_swap_consistency": None,
                                       "judge_agreement": pytest.approx(2 / 3)}
    assert asked == [(0, 123)] * 3 + [(0.7, 124)] * 3            # the second pass: sampled, seed + 1
