"""Experiment trackers: `logger=[tensorboard,wandb,mlflow]` (any subset; none by default) for
`python -m harness.train` and `python -m harness`, each through its own library (optional extras).

    names = check_names(cfg.logger)                  # before any work: unknown or not installed -> UserError
    t = open_trackers(names, run_dir, run_name, config)
    t.log_metrics(step, {"train_loss": 2.3})          # and log_text, log_table; t.close() at the end
    sink = training_log(run, names, resume_step)       # the training loop: metrics.jsonl + the trackers
    with closing(open_eval(names, run_dir, rows)) as t:   # the eval entry: its leaderboard rows, records
        log_eval(t, rows, records_path)

Where things go: TensorBoard event files in `<run_dir>/tensorboard/`; wandb's own folder under
`dir=<run_dir>`, project $WANDB_PROJECT or "harness", every other WANDB_* variable (WANDB_MODE=offline,
say) as wandb reads it; MLflow at $MLFLOW_TRACKING_URI or MLflow's default, experiment
$MLFLOW_EXPERIMENT_NAME or "harness". `<run_dir>/trackers.json` keeps the trackers' run ids, so a
resumed training run (or a re-run eval folder) logs into the same wandb and MLflow runs, and
TensorBoard drops the steps after the checkpoint as metrics.jsonl does.

Failures: a tracker that cannot start (a bad tracking URI, wandb refusing the login) is a UserError
before training or scoring begins. A tracker that fails later (the network goes away in online mode)
must not cost a training run: the failure is logged as a warning once per tracker and the run carries
on; further calls still go to that tracker, which may recover.

MLflow is driven through `MlflowClient` and wandb through the `Run` object `wandb.init` returns,
never through their process-global "active run": two runs in one process (the tests, a joblib
multirun worker) do not end up logging into each other's.
"""
from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from harness.cli import UserError
from harness.io import read_json, write_json
from harness.trackers.adapters import ADAPTERS

log = logging.getLogger("harness")
# name -> (modules its adapter imports, the pip package to name)
NAMES = {"tensorboard": (("tensorboard", "torch.utils.tensorboard"), "tensorboard"),
         "wandb": (("wandb",), "wandb"), "mlflow": (("mlflow",), "mlflow")}
IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_text(self, step: int, key: str, text: str) -> None: ...

    def log_table(self, key: str, rows: list[dict]) -> None: ...

    def log_config(self, config: dict) -> None: ...

    def close(self) -> None: ...


def check_names(value: Any, key: str = "logger") -> tuple[str, ...]:
    """`logger`'s value (one name, a list of them, [] or null) -> the names, each importable. An
    unknown name or a library that is not installed is one UserError, before any work starts."""
    if value is None or value == "":
        return ()
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else None
    if items is None or not all(isinstance(n, str) for n in items):
        raise UserError(f"{key}={value!r}: expected a name or a list of names ({', '.join(NAMES)})")
    for name in items:
        if name not in NAMES:
            raise UserError(f"{key}={value!r}: unknown logger {name!r}; valid: {', '.join(NAMES)}")
        modules, package = NAMES[name]
        try:
            for module in modules:
                importlib.import_module(module)
        except ImportError:
            raise UserError(f"{key}={name} needs the {package} package: pip install 'harness[{name}]'") from None
    return tuple(dict.fromkeys(items))


# --- all of them as one ------------------------------------------------------------------------

class Trackers:
    """The chosen trackers as one Tracker. A call that fails warns once per tracker and carries on
    (see the module docstring): a tracker must never end the run it watches."""

    def __init__(self, adapters: dict[str, Tracker]):
        self.adapters, self.failed = adapters, set()

    def _each(self, method: str, *args) -> None:
        for name, tracker in self.adapters.items():
            try:
                getattr(tracker, method)(*args)
            except Exception as e:   # noqa: BLE001 - any failure of a tracker: warn, never stop the run
                if name not in self.failed:
                    self.failed.add(name)
                    log.warning("logger=%s failed (%s: %s); the run carries on, and later failures of "
                                "logger=%s are not reported", name, type(e).__name__,
                                " ".join(str(e).split())[:300], name)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._each("log_metrics", step, metrics)

    def log_text(self, step: int, key: str, text: str) -> None:
        self._each("log_text", step, key, text)

    def log_table(self, key: str, rows: list[dict]) -> None:
        self._each("log_table", key, rows)

    def log_config(self, config: dict) -> None:
        self._each("log_config", config)

    def close(self) -> None:
        """Ends every tracker's run: failed when an exception is on its way out (a finally block)."""
        self._each("close")


def open_trackers(names: Sequence[str], run_dir: str | os.PathLike, run_name: str, config: dict | None = None,
                  resume_step: int | None = None) -> Trackers:
    """Start the trackers `names` for the run `run_name` logging in `run_dir`. The run ids in
    run_dir/trackers.json are reused when they belong to `run_name` (a resumed run); otherwise new
    tracker runs start and `config` is logged once. resume_step: TensorBoard drops events after it."""
    if not names:
        return Trackers({})
    run_dir = Path(run_dir)
    saved = read_json(run_dir / IDS_FILE, f"delete {run_dir / IDS_FILE} to start new tracker runs") \
        if (run_dir / IDS_FILE).exists() else {}
    reuse = saved.get("run") == run_name
    purge = resume_step + 1 if reuse and resume_step is not None else None
    adapters: dict[str, Tracker] = {}
    try:
        for name in names:
            try:
                adapters[name] = ADAPTERS[name](run_dir, run_name, saved.get(name) if reuse else None, purge)
            except Exception as e:   # at start, any failure is the user's to fix
                hint = getattr(ADAPTERS[name], "HINT", "")
                raise UserError(f"logger={name} could not start: {type(e).__name__}: "
                                f"{' '.join(str(e).split())[:500]}{'; ' + hint if hint else ''}") from e
    except UserError:
        Trackers(adapters).close()
        raise
    ids = {n: a.id for n, a in adapters.items() if getattr(a, "id", None)}
    write_json(run_dir / IDS_FILE, {**(saved if reuse else {}), **ids, "run": run_name})
    trackers = Trackers(adapters)
    if config is not None and not reuse:
        trackers.log_config(config)
    return trackers


# --- the two entry points ----------------------------------------------------------------------

class TrainingLog:
    """What the training loop appends each metrics row to: metrics.jsonl, then the trackers (every
    number in the row; the sample generation as text)."""

    def __init__(self, out_dir: Path, trackers: Trackers):
        self.out_dir, self.trackers = out_dir, trackers

    def append(self, row: dict) -> None:
        from harness.train.state import append_metrics
        append_metrics(self.out_dir, row)
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        self.trackers.log_metrics(row["step"], numbers)
        if isinstance(row.get("sample"), str):
            self.trackers.log_text(row["step"], "sample", row["sample"])

    def close(self) -> None:
        self.trackers.close()


def training_log(run, names: Sequence[str], resume_step: int) -> TrainingLog:
    """The loop's metrics sink for `run` (state.Run); names=() on ranks other than 0 (nothing opened)."""
    return TrainingLog(run.out_dir, open_trackers(names, run.out_dir, run.id, run.config, resume_step))


PER_METRIC = ("metric", "value", "stderr", "n", "n_unscored")


def open_eval(names: Sequence[str], run_dir: Path, rows: list[dict]) -> Trackers:
    """The trackers of an eval run, named by its run id, with the run's key (model, task,
    task_version, seed, ...: a leaderboard row without its metric's cells) as config. Opened before
    the rows are appended, so a tracker that cannot start appends nothing."""
    key = {k: v for k, v in rows[0].items() if k not in (*PER_METRIC, "time", "wall_s")} if rows else {}
    return open_trackers(names, run_dir, str(key.get("run_id", "")), key)


def log_eval(trackers: Trackers, rows: list[dict], records_path: Path) -> None:
    """Each leaderboard row (`<task>/<metric>/value`, .../stderr, .../n, .../n_unscored, at step 0: a
    metric name is never also a folder of another, which MLflow's file store could not hold for
    `acc` beside `acc/anatomy`) and the records as a table: one row per sample (its newest record),
    its prompt where the task keeps one."""
    if not trackers.adapters:
        return
    from harness.records import load_records

    metrics: dict[str, float] = {}
    for r in rows:
        base = f"{r['task']}/{r['metric']}"
        metrics.update({f"{base}/{f}": r[f] for f in PER_METRIC[1:] if r[f] is not None})
    latest = {rec.sample_id: rec for rec in load_records(records_path)}
    table = [{"sample_id": rec.sample_id, **({"prompt": rec.extra["prompt"]} if "prompt" in rec.extra else {}),
              "prediction": rec.prediction, "target": rec.target, **rec.scores} for rec in latest.values()]
    trackers.log_metrics(0, metrics)
    trackers.log_table("records", table)
