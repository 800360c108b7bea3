"""python -m harness.baselines [out_dir=...] [key=value ...]: the baseline ladder.

Trains each rung of conf/baselines.yaml (pretrain from scratch, spam classifier, instruction
finetune, DPO), scores every rung plus the untouched base model on every task, then renders the
leaderboard. Each stage is an ordinary `python -m harness.train` / `python -m harness` run in a
subprocess, so the ladder adds no training or scoring code of its own, and:

- a rung whose folder holds a complete checkpoint is skipped; an interrupted one resumes
  (`resume=true`) from its last checkpoint;
- an eval whose run folder has metrics.json is skipped; an interrupted one resumes from its
  records.jsonl (same hydra.run.dir);
- wall and CPU seconds of every stage go to <out_dir>/ladder.json.

The judge for task=instruct is a real Ollama server (judge.host) or, by default, the base model
served by `harness.serve` on a free 127.0.0.1 port for the duration of the ladder.
"""
from __future__ import annotations

import json
import logging
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from harness.cli import Interrupted, UserError, exit_after, run_cli
from harness.io import read_json, write_atomic

log = logging.getLogger("harness.baselines")


class StageError(UserError):
    """A stage's subprocess failed; its own `error:` line is already on stderr."""


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _call_forwarding_signals(name: str, argv: list[str]) -> int:
    """Run one stage's subprocess; SIGTERM/SIGINT to the ladder are passed on to it and the ladder
    waits for it (a trainer writes its checkpoint first), so no stage is left running orphaned.
    The child has its own session: a terminal's Ctrl-C reaches it once, through us, not twice (a
    second SIGINT makes a trainer exit without its checkpoint)."""
    proc = subprocess.Popen([sys.executable, *argv], start_new_session=True)
    received: list[int] = []

    def forward(signum, _frame):
        if not received:
            log.warning("%s: passing it to stage %s and waiting for it to stop",
                        signal.Signals(signum).name, name)
        received.append(signum)
        with suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Interrupted(received[0], f"{signal.Signals(received[0]).name} during stage {name} (it exited with "
                                       f"status {code}, keeping its last checkpoint or records); re-run "
                                       "python -m harness.baselines to resume")
    return code


def _run_stage(name: str, argv: list[str], ledger: dict, ledger_path: Path) -> None:
    log.info("stage %s: %s", name, " ".join(argv))
    wall, cpu = time.perf_counter(), _children_cpu_s()
    code = _call_forwarding_signals(name, argv)
    if code != 0:
        raise StageError(f"stage {name} failed with exit status {code}; fix the cause and re-run "
                         "python -m harness.baselines (finished stages are kept)")
    ledger[name] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(_children_cpu_s() - cpu, 1),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_atomic(ledger_path, json.dumps(ledger, indent=1, sort_keys=True).encode())


def _complete(folder: Path) -> bool:
    prov = folder / "provenance.json"
    return prov.exists() and bool(read_json(prov, f"move {folder} aside to train that rung again").get("complete"))


def model_path(name: str, cfg: DictConfig, out: Path) -> str:
    return str(cfg.base_model) if name == "base" else str(out / name)


def train_argv(rung: str, spec, cfg: DictConfig, out: Path) -> list[str] | None:
    """The train command for a rung, or None when its checkpoint is complete."""
    folder = out / rung
    if _complete(folder):
        return None
    argv = ["-m", "harness.train", f"train={spec.train}", f"output_dir={folder}", f"seed={cfg.seed}"]
    source = str(spec.get("from", "base"))
    if source != "none":
        if source != "base" and not _complete(out / source):
            raise StageError(f"rung {rung} starts from rung {source}, which has no complete checkpoint")
        argv.append(f"model={model_path(source, cfg, out)}")
    if (folder / "run.json").exists():
        argv.append("resume=true")
    return argv + [str(a) for a in spec.get("args") or []]


def eval_argv(model: str, task: str, args, cfg: DictConfig, out: Path, judge: tuple[str, str] | None) -> list[str] | None:
    run_dir = out / "eval" / model / task
    if (run_dir / "metrics.json").exists():
        return None
    argv = ["-m", "harness", f"task={task}", f"model={model_path(model, cfg, out)}",
            f"model.dtype={cfg.eval_dtype}", f"leaderboard={Path(str(cfg.leaderboard)).resolve()}",
            f"hydra.run.dir={run_dir}", f"seed={cfg.seed}"]
    if task == "instruct" and judge:
        argv += [f"judge.host={judge[0]}", f"judge.model={judge[1]}"]
    return argv + [str(a) for a in args or []]


@contextmanager
def local_judge(model: str):
    """Serve `model` with harness.serve on a free loopback port; yields (url, served name)."""
    from harness.serve.process import ServerStartError, spawn_server
    try:
        server = spawn_server([f"model={model}", "host=127.0.0.1", "port=0"])
    except ServerStartError as e:
        raise StageError(f"the local judge server for {model}: {e}") from None
    log.info("judge: %s served at %s", server.model, server.url)
    try:
        yield server.url, server.model
    finally:
        server.stop()


def run_ladder(cfg: DictConfig) -> None:
    out = Path(str(cfg.out_dir)).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    ledger_path = out / "ladder.json"
    ledger = read_json(ledger_path, "delete it (it only records stage timings)") if ledger_path.exists() else {}
    unknown = [m for m in cfg.models if m != "base" and m not in cfg.rungs]
    if unknown:
        raise UserError(f"models lists {', '.join(unknown)}, which are not rungs ({', '.join(cfg.rungs)}) or base")
    for rung, spec in cfg.rungs.items():
        argv = train_argv(rung, spec, cfg, out)
        if argv is None:
            log.info("rung %s: complete checkpoint in %s, skipped", rung, out / rung)
        else:
            _run_stage(f"train/{rung}", argv, ledger, ledger_path)
    jobs = [(m, t, a) for m in cfg.models for t, a in cfg.tasks.items()
            if t == "sms_spam" or m not in cfg.classifier_rungs]
    todo = [(m, t, eval_argv(m, t, a, cfg, out, None)) for m, t, a in jobs]
    needs_judge = any(argv and t == "instruct" for _, t, argv in todo)
    with (local_judge(str(cfg.judge.model)) if needs_judge and not cfg.judge.host else _fixed(cfg)) as judge:
        for model, task, args in jobs:
            argv = eval_argv(model, task, args, cfg, out, judge)
            if argv is None:
                log.info("eval %s/%s: done before, skipped", model, task)
                continue
            _run_stage(f"eval/{model}/{task}", argv, ledger, ledger_path)
    if cfg.render:
        metrics = [f"metrics=[{','.join(cfg.render_metrics)}]"] if cfg.get("render_metrics") else []
        _run_stage("render", ["-m", "harness.leaderboard", f"leaderboard={Path(str(cfg.leaderboard)).resolve()}",
                              f"out_dir={out}", *metrics], ledger, ledger_path)
    total = sum(v["cpu_s"] for k, v in ledger.items() if k != "render")
    log.info("ladder done: %d stages, %.1f CPU-min in total; table in %s", len(ledger), total / 60, out / "leaderboard.md")


@contextmanager
def _fixed(cfg: DictConfig):
    yield (str(cfg.judge.host), str(cfg.judge.model)) if cfg.judge.host else None


@hydra.main(version_base="1.3", config_path="../conf", config_name="baselines")
def main(cfg: DictConfig) -> None:
    def job() -> None:
        OmegaConf.resolve(cfg)
        run_ladder(cfg)

    run_cli(job, interrupted="interrupted; re-run python -m harness.baselines to resume")


if __name__ == "__main__":
    exit_after(main)
