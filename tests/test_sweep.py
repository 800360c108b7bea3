"""Hydra sweeps: the joblib launcher (two tiny models x one small task, two jobs at once, every job
appends its rows; then the sweep's leaderboard renders and its two runs compare) and the submitit
launchers (submitit_local runs a grid; the SLURM config composes)."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from clitools import ENV, ROOT, run_module


def python_m(*args):
    """A real `python -m ...` process: what the sweeps launch (joblib, submitit) runs beside it. The
    commands that only read its results (leaderboard, compare) run in this process (run_module)."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def test_joblib_sweep_appends_every_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    board, sweep = tmp_path / "lb.csv", tmp_path / "sweep"
    p = python_m("harness", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "task=sms_spam",
                 "model=gpt-tiny,llama-tiny", "task.limit=6", f"leaderboard={board}", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Joblib.Parallel(n_jobs=2" in p.stdout + p.stderr       # really the joblib launcher
    df = pd.read_csv(board)
    assert sorted(df.model.unique()) == ["gpt-tiny", "llama-tiny"]
    assert df.run_id.nunique() == 2
    per_job = df.groupby("model").metric.apply(sorted)
    assert per_job["gpt-tiny"] == per_job["llama-tiny"] and "acc" in per_job["gpt-tiny"]
    assert df[df.metric == "acc"].n.tolist() == [6, 6]
    jobs = sorted(sweep.glob("*_sms_spam_*"))
    assert [j.name for j in jobs] == ["0_sms_spam_gpt-tiny", "1_sms_spam_llama-tiny"]
    for job in jobs:
        assert len((job / "records.jsonl").read_text().splitlines()) == 6

    p = run_module("harness.leaderboard", f"leaderboard={board}", f"out_dir={tmp_path / 'out'}", "metrics=[acc,f1]")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == "| model | sms_spam/acc | sms_spam/f1 |"
    rows = sorted(line.split(" | ")[0] for line in p.stdout.splitlines()[2:4])   # in order of appending
    assert rows == ["| gpt-tiny", "| llama-tiny"]

    p = run_module("harness.compare", f"a={jobs[0]}", f"b={jobs[1]}", "n_resamples=1000")
    assert p.returncode == 0, p.stderr
    assert "paired      6 samples" in p.stdout and "(exact McNemar, two-sided)" in p.stdout


def test_joblib_sweep_with_a_failing_job_exits_2(tmp_path):
    """A job that fails inside a joblib worker still makes the whole sweep exit non-zero."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    board = tmp_path / "lb.csv"
    p = python_m("harness", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "task=sms_spam",
                 "model=gpt-tiny", f"task.path={tmp_path / 'missing.tsv'},null", "task.limit=4",
                 f"leaderboard={board}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "error:" in p.stderr
    assert len(pd.read_csv(board).run_id.unique()) == 1      # the good job still appended its rows


def test_submitit_local_grid_lands_every_row_once(tmp_path):
    """hydra/launcher=submitit_local, the stand-in for SLURM (the same launcher code, jobs as local
    processes): a 2 x 2 grid, four jobs appending to one leaderboard under its lock."""
    board, sweep = tmp_path / "lb.csv", tmp_path / "sweep"
    p = python_m("harness", "-m", "hydra/launcher=submitit_local", "task=mmlu", "task.subjects=[abstract_algebra]",
                 "task.limit=4", "model=gpt-tiny,llama-tiny", "seed=1,2", f"leaderboard={board}",
                 f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Submitit 'local' sweep" in p.stdout + p.stderr          # really the submitit launcher
    df = pd.read_csv(board)
    assert df.run_id.nunique() == 4 and len(df) == 4 * df.groupby("run_id").size().iloc[0]
    assert sorted(df.groupby(["model", "seed"]).run_id.nunique().items()) == [
        (("gpt-tiny", 1), 1), (("gpt-tiny", 2), 1), (("llama-tiny", 1), 1), (("llama-tiny", 2), 1)]
    assert not df.duplicated(["run_id", "metric"]).any()


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                         "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=30"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 2, 30)


def test_submitit_job_of_two_tasks_is_one_data_parallel_run(tmp_path):
    """hydra.launcher.tasks_per_node=2 (one task per GPU in a SLURM job): the two tasks join as
    torchrun's ranks would (harness.data_parallel.adopt_submitit_tasks), so the job writes the one
    run's records and rows once, the same as a single process."""
    common = ["task=mmlu", "task.subjects=[abstract_algebra]", "task.limit=6", "model=gpt-tiny"]
    one_board, one_dir = tmp_path / "one.csv", tmp_path / "one"
    p = python_m("harness", *common, f"leaderboard={one_board}", f"hydra.run.dir={one_dir}")
    assert p.returncode == 0, p.stdout + p.stderr
    board, sweep = tmp_path / "lb.csv", tmp_path / "sweep"
    p = python_m("harness", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *common,
                 f"leaderboard={board}", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stdout + p.stderr
    df, one = pd.read_csv(board), pd.read_csv(one_board)
    assert df.run_id.nunique() == 1 and not df.duplicated(["run_id", "metric"]).any()
    assert sorted(df.metric) == sorted(one.metric)
    assert df.set_index("metric").value.to_dict() == one.set_index("metric").value.to_dict()
    records = [r for r in sweep.rglob("records.jsonl")]
    assert len(records) == 1
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k not in ("time", "wall_s")}  # noqa: E731
                          for line in path.read_text().splitlines()]
    assert strip(records[0]) == strip(one_dir / "records.jsonl")
