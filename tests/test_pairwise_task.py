"""task=pairwise: the verdict, parse and swap logic through the task, with scripted judges over real
HTTP on 127.0.0.1 (FakeOllama) and a real tiny model answering; opponents from the reference outputs
and from an earlier run folder, and the one-line refusals of an opponent that does not fit."""
from __future__ import annotations

import json
import math
import re

import pytest

from harness.judge import OllamaJudge
from tasks.base import Record, TaskError
from tasks.pairwise import PairwiseTask
from tasks.pairwise_data import data_hash
from test_judge import FakeOllama, chat_body

NOWHERE = "http://127.0.0.1:9"      # never contacted: the judge connects on first use
ANSWER = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)
FENCE = re.compile(r"^<<<DATA-[0-9a-f]+>>>\n(.*)\n<<<END-DATA-[0-9a-f]+>>>$", re.S)


def answers(req: dict) -> dict[str, str]:
    """{"A": answer, "B": answer} as the judge saw them, fences taken off."""
    user = req["messages"][-1]["content"]
    return {k: (m.group(1) if (m := FENCE.match(v)) else v) for k, v in ANSWER.findall(user)}


def verdict_for(pick):
    """A judge that explains, then gives `pick(answers)` ("A" / "B" / "C") as FastChat's [[X]]."""
    return lambda n, req: (200, chat_body(f"Both answers considered. [[{pick(answers(req))}]]"))


@pytest.fixture(scope="module")
def tiny_lm():
    from models.registry import load_lm
    return load_lm("gpt-tiny", progress=False)


@pytest.fixture
def judged(tmp_path):
    """judged(behave, **task options) -> (task, records, server): the task scored once with gpt-tiny."""
    servers = []

    def run(behave, lm, retries=1, **kw):
        servers.append(FakeOllama(behave))
        judge = OllamaJudge(servers[-1].url, model="judge", cache_dir=str(tmp_path / "cache"), progress=False,
                            retries=retries, backoff_s=0.01, **kw.pop("judge", {}))
        task = PairwiseTask(judge, **{"limit": 4, "max_new_tokens": 4, **kw})
        return task, task.score(lm, task.samples()), servers[-1]
    yield run
    for s in servers:
        s.kill()


def offline(tmp_path, **kw) -> PairwiseTask:
    judge = OllamaJudge(NOWHERE, model="judge", cache_dir=str(tmp_path / "c"), progress=False)
    return PairwiseTask(judge, **kw)


def test_judge_preferring_the_reference_in_either_position(judged, tiny_lm, tmp_path):
    refs = {s.data["output"] for s in offline(tmp_path, limit=4).samples()}
    task, records, server = judged(verdict_for(lambda ans: "A" if ans["A"] in refs else "B"), tiny_lm)
    assert server.chat_requests == 8                       # every sample in both orders
    for r, s in zip(records, task.samples()):
        assert r.target == s.data["output"] and isinstance(r.prediction, str)
        assert r.extra["verdicts"] == ["B", "A"] and r.extra["consistent"] is True
        assert r.scores == {"win": 0.0} and r.extra["outcome"] == "loss" and r.extra["retry"] is False
        assert r.extra["battle"] == {"model_a": "gpt-tiny", "model_b": "reference", "winner": "b"}
        assert r.extra["lengths"] == {"ours": len(r.prediction), "opponent": len(r.target), "unit": "chars"}
        assert r.extra["data_hash"] == data_hash(s.data) and r.extra["judge_digest"] == "d1g35tjudge:latest"
    m = task.metrics(records)
    assert (m["win_rate"].value, m["win_rate"].n, m["win_rate"].n_unscored) == (0.0, 4, 0)
    assert (m["loss"].value, m["win"].value, m["tie"].value, m["swap_consistency"].value) == (1.0, 0.0, 0.0, 1.0)
    assert m["lc_win_rate"].value == 0.0                    # all one outcome: LC equals raw
    assert task.judge_reliability == {"judge_unscored_rate": 0.0, "judge_swap_consistency": 1.0,
                                      "judge_agreement": None}
    assert task.judge_keys.model == "judge" and task.judge_keys.digest == "d1g35tjudge:latest"


def test_position_biased_judge_makes_only_ties(judged, tiny_lm):
    task, records, _ = judged(verdict_for(lambda ans: "A"), tiny_lm)
    assert all(r.extra["verdicts"] == ["A", "A"] and r.extra["consistent"] is False for r in records)
    assert all(r.scores == {"win": 0.5} and r.extra["battle"]["winner"] == "tie" for r in records)
    m = task.metrics(records)
    assert (m["win_rate"].value, m["tie"].value, m["swap_consistency"].value) == (0.5, 1.0, 0.0)
    assert m["win_rate_ci95_low"].value == m["win_rate_ci95_high"].value == 0.5
    assert task.judge_reliability["judge_swap_consistency"] == 0.0


def test_mixed_verdicts_unparseable_and_self_consistency(judged, tiny_lm, tmp_path):
    questions = [s.data["instruction"] for s in offline(tmp_path, limit=4).samples()]

    def behave(n, req):
        user = req["messages"][-1]["content"]
        i = next(k for k, q in enumerate(questions) if q in user)
        ours_first = n % 2 == 0                            # requests come in order: first, swapped
        if i == 3:
            return 200, chat_body("I cannot decide." if ours_first else "[[A]]")   # one order unreadable
        pick = {0: "ours", 1: "theirs", 2: "tie"}[i]
        if pick == "tie":
            return 200, chat_body("[[C]]")
        return 200, chat_body("[[A]]" if (pick == "ours") == ours_first else "[[B]]")

    task, records, _ = judged(behave, tiny_lm, judge={"self_consistency": True, "concurrency": 1})
    assert [r.extra["outcome"] for r in records] == ["win", "loss", "tie", None]
    assert [r.scores["win"] for r in records] == [1.0, 0.0, 0.5, None]
    last = records[3]
    assert last.extra["verdicts"] == [None, "A"] and last.extra["battle"] is None and last.extra["retry"] is False
    assert "ours as A: no [[A]]/[[B]]/[[C]] verdict" in last.extra["error"]
    m = task.metrics(records)
    assert (m["win_rate"].value, m["win_rate"].n, m["win_rate"].n_unscored) == (0.5, 3, 1)
    assert m["swap_consistency"].value == 1.0 and m["judge_agreement"].value == 1.0
    assert task.judge_reliability["judge_unscored_rate"] == 0.25 and task.unscored_reason(records) is None


def test_judge_outage_is_retry_and_reasoned(judged, tiny_lm):
    task, records, _ = judged(lambda n, req: (503, b'{"error": "busy"}'), tiny_lm, retries=0, limit=2)
    assert all(r.scores == {"win": None} and r.extra["retry"] is True for r in records)
    reason = task.unscored_reason(records)
    assert reason.startswith("no sample was scored: the judge at judge.host=") and "rerun the same" in reason
    assert "\n" not in reason and math.isnan(task.metrics(records)["win_rate"].value)


def test_opponent_from_a_run_folder(tmp_path):
    base = offline(tmp_path, limit=3)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"key": {"task": "instruct", "model": "llama-tiny"}}))
    recs = [Record(s.id, "h", f"answer {i}", s.data["output"], {"score": 50.0}) for i, s in enumerate(base.samples())]
    (run / "records.jsonl").write_text("".join(r.to_json() + "\n" for r in recs))
    task = offline(tmp_path, limit=3, opponent=f"run:{run}")
    assert task.opponent.name == "llama-tiny"
    assert list(task.opponent.answers.values()) == ["answer 0", "answer 1", "answer 2"]
    assert task.version != base.version
    with pytest.raises(TaskError, match=r"task.opponent=run:.*1 of 4 samples have no answer in .*records.jsonl"):
        offline(tmp_path, limit=4, opponent=f"run:{run}")
    recs[1].target = "another reference"
    (run / "records.jsonl").write_text("".join(r.to_json() + "\n" for r in recs))
    with pytest.raises(TaskError, match=r"1 of 3 samples have other data in .*same data file"):
        offline(tmp_path, limit=3, opponent=f"run:{run}")
    (run / "run.json").write_text(json.dumps({"key": {"task": "mmlu", "model": "m"}}))
    with pytest.raises(TaskError, match="a mmlu run, not one of instruct, pairwise"):
        offline(tmp_path, limit=3, opponent=f"run:{run}")
    with pytest.raises(TaskError, match="has no run.json"):
        offline(tmp_path, opponent=f"run:{tmp_path}")


def test_mt_bench_data_and_bad_options(tmp_path):
    run = tmp_path / "mt"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"key": {"task": "mt_bench", "model": "other"}}))
    (run / "records.jsonl").write_text("".join(Record(f"q{q:03d}", "h", [f"t1 {q}", f"t2 {q}"], None, {}).to_json()
                                               + "\n" for q in (81, 82)))
    task = offline(tmp_path, data="mt_bench", limit=2, opponent=f"run:{run}")
    assert [s.id for s in task.samples()] == ["q081", "q082"] and task.opponent.answers["q082"] == "t1 82"
    with pytest.raises(TaskError, match="task.opponent=reference needs task.data=instruct"):
        offline(tmp_path, data="mt_bench")
    with pytest.raises(TaskError, match="task.data='mmlu'"):
        offline(tmp_path, data="mmlu")
    with pytest.raises(TaskError, match="task.judge_prompt=single-v1 is not a single-turn pairwise prompt"):
        offline(tmp_path, judge_prompt="single-v1")
    with pytest.raises(TaskError, match="expected reference or run:"):
        offline(tmp_path, opponent="gpt2")


def test_version_tracks_what_changes_verdicts(tmp_path):
    base = offline(tmp_path).version
    assert offline(tmp_path, limit=3).version == base                  # a larger limit resumes the run
    judge = OllamaJudge(NOWHERE, model="other", harden=False, progress=False)
    assert PairwiseTask(judge).version != base
    for changed in (offline(tmp_path, max_new_tokens=64), offline(tmp_path, judge_max_tokens=256),
                    offline(tmp_path, prompt_style="alpaca"), offline(tmp_path, split="val")):
        assert changed.version != base
    with pytest.raises(Exception, match="task.judge_max_tokens=0"):
        offline(tmp_path, judge_max_tokens=0)
