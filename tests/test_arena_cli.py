"""End to end: `python -m harness task=pairwise` with tiny models against the reference outputs and
against an earlier instruct run's answers, judged by a scripted judge over real HTTP (FakeOllama)
whose verdict depends on which answer sits in position A, then `python -m harness.arena` over the run
folders. The commands run in this process (clitools.run_module: same entry point, status, output)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from clitools import ENV, run_module
from harness.judge import OllamaJudge
from tasks.pairwise import PairwiseTask
from test_cli import assert_one_error_line, lines
from test_judge import FakeOllama, chat_body
from test_pairwise_task import answers

LIMIT = 4
SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def questions():
    judge = OllamaJudge("http://127.0.0.1:9", model="judge", progress=False)
    return [s.data["instruction"] for s in PairwiseTask(judge, limit=LIMIT).samples()]


@pytest.fixture(scope="module")
def judge_server(questions):
    """Single-answer prompts (task=instruct) get 50. Pairwise: the first two questions are ties, the
    others go to the longer answer in whichever position it is (equal lengths tie): every pair of
    models both wins and ties somewhere, so the ratings are finite."""
    def behave(n, req):
        user = req["messages"][-1]["content"]
        if "[The Start of Assistant A's Answer]" not in user:
            return 200, chat_body("50")
        ans = answers(req)
        if any(q in user for q in questions[:2]) or len(ans["A"]) == len(ans["B"]):
            return 200, chat_body("Equally good. [[C]]")
        return 200, chat_body("A is better. [[A]]" if len(ans["A"]) > len(ans["B"]) else "B is better. [[B]]")
    server = FakeOllama(behave)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, judge_server):
    """Run folders: instruct (SmolLM2-135M-Instruct, which answers in words where the random tiny
    models print newlines), pairwise gpt-tiny vs reference and gpt-tiny vs the instruct run's answers;
    each command's CompletedProcess by name, the environment and the common arguments."""
    root = tmp_path_factory.mktemp("arena")
    env = dict(ENV, HARNESS_CACHE=str(root / "cache"))
    common = [f"judge.host={judge_server.url}", "judge.model=judge", "judge.retries=0", "judge.progress=false",
              f"task.limit={LIMIT}", "task.max_new_tokens=24", f"leaderboard={root / 'lb.csv'}"]
    done = {}
    for name, model, task in [("instruct", SMOL, ["task=instruct"]),
                              ("gpt_ref", "gpt-tiny", ["task=pairwise"]),
                              ("gpt_smol", "gpt-tiny", ["task=pairwise", f"task.opponent=run:{root / 'instruct'}"])]:
        done[name] = run_module("harness", *task, f"model={model}", *common, f"hydra.run.dir={root / name}", env=env)
    return root, done, env, common


def records(folder):
    return [json.loads(line) for line in lines((folder / "records.jsonl").read_text())]


def test_pairwise_runs_write_records_and_rows(runs):
    root, done, env, common = runs
    for name, p in done.items():
        assert p.returncode == 0, f"{name}: {p.stderr[-2000:]}"
    df = pd.read_csv(root / "lb.csv")
    pair = df[df.task == "pairwise"]
    assert {"win_rate", "win_rate_ci95_low", "win_rate_ci95_high", "win", "tie", "loss", "swap_consistency",
            "lc_win_rate"} <= set(pair.metric)
    assert set(pair.judge_model) == {"judge"} and len(set(pair.run_id)) == 2
    assert (pair.judge_swap_consistency == 1.0).all() and (pair.judge_unscored_rate == 0.0).all()
    assert pair.judge_agreement.isna().all()                  # not measured: judge.self_consistency off
    instruct = {r["sample_id"]: r["prediction"] for r in records(root / "instruct")}
    vs_run = records(root / "gpt_smol")
    assert [r["target"] for r in vs_run] == [instruct[r["sample_id"]] for r in vs_run]   # not regenerated
    assert all(r["target"] for r in vs_run[2:])
    for r in vs_run:
        assert r["extra"]["opponent"] == SMOL and r["extra"]["consistent"] is True
        assert r["extra"]["battle"]["model_a"] == "gpt-tiny" and r["extra"]["battle"]["model_b"] == SMOL
    for r in [*vs_run, *records(root / "gpt_ref")]:     # ties on the first two, then the longer answer
        ours, theirs = len(r["prediction"]), len(r["target"])
        want = "tie" if r["sample_id"] < vs_run[2]["sample_id"] or ours == theirs else \
            "win" if ours > theirs else "loss"
        assert r["extra"]["outcome"] == want
        assert r["extra"]["battle"]["winner"] == {"win": "a", "loss": "b"}.get(want, "tie")
    again = run_module("harness", "task=pairwise", "model=gpt-tiny", *common,
                       f"hydra.run.dir={root / 'gpt_ref'}", env=env)
    assert again.returncode == 0 and f"reusing {LIMIT} finished records of {LIMIT}" in again.stdout + again.stderr
    win_rate = pair[(pair.metric == "win_rate") & (pair.run_id == pair.run_id.iloc[-1])].iloc[0]
    assert (win_rate.n, win_rate.n_unscored) == (LIMIT, 0)


def test_arena_over_the_run_folders(runs):
    root, _, env, _ = runs
    out = root / "board"
    p = run_module("harness.arena", f"runs={root}/*", "anchor=reference", "rounds=50", "seed=1",
                   f"out_dir={out}", env=env)
    assert p.returncode == 0, p.stderr
    assert f"note: skipped {root / 'instruct'}: a instruct run, not pairwise" in p.stderr
    assert f"note: skipped {root / 'lb.csv'}: no run.json (not a run folder)" in p.stderr
    head, *body = p.stdout.splitlines()
    assert head.split() == ["model", "rating", "95%", "interval", "battles"]
    assert [line.split()[0] for line in body[:3]] == list(pd.read_csv(out / "arena.csv").model)
    table = pd.read_csv(out / "arena.csv").set_index("model")
    assert set(table.index) == {"gpt-tiny", SMOL, "reference"} and table.loc["reference", "rating"] == 1000.0
    assert table.battles.to_dict() == {"gpt-tiny": 2 * LIMIT, SMOL: LIMIT, "reference": LIMIT}
    assert (table.lower <= table.rating + 1e-9).all() and (table.rating <= table.upper + 1e-9).all()
    assert table.loc[SMOL, "rating"] > table.loc["gpt-tiny", "rating"]     # its words beat empty answers
    assert f"never compared: reference vs {SMOL}" in p.stdout
    assert "8 battles from 2 pairwise run folder(s)" in p.stdout
    md = (out / "arena.md").read_text()
    assert md.startswith("# Arena") and f"| {SMOL} |" in md and "never compared" in md
    assert (out / "arena.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = run_module("harness.arena", f"runs='{root / 'gpt_ref'},{root / 'instruct'}'", "rounds=20",
                     f"out_dir={root / 'board2'}", env=env)       # a comma list; no anchor: the mean is pinned
    assert one.returncode == 0, one.stderr
    assert sorted(pd.read_csv(root / "board2" / "arena.csv").model) == ["gpt-tiny", "reference"]


def test_arena_and_pairwise_refuse_bad_folders(runs, tmp_path):
    root, _, env, _ = runs
    p = run_module("harness.arena", f"runs={root / 'instruct'}", f"out_dir={tmp_path / 'o'}", env=env)
    assert_one_error_line(p)
    assert "no pairwise run folder among 1 folder(s)" in p.stderr and not (tmp_path / "o").exists()
    p = run_module("harness.arena", f"runs={tmp_path / 'nothing*'}", env=env)
    assert_one_error_line(p)
    assert "matches no folder" in p.stderr
    p = run_module("harness", "task=pairwise", "model=gpt-tiny", f"task.opponent=run:{tmp_path}",
                   "task.limit=2", f"leaderboard={tmp_path / 'lb.csv'}", f"hydra.run.dir={tmp_path / 'r'}", env=env)
    assert_one_error_line(p)
    assert f"task.opponent=run:{tmp_path}: {tmp_path} has no run.json" in p.stderr
