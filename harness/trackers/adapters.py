"""One adapter per tracker, each through its own library, imported when the adapter starts.

Each takes (run_dir, run_name, run_id, purge_step): run_id is the tracker's id of the run to continue
(None: a new run), purge_step the first step a resumed run recomputes. Each has `.id`, the id to keep
in trackers.json (None where the tracker has no run ids: TensorBoard). Failures propagate: the caller
(harness/trackers/__init__.py) decides whether one is an error (at start) or a warning (later).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("harness")
TABLE_CAP = 200       # rows of a table TensorBoard shows as Markdown text (the full table is records.jsonl)
CELL_CAP = 300        # characters of one Markdown table cell


def _fence(text: str) -> str:
    """Text as a Markdown code block: TensorBoard renders its text summaries as Markdown."""
    return "```\n" + text.replace("```", "'''") + "\n```"


def _cell(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= CELL_CAP else text[:CELL_CAP - 1] + "…"


def markdown_table(rows: list[dict]) -> str:
    """The first TABLE_CAP rows as a Markdown table, with a line saying how many there are."""
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows[:TABLE_CAP]]
    shown = f"the first {TABLE_CAP} of {len(rows)} rows" if len(rows) > TABLE_CAP else f"{len(rows)} rows"
    return f"{shown}\n\n" + "\n".join(lines)


class TensorBoard:
    def __init__(self, run_dir: Path, run_name: str, run_id: str | None, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: a resumed run recomputes the steps after its checkpoint; their old events go
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)
        self.id = None

    def log_metrics(self, step, metrics):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def log_text(self, step, key, text):
        self.writer.add_text(key, _fence(text), step)

    def log_table(self, key, rows):
        self.writer.add_text(key, markdown_table(rows), 0)

    def log_config(self, config):
        self.writer.add_text("config", _fence(json.dumps(config, indent=1, sort_keys=True, default=str)), 0)

    def close(self):
        self.writer.close()


def _table_cell(v: Any) -> Any:
    """Numbers and None stay; anything else becomes text, so a column has one type in every tracker."""
    return v if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) else \
        v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


class WandB:
    HINT = "log in with `wandb login`, or set WANDB_MODE=offline to log locally and `wandb sync` later"

    def __init__(self, run_dir: Path, run_name: str, run_id: str | None, purge_step: int | None):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "harness", dir=str(run_dir),
                              name=run_name, id=run_id, resume="allow")
        self.id = self.run.id

    def log_metrics(self, step, metrics):
        self.run.log(metrics, step=step)

    def log_text(self, step, key, text):
        self.run.log({key: text}, step=step)

    def log_table(self, key, rows):
        cols = list(dict.fromkeys(k for r in rows for k in r))
        data = [[_table_cell(r.get(c)) for c in cols] for r in rows]
        self.run.log({key: self.wandb.Table(columns=cols, data=data)})

    def log_config(self, config):
        self.run.config.update(config, allow_val_change=True)

    def close(self):
        self.run.finish(exit_code=1 if sys.exc_info()[0] else 0)


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _mlflow_key(name: str) -> str:
    """MLflow's allowed characters only (alphanumerics, _ - . / space :), at most 250 of them."""
    return "".join(c if c.isalnum() or c in "_-./ :" else "_" for c in name)[:250]


class MLflow:
    HINT = ("set MLFLOW_TRACKING_URI to a tracking server (http://...) or a local store: sqlite:///<file> "
            "(needs SQLAlchemy, which the full mlflow package brings), or file:<folder> with "
            "MLFLOW_ALLOW_FILE_STORE=true (MLflow 3 keeps its file store only on request)")

    def __init__(self, run_dir: Path, run_name: str, run_id: str | None, purge_step: int | None):
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param
        from mlflow.utils.validation import (
            MAX_PARAM_VAL_LENGTH,
            MAX_PARAMS_TAGS_PER_BATCH,
        )
        self.Metric, self.Param, self.max_len, self.per_batch = Metric, Param, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
        self.client = MlflowClient(mlflow.get_tracking_uri())   # $MLFLOW_TRACKING_URI or MLflow's default
        if run_id is not None:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
            except mlflow.exceptions.MlflowException as e:
                log.warning("logger=mlflow: run %s is not in %s (%s); starting a new MLflow run",
                            run_id, mlflow.get_tracking_uri(), " ".join(str(e).split())[:200])
                run_id = None
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "harness"
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self.id = run_id

    def log_metrics(self, step, metrics):
        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[self.Metric(_mlflow_key(k), float(v), now, step)
                                                for k, v in metrics.items()])

    def log_text(self, step, key, text):
        self.client.log_text(self.id, text, f"{_mlflow_key(key)}/step_{step:08d}.txt")

    def log_table(self, key, rows):
        cols = list(dict.fromkeys(k for r in rows for k in r))
        self.client.log_table(self.id, {c: [_table_cell(r.get(c)) for r in rows] for c in cols},
                              f"{_mlflow_key(key)}.json")

    def log_config(self, config):
        """Flattened (train.lr), values as text cut to MLflow's limit, in batches of its maximum size."""
        params = [self.Param(_mlflow_key(k), str(v)[:self.max_len]) for k, v in _flatten(config).items()]
        for i in range(0, len(params), self.per_batch):
            self.client.log_batch(self.id, params=params[i:i + self.per_batch])

    def close(self):
        self.client.set_terminated(self.id, "FAILED" if sys.exc_info()[0] else "FINISHED")


ADAPTERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


