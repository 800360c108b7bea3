"""The baseline ladder end to end on tiny models: every rung trains, every model is scored (the
instruct task judged through a locally served judge), the leaderboard renders, and a second run
skips every finished stage."""
import json
import subprocess
import sys

import pandas as pd

from clitools import ENV, ROOT

# The ladder of conf/baselines.yaml, shrunk: gpt-tiny as base model and judge, a few steps per rung.
TINY_LADDER = """
defaults: [baselines, _self_]
base_model: gpt-tiny
rungs:
  pretrain: {train: pretrain_tiny, from: none, args: [train.max_steps=2, progress=false]}
  spam: {train: classify_spam, from: base,
         args: [train.limit_train=16, train.limit_val=8, train.max_steps=2, progress=false]}
  instruct: {train: instruct, from: base,
             args: [train.limit_train=8, train.limit_val=4, train.max_steps=2, train.limit_test=2,
                    train.max_new_tokens=4, train.eval_every=2, train.sample_every=0, progress=false]}
  dpo: {train: dpo, from: instruct,
        args: [train.limit_train=8, train.limit_val=4, train.max_steps=2, train.test_responses=false,
               train.eval_every=2, train.sample_every=0, progress=false]}
tasks:
  perplexity: [task.limit=1, task.max_length=64]
  mmlu: ["task.subjects=[abstract_algebra]", task.limit=1]
  sms_spam: [task.limit=6]
  instruct: [task.limit=2, task.max_new_tokens=8]
models: [pretrain, spam, dpo]
"""


def ladder(tmp_path, *args):
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    (conf / "tiny_ladder.yaml").write_text(TINY_LADDER)
    return subprocess.run([sys.executable, "-m", "harness.baselines", "-cd", str(conf), "-cn", "tiny_ladder",
                           f"out_dir={tmp_path / 'ladder'}", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)


def test_ladder_trains_scores_renders_and_resumes(tmp_path):
    p = ladder(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "ladder"
    for rung in ("pretrain", "spam", "instruct", "dpo"):
        assert json.loads((out / rung / "provenance.json").read_text())["complete"]
    board = pd.read_csv(out / "leaderboard.csv")
    # the classifier rung is scored on sms_spam only; the others on all three tasks
    assert sorted(set(zip(board.model, board.task))) == sorted(
        [(m, t) for m in ("pretrain", "dpo") for t in ("wikitext2", "mmlu", "sms_spam", "instruct")]
        + [("spam", "sms_spam")])
    judged = board[(board.task == "instruct") & (board.metric == "score")]
    assert len(judged) == 2 and (judged.n + judged.n_unscored == 2).all()   # every sample counted
    assert judged.judge_model.notna().all() and judged.judge_digest.notna().all()
    dpo_rows = board[board.model == "dpo"]
    assert dpo_rows.parent.str.contains("instruct").all()                   # lineage on the row
    assert (out / "leaderboard.md").read_text().count("\n| ") >= 3
    ledger = json.loads((out / "ladder.json").read_text())
    assert {"train/pretrain", "train/dpo", "eval/spam/sms_spam", "eval/dpo/instruct", "render"} <= set(ledger)
    assert all(v["cpu_s"] >= 0 and v["wall_s"] > 0 for v in ledger.values())

    rows_before = len(board)
    again = ladder(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(pd.read_csv(out / "leaderboard.csv")) == rows_before          # nothing re-scored
    assert "stage train/" not in again.stdout + again.stderr
    assert "skipped" in again.stdout + again.stderr
