"""What the results viewer shows, read only from what the engine wrote: run folders and the leaderboard.

Each function returns plain JSON-ready dicts that harness/report/site.py writes as data scripts.
Nothing is recomputed differently from the other reports: leaderboard cells are the Markdown
renderer's (render.build_table / format_cell), comparisons are `harness.compare`'s (compare /
format_report), lineage is harness.provenance's. Records of one sample may repeat (a retried sample
scored again); the newest counts, as in harness.evaluate.finished. Older records lack some extra
keys (prompt, choices, judge_prompt): what is missing is left out, never an error.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from harness.provenance import lineage, short_id, step_files
from harness.records import load_records
from harness.report import render
from harness.report.compare import AUTO_ORDER, Run, _value, compare, format_report
from harness.report.stats import normal_ci

EVAL_FILES, TRAIN_FILES = ("run.json", "records.jsonl"), ("provenance.json", "metrics.jsonl")
# extra keys a sample row shows in its own cells; the rest go into its "more" details as they are
SHOWN_EXTRA = {"prompt", "prompts", "choices", "loglikelihoods", "logprobs", "judge_prompt", "judge_reply",
               "judge_reply_2", "judge_replies", "subject"}


def is_eval_run(folder: Path) -> bool:
    return all((folder / f).is_file() for f in EVAL_FILES)


def is_training_run(folder: Path) -> bool:
    return all((folder / f).is_file() for f in TRAIN_FILES)


def page_name(run_id: str) -> str:
    """A run id as a file name (ids are '<stamp>-<hex>' already; anything odd becomes '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id) or "_"


def read_json_or_empty(path: Path):
    """A JSON file the engine wrote, or {} when it is absent or cut short: the page shows less."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --- the leaderboard -----------------------------------------------------------------------------

def leaderboard(path: Path, site_runs: set[str]) -> dict:
    """The Markdown table's rows, cells and notes, with the raw value of each cell to sort by."""
    table = render.build_table(render.prepare(render.load(path)))
    info = [k for k in render.INFO if any(table.info[m][k] for m in table.models)]
    rows = []
    for model in table.models:
        cells = []
        for column in table.columns:
            cell = table.cells.get((model, column.label))
            cells.append(None if cell is None else {
                "text": render.format_cell(cell, column, table.interval), "value": cell.value,
                "run": cell.run_id, "page": page_name(cell.run_id) if cell.run_id in site_runs else None})
        rows.append({"model": model, "info": [table.info[model][k] or "—" for k in info], "cells": cells})
    markdown = render.to_markdown(table)
    notes = markdown.split("\n\n", 1)[1] if "\n\n" in markdown else ""   # what follows the table
    return {"path": str(path), "info": info, "columns": [c.label for c in table.columns], "rows": rows, "notes": notes}


# --- eval runs -----------------------------------------------------------------------------------

def newest_records(folder: Path) -> list:
    """One record per sample, the newest, in the order samples first appeared."""
    by_id = {}
    for r in load_records(folder / "records.jsonl"):
        by_id[r.sample_id] = r
    return list(by_id.values())


def primary_metric(records: list) -> tuple[str | None, bool]:
    """The per-sample score the run is judged by (compare's auto order) and whether it is 0/1."""
    keys = {k for r in records for k in (r.scores or {})}
    metric = next((m for m in AUTO_ORDER if m in keys), None)
    if metric is None:
        return None, False
    values = {(r.scores or {}).get(metric) for r in records} - {None}
    return metric, bool(values) and values <= {0.0, 1.0}


def _choice_index(value, choices: list[str]) -> int | None:
    """Which choice a prediction / target label names: the choice itself, or its letter (A, B, ...)."""
    text = str(value).strip()
    for i, c in enumerate(choices):
        if str(c).strip() == text:
            return i
    if len(text) == 1 and "A" <= text <= "Z" and ord(text) - 65 < len(choices):
        return ord(text) - 65
    return None


def _messages(value) -> str:
    """A judge prompt as text: chat messages as 'role: content' blocks, anything else as it is."""
    if isinstance(value, list):
        return "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                           for m in value)
    return str(value)


def sample_row(r) -> dict:
    """One record as the sample table shows it; keys appear only when the record has them."""
    extra = r.extra or {}
    row = {"id": r.sample_id, "target": r.target, "prediction": r.prediction, "scores": r.scores or {}}
    prompt = extra.get("prompt", extra.get("prompts"))
    if prompt is not None:
        row["prompt"] = prompt if isinstance(prompt, str) else "\n\n---\n\n".join(map(str, prompt))
    lls = extra.get("loglikelihoods")
    if isinstance(extra.get("logprobs"), dict):          # sms_spam: {label: log-likelihood}
        row["choices"], lls = list(extra["logprobs"]), list(extra["logprobs"].values())
    if isinstance(lls, list):
        choices = extra.get("choices") or row.get("choices") or []
        if len(choices) != len(lls):                      # older records: no choices; name them A, B, ...
            choices = [chr(65 + i) if i < 26 else str(i) for i in range(len(lls))]
        row.update(choices=[str(c) for c in choices], ll=lls, pred_index=_choice_index(r.prediction, choices),
                   target_index=_choice_index(r.target, choices))
    judge = [extra[k] for k in ("judge_reply", "judge_reply_2") if extra.get(k) is not None]
    judge += [str(x) for x in extra.get("judge_replies") or []]
    if judge or extra.get("judge_prompt") is not None:
        row["judge"] = {"prompt": _messages(extra["judge_prompt"]) if "judge_prompt" in extra else None,
                        "replies": judge}
    if "subject" in extra:
        row["subject"] = extra["subject"]
    more = {k: v for k, v in extra.items() if k not in SHOWN_EXTRA}
    if more:
        row["more"] = more
    return row


def common_prompt_prefixes(rows: list[dict]) -> list[str]:
    """Move the part of the prompt every sample of a subject shares (the description and few-shot
    examples) into one table entry: a 5-shot MMLU run's data script shrinks several-fold, and the
    browser rebuilds each prompt from `prefix` + `prompt` when it shows or searches it."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if isinstance(row.get("prompt"), str):
            groups.setdefault(str(row.get("subject", "")), []).append(row)
    prefixes = []
    for members in groups.values():
        shared = os.path.commonprefix([m["prompt"] for m in members]) if len(members) > 1 else ""
        shared = shared[:shared.rfind("\n") + 1]            # whole lines: the sample's own part starts a line
        if len(shared) < 200:   # a one-line description reads better inline
            continue
        prefixes.append(shared)
        for m in members:
            m["prefix"], m["prompt"] = len(prefixes) - 1, m["prompt"][len(shared):]
    return prefixes


def subject_scores(records: list, metric: str | None) -> dict[str, float]:
    """Mean of the primary score per extra.subject; {} when records have no subject."""
    sums: dict[str, list[float]] = {}
    for r in records:
        subject, value = (r.extra or {}).get("subject"), (r.scores or {}).get(metric)
        if subject is not None and value is not None:
            sums.setdefault(str(subject), []).append(float(value))
    return {s: sum(v) / len(v) for s, v in sorted(sums.items())}


def metric_rows(folder: Path) -> list[dict]:
    """metrics.json (the run's leaderboard rows) with a 95% interval per metric: the task's own
    `<metric>_ci95_low/high` rows where it writes them, else the normal interval from the stderr."""
    rows = read_json_or_empty(folder / "metrics.json")
    rows = rows if isinstance(rows, list) else []
    bounds = {r.get("metric"): r.get("value") for r in rows if str(r.get("metric", "")).endswith(render.CI_COMPANIONS)}
    out = []
    for r in rows:
        name = str(r.get("metric", ""))
        if name.endswith(render.CI_COMPANIONS):
            continue
        low, high = bounds.get(name + "_ci95_low"), bounds.get(name + "_ci95_high")
        value, stderr = r.get("value"), r.get("stderr")
        if (low is None or high is None) and stderr is not None and value is not None:
            low, high = normal_ci(value, stderr)
        out.append({"metric": name, "value": value, "stderr": stderr, "low": low, "high": high,
                    "n": r.get("n"), "n_unscored": r.get("n_unscored")})
    return out


def eval_run(folder: Path) -> dict:
    """Everything a run page shows; `records` (newest per sample) is kept for comparisons."""
    state = read_json_or_empty(folder / "run.json")
    records = newest_records(folder)
    metric, binary = primary_metric(records)
    rows = [sample_row(r) for r in records]
    config = folder / ".hydra" / "config.yaml"
    return {"run_id": str(state.get("run_id") or folder.name), "path": str(folder), "key": state.get("key", {}),
            "scoring_s": state.get("scoring_s"), "appended": state.get("appended", {}),
            "config": config.read_text() if config.is_file() else "", "metrics": metric_rows(folder),
            "primary": metric, "binary": binary, "subjects": subject_scores(records, metric),
            "prefixes": common_prompt_prefixes(rows), "samples": rows, "records": records}


# --- comparisons ---------------------------------------------------------------------------------

def comparison(a: Run, b: Run, run_a: dict, run_b: dict) -> dict:
    """`harness.compare`'s report for a before b, the samples they score differently (on the metric
    the report compares) with both predictions, and the per-subject differences."""
    result = compare(a, b)
    metric = result["metric"]
    newest_a = {r.sample_id: r for r in run_a["records"]}
    newest_b = {r.sample_id: r for r in run_b["records"]}
    discordant = []
    for sample_id in sorted(a.scores):
        va, vb = _value(a.scores[sample_id], metric)[0], _value(b.scores[sample_id], metric)[0]
        if va is not None and vb is not None and va != vb:
            ra, rb = newest_a.get(sample_id), newest_b.get(sample_id)
            discordant.append({"id": sample_id, "a": va, "b": vb, "target": ra.target if ra else None,
                               "prediction_a": ra.prediction if ra else None,
                               "prediction_b": rb.prediction if rb else None})
    subjects_a, subjects_b = subject_scores(run_a["records"], metric), subject_scores(run_b["records"], metric)
    subjects = [{"subject": s, "a": subjects_a[s], "b": subjects_b[s], "diff": subjects_a[s] - subjects_b[s]}
                for s in subjects_a if s in subjects_b]
    return {"a": run_a["run_id"], "b": run_b["run_id"], "page_a": page_name(run_a["run_id"]),
            "page_b": page_name(run_b["run_id"]), "model_a": result["a"]["model"],
            "model_b": result["b"]["model"], "task": result["task"], "metric": metric,
            "binary": result["test"] == "mcnemar_exact",
            "report": format_report(result), "discordant": discordant, "subjects": subjects}


# --- training runs -------------------------------------------------------------------------------

def training_run(folder: Path) -> dict:
    """A training page: metrics.jsonl curves, provenance (recipe, config, data files, lineage)."""
    # imported here: harness.train.state imports torch, which only a training page needs
    from harness.train.state import read_metrics

    provenance = read_json_or_empty(folder / "provenance.json")
    provenance = provenance if isinstance(provenance, dict) else {}
    chain = lineage(provenance)
    steps = [{"id": str(s.get("id") or ""), "label": short_id(str(s.get("id") or ""), s.get("recipe"))}
             for s in reversed(chain.steps)]
    if chain.root:
        steps.append({"id": "", "label": chain.root})
    rows = read_metrics(folder)
    series = {name: [[r["step"], r[name]] for r in rows if _finite(r.get(name)) and "step" in r]
              for name in ("train_loss", "val_loss", "lr")}
    meta = {k: v for k, v in provenance.items() if k not in ("parent", "config", "data")}
    model = read_json_or_empty(folder / "config.json") or ((provenance.get("config") or {}).get("train") or {}).get("model")
    return {"id": str(provenance.get("id") or folder.name), "path": str(folder), "meta": meta,
            "config": provenance.get("config", {}), "model": model, "files": step_files(provenance) if provenance else [],
            "lineage": steps, "series": series, "last": rows[-1] if rows else {}}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
