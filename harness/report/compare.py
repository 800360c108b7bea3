"""python -m harness.compare a=<run folder> b=<run folder> [metric=auto] [n_resamples=10000] [seed=0]
[out=<file.json>]: is run a better than run b on the same samples, or is it noise?

Both runs' records.jsonl are paired by sample id AND the sample's data hash (`data_hash`: what the
question, choices and answer are, not how they were prompted). The runs must be of the same task and
hold the same sample ids with the same data; otherwise the comparison is refused with the reason.
Runs whose prompts differ (task version, few-shot count, template: 0-shot vs 5-shot on the same MMLU
questions) are compared, with one `note` line saying what differs, because the per-sample scores are
of the same questions and so pair. Samples unscored in either run are left out and listed.

- 0/1 per-sample scores (mmlu / sms_spam / multiple-choice `acc`, `acc_norm`): exact McNemar test
  on the discordant pairs, plus a paired-bootstrap 95% CI of the accuracy difference.
- real-valued scores (the judged instruct task's `score`, ...): paired bootstrap, CI and p-value.
- perplexity records (`loglikelihood`, `words`, `bytes` per document): `loglikelihood_per_word`
  (the default) or `loglikelihood_per_byte`, bootstrapped as word-weighted means, so each run's
  mean is minus the log of its corpus word (byte) perplexity; both perplexities are printed.

`metric=auto` picks acc, then score, then loglikelihood_per_word, then the only score there is.
See harness/report/stats.py for the tests. Bad input prints one `error:` line and exits with status 2.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.cli import UserError
from harness.records import load_records
from harness.report.stats import mcnemar_exact, paired_bootstrap
from tasks.base import Record, text_hash

DERIVED = {"loglikelihood_per_word": ("loglikelihood", "words"),
           "loglikelihood_per_byte": ("loglikelihood", "bytes")}
AUTO_ORDER = ("acc", "score", "loglikelihood_per_word")
USAGE = "python -m harness.compare a=<run folder> b=<run folder> [metric=auto] [out=<file.json>]"
# Record fields that say what the sample IS (its data), never how it was prompted or answered.
# Records do not store a hash of their sample's data, so data_hash derives one from these.
DATA_EXTRA = ("data_hash", "subject", "title")     # Record.extra keys (mmlu subject, document title)
DATA_SCORES = ("words", "bytes")                    # perplexity: the document's own length


class CompareError(UserError):
    """The two runs cannot be compared as asked; printed as one `error:` line, exit 2."""


@dataclass
class Run:
    path: Path
    key: dict                    # run.json's key: task, task_version, model, checkpoint_sha, ...
    scores: dict[str, dict]      # sample id -> that sample's scores (its newest record, as the engine counts)
    data: dict[str, str]         # sample id -> data_hash of that record
    prompts: dict[str, str]      # sample id -> prompt_hash (differs between prompt variants)
    settings: dict               # the run's task config (.hydra/config.yaml `task`), {} when absent


def data_hash(r: Record) -> str:
    """What the sample is, hashed: the gold answer (`target`), the number of choices (the length of
    `extra.loglikelihoods`), the subject / document title and a perplexity document's word and byte
    counts, plus `extra.data_hash` if a task stores one. Records carry no hash of their sample's data,
    so it is derived from what they hold; the question text itself is only in the sample id (mmlu,
    sms_spam, instruct and perplexity ids end in a hash of it). Prompt-only fields (prompt_hash,
    extra.num_fewshot, extra.prompt) and the model's outputs are left out, so prompt variants of
    one question hash equal."""
    fields: dict = {"target": r.target}
    fields.update({k: r.extra[k] for k in DATA_EXTRA if k in r.extra})
    fields.update({k: r.scores[k] for k in DATA_SCORES if (r.scores or {}).get(k) is not None})
    if isinstance(r.extra.get("loglikelihoods"), list):
        fields["n_choices"] = len(r.extra["loglikelihoods"])
    return text_hash(json.dumps(fields, sort_keys=True, default=str))


def _task_settings(folder: Path) -> dict:
    """The task's config as hydra saved it next to the run (num_fewshot, template, ...): only used
    to say which prompt settings differ, so a missing or unreadable file is no error."""
    from omegaconf import OmegaConf
    try:
        task = OmegaConf.to_container(OmegaConf.load(folder / ".hydra" / "config.yaml")).get("task")
    except Exception:   # noqa: BLE001 - absent, not YAML, not a dict: nothing to name
        return {}
    return task if isinstance(task, dict) else {}


def load_run(path: str | Path, which: str) -> Run:
    p = Path(path)
    folder = p.parent if p.name == "records.jsonl" else p
    if not folder.is_dir():
        raise CompareError(f"{which}={path}: no such run folder")
    state_path, records_path = folder / "run.json", folder / "records.jsonl"
    if not state_path.is_file() or not records_path.is_file():
        missing = "run.json" if not state_path.is_file() else "records.jsonl"
        raise CompareError(f"{which}={path}: no {missing}; pass a run folder written by python -m harness")
    try:
        key = json.loads(state_path.read_text())["key"]
    except (ValueError, KeyError, TypeError) as e:
        raise CompareError(f"{state_path}: not a harness run.json ({type(e).__name__}: {e})") from None
    scores: dict[str, dict] = {}
    data: dict[str, str] = {}
    prompts: dict[str, str] = {}
    for r in load_records(records_path):   # a rescored sample's newest record counts, as in the engine
        scores[r.sample_id] = r.scores or {}
        data[r.sample_id], prompts[r.sample_id] = data_hash(r), r.prompt_hash
    if not scores:
        raise CompareError(f"{which}={path}: records.jsonl holds no records")
    return Run(folder, key, scores, data, prompts, _task_settings(folder))


def check_comparable(a: Run, b: Run) -> str | None:
    """Refuse runs that did not score the same data; return a one-line note when only the prompts
    differ (None when nothing does)."""
    if a.key.get("task") != b.key.get("task"):
        raise CompareError(f"the runs' tasks differ: a is {a.key.get('task')!r}, b is {b.key.get('task')!r}")
    only_a, only_b = sorted(set(a.scores) - set(b.scores)), sorted(set(b.scores) - set(a.scores))
    if only_a or only_b:
        examples = "; ".join(f"{ids[0]} only in {w}" for ids, w in ((only_a, "a"), (only_b, "b")) if ids)
        raise CompareError(f"the runs scored different samples: {len(only_a)} only in a, {len(only_b)} only "
                           f"in b (e.g. {examples}); score both with the same task.limit / subjects")
    ids = sorted(a.scores)
    changed = [i for i in ids if a.data[i] != b.data[i]]
    if changed:
        raise CompareError(f"the runs scored different data: sample {changed[0]} has data hash {a.data[changed[0]]} "
                           f"in a, {b.data[changed[0]]} in b ({len(changed)} of {len(ids)} samples differ); "
                           "compare runs made from the same data files and split")
    if a.key.get("task_version") == b.key.get("task_version"):
        return None
    keys = sorted(set(a.settings) | set(b.settings))
    differ = [f"task.{k} {a.settings.get(k)!r} vs {b.settings.get(k)!r}" for k in keys
              if a.settings.get(k) != b.settings.get(k)]
    what = ", ".join(differ) if differ else f"task version {a.key.get('task_version')} vs {b.key.get('task_version')}"
    n_prompts = sum(a.prompts[i] != b.prompts[i] for i in ids)
    return (f"prompt settings differ ({what}; {n_prompts} of {len(ids)} prompts differ); "
            "paired on the same data by sample id and data hash")


def _keys(run: Run) -> set[str]:
    return {k for s in run.scores.values() for k in s}


def choose_metric(a: Run, b: Run, metric: str) -> str:
    common = _keys(a) & _keys(b)
    available = sorted(common | {d for d, (num, den) in DERIVED.items() if {num, den} <= common})
    if metric != "auto":
        if metric not in available:
            raise CompareError(f"metric {metric!r} is not in both runs' records; available: {', '.join(available)}")
        return metric
    for m in AUTO_ORDER:
        if m in available:
            return m
    if len(common) == 1:
        return next(iter(common))
    raise CompareError(f"cannot pick a metric on my own; pass metric=<one of {', '.join(available)}>")


def _value(scores: dict, metric: str) -> tuple[float | None, float]:
    """(per-sample value or None when unscored, its weight)."""
    num, den = DERIVED.get(metric, (metric, None))
    v = scores.get(num)
    w = 1.0 if den is None else scores.get(den)
    if v is None or w is None or not math.isfinite(float(v)) or float(w) <= 0:
        return None, 0.0
    return float(v) / (1.0 if den is None else float(w)), float(w)


def compare(a: Run, b: Run, metric: str = "auto", n_resamples: int = 10_000, seed: int = 0) -> dict:
    """The comparison as a JSON-ready dict (see format_report for the readable form)."""
    note = check_comparable(a, b)
    metric = choose_metric(a, b, metric)
    ids = sorted(a.scores)
    va = {i: _value(a.scores[i], metric) for i in ids}
    vb = {i: _value(b.scores[i], metric) for i in ids}
    unscored_a = [i for i in ids if va[i][0] is None]
    unscored_b = [i for i in ids if vb[i][0] is None]
    paired = [i for i in ids if va[i][0] is not None and vb[i][0] is not None]
    if not paired:
        raise CompareError(f"no sample is scored in both runs ({len(unscored_a)} unscored in a, "
                           f"{len(unscored_b)} in b)")
    xa = np.array([va[i][0] for i in paired])
    xb = np.array([vb[i][0] for i in paired])
    weights = np.array([va[i][1] for i in paired]) if metric in DERIVED else None
    boot = paired_bootstrap(xa, xb, n_resamples=n_resamples, seed=seed, weights=weights)
    binary = metric not in DERIVED and bool(np.isin(np.concatenate([xa, xb]), (0.0, 1.0)).all())
    out = dict(task=a.key.get("task"), task_version=a.key.get("task_version"), metric=metric,
               test="mcnemar_exact" if binary else "paired_bootstrap",
               a=dict(run=str(a.path), model=a.key.get("model"), task_version=a.key.get("task_version"),
                      mean=boot.mean_a),
               b=dict(run=str(b.path), model=b.key.get("model"), task_version=b.key.get("task_version"),
                      mean=boot.mean_b),
               n_paired=len(paired), difference=boot.difference, ci95=[boot.ci_low, boot.ci_high],
               p_value=boot.p_value,
               bootstrap=dict(n_resamples=boot.n_resamples, seed=boot.seed, p_value=boot.p_value,
                              p_value_method="shifted-null (Efron & Tibshirani 16.4)"),
               unscored=dict(a=unscored_a, b=unscored_b, excluded=len(ids) - len(paired)), note=note)
    if binary:
        mc = mcnemar_exact(xa, xb)
        out["mcnemar"] = dict(a_right_b_wrong=mc.a_only, a_wrong_b_right=mc.b_only, p_value=mc.p_value)
        out["p_value"] = mc.p_value
    if metric in DERIVED:
        unit = metric.rsplit("_", 1)[1]
        for side in ("a", "b"):   # mean = total loglikelihood / total units = -log(corpus perplexity)
            out[side][f"{unit}_perplexity"] = math.exp(-out[side]["mean"])
    return out


def _ids(ids: list[str], limit: int = 10) -> str:
    return ", ".join(ids[:limit]) + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def format_report(r: dict) -> str:
    m = r["metric"]
    versions = r['task_version'] if r["a"].get("task_version") == r["b"].get("task_version") \
        else f"a {r['a']['task_version']}, b {r['b']['task_version']}"
    lines = [f"task        {r['task']} (version {versions})",
             f"metric      {m} ({'0/1 per sample: exact McNemar test' if r['test'] == 'mcnemar_exact' else 'paired bootstrap'})"]
    for side in ("a", "b"):
        s = r[side]
        ppl = "".join(f", {k.replace('_', ' ')} {v:.4g}" for k, v in s.items() if k.endswith("perplexity"))
        lines.append(f"{side}           {s['model']}  {m} {s['mean']:.4f}{ppl}  ({s['run']})")
    u = r["unscored"]
    lines.append(f"paired      {r['n_paired']} samples; {u['excluded']} excluded (unscored in a: {len(u['a'])}, "
                 f"in b: {len(u['b'])})")
    for side in ("a", "b"):
        if u[side]:
            lines.append(f"unscored {side}  {_ids(u[side])}")
    bs = r["bootstrap"]
    lines.append(f"a - b       {r['difference']:+.4f}  95% CI [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] "
                 f"(paired bootstrap, {bs['n_resamples']} resamples, seed {bs['seed']})")
    if "mcnemar" in r:
        mc = r["mcnemar"]
        lines.append(f"discordant  a right & b wrong: {mc['a_right_b_wrong']}, a wrong & b right: {mc['a_wrong_b_right']}")
        lines.append(f"p-value     {mc['p_value']:.6g} (exact McNemar, two-sided)")
    else:
        lines.append(f"p-value     {r['p_value']:.6g} (paired bootstrap, shifted null, two-sided)")
    if r.get("note"):
        lines.append(f"note        {r['note']}")
    if r["n_paired"] < 20:
        lines.append("note        fewer than 20 paired samples: the bootstrap interval is rough (too narrow)")
    return "\n".join(lines) + "\n"
