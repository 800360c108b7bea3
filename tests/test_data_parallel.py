"""Data-parallel evaluation: `torchrun --nproc_per_node=2 -m harness ...` on the CPU (gloo) writes the
records and metrics a one-process run writes, for choice scoring, perplexity, classification and a
judged task, and resumes a killed run the same way."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from fake_servers import FakeOllama
from test_judge import chat_body

from clitools import ENV, ROOT
from harness.data_parallel import shard

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "harness"]
ONE = [sys.executable, "-m", "harness"]


def test_shard_balances_cost_and_is_deterministic():
    costs = [50, 10, 40, 10, 30, 20]
    parts = shard(costs, 2)
    assert sorted(i for p in parts for i in p) == list(range(6))
    assert [sum(costs[i] for i in p) for p in parts] == [80, 80] and parts == shard(costs, 2)
    assert shard([5], 3) == [[0], [], []] and shard([], 2) == [[], []]


def run(launcher, tmp_path, name, *args):
    run_dir = tmp_path / name
    p = subprocess.run([*launcher, *args, f"hydra.run.dir={run_dir}", f"leaderboard={tmp_path / (name + '.csv')}"],
                       cwd=ROOT, env=dict(ENV, HARNESS_CACHE=str(tmp_path / "cache")), capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return run_dir, p


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]


def same_records(a, b):
    """Same samples in the same order with the same predictions and scores; log-likelihoods equal up
    to float noise (a sample batched with other neighbours pads differently)."""
    assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b]
    for x, y in zip(a, b):
        assert (x["prediction"], x["target"], x["prompt_hash"]) == (y["prediction"], y["target"], y["prompt_hash"])
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-5)


def metrics(tmp_path, name):
    df = pd.read_csv(tmp_path / f"{name}.csv")
    return dict(zip(df.metric, df.value))


@pytest.mark.parametrize("task", [
    ["task=mmlu", "task.subjects=[abstract_algebra,anatomy]", "task.limit=5", "chunk_size=4"],
    ["task=perplexity", "task.path=pretrain/the-verdict.txt", "task.max_length=64", "task.stride=32"],
    ["task=sms_spam", "task.limit=8", "chunk_size=3"],
])
def test_two_ranks_write_what_one_process_writes(tmp_path, task):
    one, _ = run(ONE, tmp_path, "one", "model=gpt-tiny", *task)
    two, p = run(TORCHRUN, tmp_path, "two", "model=gpt-tiny", *task)
    assert "data parallel: 2 ranks" in p.stdout + p.stderr
    same_records(records(one), records(two))
    assert metrics(tmp_path, "one") == pytest.approx(metrics(tmp_path, "two"), abs=1e-6)
    assert len(pd.read_csv(tmp_path / "two.csv")) == len(pd.read_csv(tmp_path / "one.csv"))   # rank 0 appends once


def test_judged_task_and_resume_after_a_kill(tmp_path):
    judge = FakeOllama(lambda n, req: (200, chat_body(str(40 + len(req["messages"][-1]["content"]) % 50))))
    args = ["task=instruct", "model=gpt-tiny", "task.limit=6", "task.max_new_tokens=4", "chunk_size=2",
            f"judge.host={judge.url}", "judge.model=judge"]
    try:
        one, _ = run(ONE, tmp_path, "one", *args)
        two, _ = run(TORCHRUN, tmp_path, "two", *args)
        same_records(records(one), records(two))
        assert metrics(tmp_path, "one") == pytest.approx(metrics(tmp_path, "two"))
        # A kill after the first chunk leaves two records: the rerun scores the other four only.
        lines = (two / "records.jsonl").read_text().splitlines()
        (two / "records.jsonl").write_text("\n".join(lines[:2]) + "\n")
        asked = judge.requests
        _, p = run(TORCHRUN, tmp_path, "two", *args)
        assert "reusing 2 finished records of 6" in p.stdout + p.stderr
        assert judge.requests == asked           # the four rescored ones come from the judge's cache
        same_records(records(one), records(two))
    finally:
        judge.kill()


def test_a_failing_rank_stops_every_rank_with_one_line(tmp_path):
    p = subprocess.run([*TORCHRUN, "task=instruct", "model=gpt-tiny", "task.limit=4", "judge.host=http://127.0.0.1:9",
                        "judge.retries=0", f"hydra.run.dir={tmp_path / 'run'}", f"leaderboard={tmp_path / 'lb.csv'}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode != 0 and "cannot reach the judge at judge.host=http://127.0.0.1:9" in p.stderr
    assert not (tmp_path / "lb.csv").exists()
