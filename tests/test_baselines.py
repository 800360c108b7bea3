"""The baseline ladder end to end on tiny models: every rung trains, every model is scored (the
instruct task judged by a scripted Ollama-API judge over HTTP: a tiny model as judge answers no
score, and a run with no scored sample appends nothing), the leaderboard renders, and a second run
skips every finished stage. The locally served judge (harness.serve) is checked on its own, and a
SIGTERM to the ladder stops its running stage with a checkpoint instead of orphaning it."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
from ollama import Client

from clitools import ENV, ROOT, run_module
from test_judge import FakeOllama, chat_body

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


def ladder_argv(tmp_path, *args) -> list[str]:
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    (conf / "tiny_ladder.yaml").write_text(TINY_LADDER)
    return [sys.executable, "-m", "harness.baselines", "-cd", str(conf), "-cn", "tiny_ladder",
            f"out_dir={tmp_path / 'ladder'}", *args]


def ladder(tmp_path, *args):
    """The ladder itself in this process (clitools.run_module; its stages are still subprocesses):
    a fresh interpreter for it would add only an import of torch and hydra."""
    _python, _m, module, *rest = ladder_argv(tmp_path, *args)
    return run_module(module, *rest, env=ENV)


def test_ladder_trains_scores_renders_and_resumes(tmp_path):
    judge = FakeOllama(lambda n, req: (200, chat_body(str(40 + n % 50))))
    p = ladder(tmp_path, f"judge.host={judge.url}", "judge.model=judge")
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
    again = ladder(tmp_path, f"judge.host={judge.url}", "judge.model=judge")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(pd.read_csv(out / "leaderboard.csv")) == rows_before          # nothing re-scored
    assert "stage train/" not in again.stdout + again.stderr
    assert "skipped" in again.stdout + again.stderr


def test_local_judge_serves_the_base_model_over_the_ollama_api():
    from harness.baselines import local_judge

    with local_judge("gpt-tiny") as (url, name):
        assert url.startswith("http://127.0.0.1:")
        client = Client(host=url, timeout=60)
        assert f"{name}:latest" in [m.model for m in client.list().models]
        reply = client.chat(model=name, messages=[{"role": "user", "content": "Score: "}],
                            options={"num_predict": 3, "temperature": 0})
        assert reply.message.role == "assistant"


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_sigterm_stops_the_running_stage_with_a_checkpoint(tmp_path):
    out = tmp_path / "ladder"
    argv = ladder_argv(tmp_path, "rungs.pretrain.args=['train.max_steps=100000','progress=false']", "models=[pretrain]")
    ladder_proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, stdin=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "pretrain" / "run.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (out / "pretrain" / "run.json").exists(), "the pretrain stage did not start"
    time.sleep(1.0)
    ladder_proc.send_signal(signal.SIGTERM)
    stdout, stderr = ladder_proc.communicate(timeout=120)
    assert ladder_proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "SIGTERM during stage train/pretrain" in errors[0], stderr[-3000:]
    assert (out / "pretrain" / "last" / "trainer_state.pt").exists()      # the stage wrote its checkpoint
    assert _processes_mentioning(str(out / "pretrain")) == []                # and is gone, not orphaned
