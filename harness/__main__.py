"""python -m harness task=<name> model=<name|path> [key=value ...]   (-m: a multirun grid)

One job: config -> task + model -> records (harness.evaluate) -> metrics -> leaderboard rows.
Bad input (unknown task/model, missing or corrupt files, bad config values, a leaderboard that
cannot be written) prints one `error:` line on stderr, exits with status 2 and appends nothing; the
checks that need no model run before the model is loaded. In a multirun the other jobs still run,
and the sweep exits 2 when any job failed, whichever launcher ran the jobs (harness/cli.py).
Under `torchrun --nproc_per_node=N -m harness ...` the ranks share each chunk of samples and rank 0
writes (harness/data_parallel.py).

Re-running a finished run folder scores nothing and appends nothing (append_again=true appends its
rows once more); samples left unscored for a passing reason (a judge timeout) are scored again.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from harness.cli import bool_option, exit_after, int_option, run_cli
from harness.config import rewrite_argv

log = logging.getLogger("harness")


def _join_ranks(cfg: DictConfig, run_dir: Path) -> tuple[int, Path]:
    """Under torchrun: join the process group, give each rank its own GPU, and use rank 0's run
    folder everywhere (each rank's Hydra stamped its own time). (0, run_dir) outside torchrun."""
    from harness import data_parallel as dp

    dp.adopt_submitit_tasks()   # a SLURM job's tasks join as torchrun's ranks would
    rank, world = dp.rank_world()
    if world <= 1:
        return 0, run_dir
    device = "cpu"
    if "device" in cfg.model:
        from models.registry import resolve_device
        device = cfg.model.device = dp.local_device(resolve_device(str(cfg.model.device)))
    dp.init(device)
    if rank:
        logging.getLogger("harness").setLevel(logging.WARNING)   # one progress report: rank 0's
    return rank, dp.broadcast(run_dir)


def run_job(cfg: DictConfig, run_dir: Path, task=None, lm=None) -> None:
    """One evaluation: `cfg.task` on `cfg.model` into `run_dir`. `task` and `lm`, when given, are
    those configs already built (harness.suite builds each task once and loads the model once)."""
    from datetime import datetime, timezone

    from hydra.utils import to_absolute_path

    from harness.config import instantiate
    from harness.contamination import DEFAULT_NGRAM, contamination_cell
    from harness.evaluate import evaluate, read_state, rows_for, run_dir_lock
    from harness.io import write_json
    from harness.report.store import append_rows, check_appendable
    from harness.trackers import check_names, log_eval, open_eval

    # Everything that needs no model first: a typo costs seconds, not a model load.
    seed = int_option(cfg.seed, "seed")
    chunk_size = int_option(cfg.chunk_size, "chunk_size", minimum=1)
    ngram = int_option(cfg.get("contamination_ngram", DEFAULT_NGRAM) or 0, "contamination_ngram", minimum=0)
    append_again = bool_option(cfg.get("append_again", False), "append_again")
    loggers = check_names(cfg.get("logger"))   # experiment trackers (harness/trackers): installed?
    board = Path(to_absolute_path(str(cfg.leaderboard)))
    check_appendable(board)
    rank, run_dir = _join_ranks(cfg, run_dir)
    with run_dir_lock(run_dir) if rank == 0 else contextlib.nullcontext():
        task = task if task is not None else instantiate(cfg.task, "task")
        judge = getattr(task, "judge", None)
        if judge is not None and not (run_dir / "records.jsonl").exists():
            # A fresh run of a judged task needs its judge for every sample (the reply cache is keyed
            # by the judge's digest too): an unreachable or misconfigured judge stops it here, before
            # the model loads. A run folder with records may be finished and need no judge at all.
            _ = judge.digest
        # A task that evaluates something other than a model (task=judge_probes: the judge) names it.
        if lm is None:
            lm = task.subject() if hasattr(task, "subject") else instantiate(cfg.model, "model")
        log.info("task %s (version %s), model %s, run dir %s", task.name, task.version, lm.name, run_dir)
        info = getattr(lm, "info", None) or {}
        run_key = {k: info.get(k, "") for k in ("model", "checkpoint_sha", "dtype", "device")}
        result = evaluate(task, lm, run_dir, seed, chunk_size, run_key, locked=True)
        if rank:                          # torchrun: rank 0 reports and appends (harness/data_parallel.py)
            return
        # Share of the task's samples found in the checkpoint's training data (harness/contamination.py).
        contamination = contamination_cell(info.get("provenance"), task, ngram)
        rows = rows_for(task, lm, result, seed, contamination)
        write_json(run_dir / "metrics.json", rows)
        state = read_state(run_dir) or {}
        appended = state.setdefault("appended", {})
        if result.n_reused == result.n_samples and str(board) in appended and not append_again:
            log.info("run %s: every sample was scored before and its rows are in %s already; nothing "
                     "appended (append_again=true appends them once more)", result.run_id, board)
            return
        # the trackers start first: one that cannot start is an error, and nothing is appended
        with contextlib.closing(open_eval(loggers, run_dir, rows)) as tracked:
            append_rows(board, rows)
            log_eval(tracked, rows, run_dir / "records.jsonl")
        appended[str(board)] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(run_dir / "run.json", state)
    for r in rows:
        err = "" if r["stderr"] is None else f" ± {r['stderr']:.4f}"
        log.info("%s %s = %.4f%s (n=%d, unscored %d)", r["task"], r["metric"], r["value"], err, r["n"],
                 r["n_unscored"])
    log.info("appended %d rows to %s (%.1f s scoring)", len(rows), board, result.wall_s)


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_cli(lambda: run_job(cfg, run_dir), error_log=run_dir / "error.log")


if __name__ == "__main__":
    exit_after(main, rewrite_argv)
