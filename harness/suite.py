"""python -m harness.suite suite=openllm model=<name|path> [limit=N] [key=value ...]

A suite is a list of tasks, each with the few-shot count and the metric that counts
(conf/suite/<name>.yaml). Each member runs through `harness.__main__.run_job`, the code path of
`python -m harness task=<member>`, in its own run folder under the suite folder, and appends its
rows to the leaderboard as that would. Why not a Hydra multirun: a sweep cannot give each task its
own few-shot count and metric, cannot check every member's data before the first model load, and
has no step after the jobs to write the table with the average.

Before anything is scored, every member is checked: a task config this checkout lacks (gsm8k until
it lands) or data that is absent and cannot be fetched counts as missing, with the reason and the
fix in one line each; the present members then run. A member that fails while running is reported
the same way and the others still run. The table (printed, and suite.md + suite.csv in the suite
folder) gives each member's score, few-shot count and status, and the average over the members
that ran, marked partial when any member is missing. Extras are scored and shown, not averaged.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from harness.cli import UserError, bool_option, exit_after, int_option, message, run_cli
from harness.config import CONF_DIR, instantiate, rewrite_argv
from harness.report.render import markdown_row
from tasks.chat import ChatFormat

log = logging.getLogger("harness")
TABLE_FIELDS = ("task", "metric", "num_fewshot", "score", "n", "status", "counts", "reason")


@dataclass
class Member:
    task: str
    num_fewshot: int
    metric: str
    counts: bool                 # in the average (an extra is not)
    status: str = "pending"      # pending | ran | missing | failed
    reason: str = ""
    score: float | None = None
    n: int | None = None
    built: object = None         # the task, built once when its data was checked


def read_members(cfg: DictConfig) -> list[Member]:
    suite = cfg.suite
    listed = [(m, True) for m in suite.members]
    if bool_option(cfg.get("extras", True), "extras"):
        listed += [(m, False) for m in suite.get("extras") or []]
    members = []
    for m, counts in listed:
        if "task" not in m or "metric" not in m:
            raise UserError(f"suite {suite.get('name')}: every member needs task and metric, got {dict(m)}")
        members.append(Member(str(m.task), int_option(m.get("num_fewshot", 0), f"{m.task}.num_fewshot", minimum=0),
                              str(m.metric), counts))
    return members


def member_config(cfg: DictConfig, member: Member) -> DictConfig:
    """The eval config `python -m harness task=<member>` composes, with the suite's model, seed,
    leaderboard and chunk size, and the member's few-shot count (and the suite's limit)."""
    from hydra import compose

    job = compose(config_name="eval", overrides=[f"task={member.task}"])
    OmegaConf.set_struct(job, False)
    job.model = cfg.model
    job.task.num_fewshot = member.num_fewshot
    for key in ("apply_chat_template", "fewshot_as_multiturn"):   # every member's prompts alike
        job.task[key] = cfg.get(key)
    if cfg.get("limit") is not None:
        job.task.limit = cfg.limit
    for key in ("seed", "leaderboard", "chunk_size"):
        job[key] = cfg[key]
    return job


def missing_reason(cfg: DictConfig, member: Member) -> str | None:
    """Why the member cannot run (no task config, data absent and not fetchable), or None. The task
    is built as its run will build it: with its few-shot count, so the shots' split is checked too."""
    if not (CONF_DIR / "task" / f"{member.task}.yaml").exists():
        return f"no task config conf/task/{member.task}.yaml in this checkout (the task is not installed yet)"
    try:
        member.built = instantiate(member_config(cfg, member).task, "task")
    except UserError as e:
        return message(e)
    return None


def read_score(run_dir: Path, member: Member) -> None:
    rows = json.loads((run_dir / "metrics.json").read_text())
    row = next((r for r in rows if r["metric"] == member.metric), None)
    if row is None:
        member.status, member.reason = "failed", (f"its rows have no metric {member.metric!r} "
                                                  f"(they have {', '.join(r['metric'] for r in rows)})")
        return
    member.status, member.score, member.n = "ran", float(row["value"]), int(row["n"])


def run_suite(cfg: DictConfig, suite_dir: Path) -> int:
    from harness.__main__ import run_job

    # the suite's own prompt options, checked once here rather than failing every member alike
    ChatFormat.from_options(cfg.get("apply_chat_template", False), cfg.get("fewshot_as_multiturn"), scope="")
    members = read_members(cfg)
    for m in members:
        reason = missing_reason(cfg, m)
        if reason:
            m.status, m.reason = "missing", reason
            log.warning("suite member %s is missing: %s", m.task, reason)
    present = [m for m in members if m.status == "pending"]
    log.info("suite %s: running %d of %d members (%s)", cfg.suite.name, len(present), len(members),
             ", ".join(m.task for m in present) or "none")
    lm = instantiate(cfg.model, "model") if present else None   # loaded once for every member
    for m in present:
        run_dir = suite_dir / m.task
        try:
            run_job(member_config(cfg, m), run_dir, task=m.built, lm=lm)
            read_score(run_dir, m)
        except UserError as e:     # one member's bad luck (a corrupt file, say) leaves the rest to run
            m.status, m.reason = "failed", message(e)
            log.warning("suite member %s failed: %s", m.task, m.reason)
    table = write_table(suite_dir, str(cfg.suite.name), members, prompt_format(members))
    print(table, flush=True)
    if not any(m.status == "ran" for m in members):
        raise UserError(f"no member of suite {cfg.suite.name} could run; see the reasons above")
    return 0


def average(members: list[Member]) -> tuple[float | None, bool]:
    """(mean score over the counted members that ran, partial?)."""
    counted = [m for m in members if m.counts]
    ran = [m.score for m in counted if m.status == "ran"]
    return (sum(ran) / len(ran) if ran else None), len(ran) < len(counted)


def prompt_format(members: list[Member]) -> str:
    """How the members' prompts were shown (plain text or the model's chat template): part of what
    makes two suite tables comparable, so the table's title says it."""
    formats = {getattr(m.built, "chat", None) for m in members if m.status == "ran"} - {None}
    if not formats or not any(f.apply for f in formats):
        return "plain-text prompts"
    return "chat template, few-shot as multi-turn" if all(f.multiturn for f in formats) else "chat template"


def write_table(suite_dir: Path, name: str, members: list[Member], prompts: str = "plain-text prompts") -> str:
    """suite.csv (one row per member, then the average) and suite.md; returns the Markdown."""
    mean, partial = average(members)
    label = "average (partial: " + ", ".join(m.task for m in members if m.counts and m.status != "ran") + " missing)" \
        if partial else "average"
    suite_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"task": m.task, "metric": m.metric, "num_fewshot": m.num_fewshot,
             "score": "" if m.score is None else f"{m.score:.4f}", "n": m.n or "", "status": m.status,
             "counts": "yes" if m.counts else "extra", "reason": m.reason} for m in members]
    rows.append({"task": label, "metric": "", "num_fewshot": "", "score": "" if mean is None else f"{mean:.4f}",
                 "n": "", "status": "partial" if partial else "complete", "counts": "", "reason": ""})
    with open(suite_dir / "suite.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"## Suite {name} ({prompts})", "", "| " + " | ".join(TABLE_FIELDS) + " |", "|" + "---|" * len(TABLE_FIELDS)]
    lines += [markdown_row([str(r[k]) for k in TABLE_FIELDS]) for r in rows]
    text = "\n".join(lines) + "\n"
    (suite_dir / "suite.md").write_text(text)
    return text


@hydra.main(version_base="1.3", config_path="../conf", config_name="suite_eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    suite_dir = Path(HydraConfig.get().runtime.output_dir)
    run_cli(lambda: run_suite(cfg, suite_dir), error_log=suite_dir / "error.log")


if __name__ == "__main__":
    exit_after(main, rewrite_argv)
