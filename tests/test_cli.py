"""End to end through `python -m harness` on the tiny random-init models: in this process
(clitools.run_module: the same entry point, exit status and output, without a fresh interpreter
importing torch for each command), and in a real subprocess where the test is about the process:
its exit status and its whole stderr."""
import subprocess
import sys

import pandas as pd

from clitools import ENV, ROOT, SHARED, run_module

MMLU = ["task=mmlu", "model=gpt-tiny", "task.subjects=[abstract_algebra,anatomy]", "task.limit=3"]


def harness(*args, cwd=ROOT):
    return run_module("harness", *args, cwd=cwd)


def harness_process(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def assert_one_error_line(p, *needles):
    assert p.returncode == 2, p.stdout + p.stderr
    errs = [line for line in lines(p.stderr) if line.startswith("error: ")]
    assert len(errs) == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in errs[0]
    return errs[0]


def test_mmlu_rows_and_resume(tmp_path):
    board, run = tmp_path / "lb.csv", tmp_path / "run"
    p = harness(*MMLU, f"leaderboard={board}", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr
    df = pd.read_csv(board)
    metrics = dict(zip(df.metric, df.n))
    assert metrics["acc"] == 6 and "acc_macro" in metrics
    assert set(df.task) == {"mmlu"} and set(df.model) == {"gpt-tiny"} and df.run_id.nunique() == 1
    records = (run / "records.jsonl").read_bytes()
    assert len(lines(records.decode())) == 6
    p2 = harness(*MMLU, f"leaderboard={board}", f"hydra.run.dir={run}")
    assert p2.returncode == 0, p2.stderr
    assert "reusing 6 finished records of 6" in p2.stdout + p2.stderr
    assert (run / "records.jsonl").read_bytes() == records
    # a finished run folder appends nothing new ...
    assert pd.read_csv(board).equals(df)
    assert "nothing appended" in p2.stdout + p2.stderr
    # ... unless asked to: the same values once more, same run id
    p3 = harness(*MMLU, f"leaderboard={board}", f"hydra.run.dir={run}", "append_again=true")
    assert p3.returncode == 0, p3.stderr
    df2 = pd.read_csv(board)
    assert len(df2) == 2 * len(df) and df2.run_id.nunique() == 1
    assert (df2.value.to_numpy()[len(df):] == df.value.to_numpy()).all()


def test_relative_leaderboard_resolves_against_cwd(tmp_path):
    p = harness(*MMLU, "task.limit=1", "leaderboard=rel/lb.csv", f"hydra.run.dir={tmp_path / 'run'}",
                cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "rel" / "lb.csv").exists()


def test_perplexity_on_a_file(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\nIt was a bright cold day in April.\n")
    board = tmp_path / "lb.csv"
    p = harness("task=perplexity", f"task.path={text}", "model=gpt-tiny", f"leaderboard={board}",
                f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr
    df = pd.read_csv(board)
    row = df[df.metric == "word_perplexity"]
    assert len(row) == 1 and row.value.iloc[0] > 1


def test_unknown_task_and_model(tmp_path):
    board = tmp_path / "lb.csv"
    p = harness_process("task=nope", f"leaderboard={board}")
    assert lines(p.stderr) == [assert_one_error_line(p, "unknown task 'nope'", "mmlu", "perplexity")]
    p = harness_process("model=nope", f"leaderboard={board}")
    assert lines(p.stderr) == [assert_one_error_line(p, "unknown model 'nope'", "gpt-tiny", "gpt2-124m")]
    p = harness_process("-m", "task=mmlu,nope2", f"leaderboard={board}")
    assert_one_error_line(p, "unknown task 'nope2'")
    assert not board.exists()


def test_corrupt_model_files(tmp_path):
    board = tmp_path / "lb.csv"
    gguf = tmp_path / "bad.gguf"
    real = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(real.read_bytes()[:4096] if real.exists() else b"GGUF\x03\x00\x00\x00junk")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    (folder / "config.json").write_text("{}")
    for i, model in enumerate([gguf, folder, tmp_path / "absent"]):
        p = harness(*MMLU, f"model={model}", f"leaderboard={board}", f"hydra.run.dir={tmp_path / str(i)}")
        assert lines(p.stderr)[-1] == assert_one_error_line(p), p.stderr
    assert not board.exists()


def test_multirun_over_two_tasks(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("Some words to score.\n")
    extra = tmp_path / "conf" / "task"
    extra.mkdir(parents=True)
    (extra / "mmlu_small.yaml").write_text(
        "defaults:\n  - mmlu\n  - _self_\nsubjects: [anatomy]\nlimit: 2\n")
    (extra / "ppl_small.yaml").write_text(f"defaults:\n  - perplexity\n  - _self_\npath: {text}\n")
    board = tmp_path / "lb.csv"
    p = harness("-m", "--config-dir", str(tmp_path / "conf"), "task=mmlu_small,ppl_small",
                "model=gpt-tiny", f"leaderboard={board}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert p.returncode == 0, p.stdout + p.stderr
    df = pd.read_csv(board)
    assert {"acc", "word_perplexity"} <= set(df.metric)
    assert df.run_id.nunique() == 2
    assert len(list((tmp_path / "sweep").glob("*/records.jsonl"))) == 2
