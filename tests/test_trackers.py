"""logger=[tensorboard,wandb,mlflow]: what each tracker's own files hold, read back with its own reader
(TensorBoard's EventAccumulator, wandb's protobuf records in the offline run's .wandb file and its
table files, MlflowClient on the local store), against metrics.jsonl and the leaderboard.

Offline and local only: WANDB_MODE=offline, an MLflow file store in tmp (mlflow-skinny has no
SQL store; MLFLOW_ALLOW_FILE_STORE=true lets MLflow 3 use it), never a network address. One training
run (stopped at step 2, then resumed to step 4) and one eval run are shared by the tests: wandb's
service start is the slow part."""
from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from clitools import ENV, run_module

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

ALL = "logger=[tensorboard,wandb,mlflow]"
TRAIN = ["train=pretrain_tiny", "progress=false", "train.max_steps=4", "train.eval_every=2", "train.sample_every=2",
         ALL]


def ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def one_error(p, *needles):
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    errs = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errs) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    for n in needles:
        assert n in errs[0], errs[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers_env")
    return dict(ENV, WANDB_MODE="offline", WANDB_DIR=str(root / "wandb"), WANDB_CACHE_DIR=str(root / "wandb_cache"),
                WANDB_CONFIG_DIR=str(root / "wandb_config"), WANDB_SILENT="true",
                MLFLOW_TRACKING_URI=(root / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true",
                HARNESS_CACHE=str(root / "cache"))


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("trackers_train") / "run"
    ok(run_module("harness.train", *TRAIN, f"output_dir={out}", "stop_at_step=2", env=env))
    first = json.loads((out / "trackers.json").read_text())
    ok(run_module("harness.train", *TRAIN, f"output_dir={out}", "resume=true", env=env))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["sample"]
    return SimpleNamespace(out=out, rows=rows, first_ids=first, ids=json.loads((out / "trackers.json").read_text()))


@pytest.fixture(scope="module")
def evaluated(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers_eval")
    board, run_dir = root / "lb.csv", root / "run"
    ok(run_module("harness", "task=mmlu", "model=gpt-tiny", "task.subjects=[anatomy]", "task.limit=3",
                  f"leaderboard={board}", f"hydra.run.dir={run_dir}", ALL, env=env))
    with open(board, newline="") as f:
        rows = list(csv.DictReader(f))
    return SimpleNamespace(run=run_dir, rows=rows, ids=json.loads((run_dir / "trackers.json").read_text()))


# --- readers: each tracker's files through its own library -------------------------------------------

def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def tb_text(acc, tag: str) -> dict[int, str]:
    from tensorboard.util import tensor_util
    return {e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(f"{tag}/text_summary")}


def wandb_records(path: Path):
    """The protobuf Records of a .wandb file: wandb's LevelDB-style log (a 7-byte ':W&B' header, then
    32 KiB blocks of chunks, each with a 7-byte crc/length/type header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:          # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                   # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_runs(folder: Path) -> list[Path]:
    return sorted((folder / "wandb").glob("offline-run-*"))


def wandb_history(folder: Path) -> tuple[set[str], dict[int, dict]]:
    """(run ids of every offline run in folder, {step: {key: value}} merged over them)."""
    ids, steps = set(), {}
    for run in wandb_runs(folder):
        for rec in wandb_records(next(run.glob("*.wandb"))):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.add(rec.run.run_id)
            elif kind == "history":
                row = steps.setdefault(rec.history.step.num, {})
                for item in rec.history.item:
                    row["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return ids, steps


def wandb_config(folder: Path) -> dict:
    config = {}
    for run in wandb_runs(folder):
        for rec in wandb_records(next(run.glob("*.wandb"))):
            if rec.WhichOneof("record_type") == "config":
                config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
    return config


def mlflow_client(env):
    from mlflow import MlflowClient
    return MlflowClient(env["MLFLOW_TRACKING_URI"])


@pytest.fixture(autouse=True)
def _mlflow_env(env, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


# --- training ---------------------------------------------------------------------------------------

NUMERIC = ("train_loss", "lr", "tokens_per_s", "epoch", "tokens_seen", "val_loss", "train_loss_avg")


def expected(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if r.get(key) is not None}


def test_training_rows_reach_tensorboard(trained):
    acc = tensorboard_events(trained.out)
    for key in NUMERIC:
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got == pytest.approx(expected(trained.rows, key), rel=1e-6), key   # float32 in the event file
    samples = tb_text(acc, "sample")
    assert sorted(samples) == [2, 4] and all(trained.rows[s - 1]["sample"] in samples[s] for s in samples)
    config = tb_text(acc, "config")
    assert list(config) == [0] and '"max_steps": 4' in config[0]      # once, from the first part


def test_training_rows_reach_wandb_and_the_resumed_run_continues_it(trained):
    runs = wandb_runs(trained.out)
    assert len(runs) == 2                                   # the first part and the resumed one
    ids, steps = wandb_history(trained.out)
    assert ids == {trained.ids["wandb"]} == {trained.first_ids["wandb"]}
    for key in (*NUMERIC, "sample"):
        got = {s: row[key] for s, row in steps.items() if key in row}
        assert got == expected(trained.rows, key), key
    config = wandb_config(trained.out)
    assert config["train"]["max_steps"] == 4 and config["logger"] == ["tensorboard", "wandb", "mlflow"]


def test_training_rows_reach_mlflow_and_the_resumed_run_continues_it(trained, env):
    client = mlflow_client(env)
    assert trained.ids["mlflow"] == trained.first_ids["mlflow"]
    run = client.get_run(trained.ids["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == trained.ids["run"]
    exp = client.get_experiment_by_name("harness")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{trained.ids['run']}'")] \
        == [trained.ids["mlflow"]]                          # one MLflow run for both parts
    for key in NUMERIC:
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert got == pytest.approx(expected(trained.rows, key)), key
    params = run.data.params
    assert params["train.max_steps"] == "4" and params["train.recipe"] == "pretrain" and params["seed"] == "123"
    texts = {a.path for a in client.list_artifacts(run.info.run_id, "sample")}
    assert texts == {"sample/step_00000002.txt", "sample/step_00000004.txt"}
    path = client.download_artifacts(run.info.run_id, "sample/step_00000004.txt")
    assert Path(path).read_text() == trained.rows[3]["sample"]


def test_logger_is_not_part_of_the_config_a_resumed_run_must_match(trained, env):
    """The same run resumed without trackers is the same run: it says 'completed', not 'different'."""
    p = run_module("harness.train", *TRAIN[:-1], f"output_dir={trained.out}", "resume=true", env=env)
    one_error(p, "holds a completed run")


# --- eval -------------------------------------------------------------------------------------------

def board_metrics(rows: list[dict]) -> dict[str, float]:
    out = {}
    for r in rows:
        for f in ("value", "stderr", "n", "n_unscored"):
            if r[f] != "":
                out[f"{r['task']}/{r['metric']}/{f}"] = float(r[f])
    return out


def test_eval_rows_and_records_reach_every_tracker(evaluated, env):
    want = board_metrics(evaluated.rows)
    assert "mmlu/acc/value" in want and "mmlu/acc/anatomy/stderr" in want and len(evaluated.rows) == 3
    records = [json.loads(line) for line in (evaluated.run / "records.jsonl").read_text().splitlines()]
    sample_ids = [r["sample_id"] for r in records]

    acc = tensorboard_events(evaluated.run)
    assert {k: acc.Scalars(k)[0].value for k in want} == pytest.approx(want)
    assert all(len(acc.Scalars(k)) == 1 and acc.Scalars(k)[0].step == 0 for k in want)
    table = tb_text(acc, "records")[0]
    assert table.startswith("3 rows") and all(f"| {s} |" in table for s in sample_ids)

    ids, steps = wandb_history(evaluated.run)
    assert ids == {evaluated.ids["wandb"]}
    assert {k: steps[0][k] for k in want} == pytest.approx(want)
    (table_file,) = wandb_runs(evaluated.run)[0].glob("files/media/table/records_*.table.json")
    wtable = json.loads(table_file.read_text())
    assert wtable["columns"][:4] == ["sample_id", "prompt", "prediction", "target"] and "acc" in wtable["columns"]
    assert [row[0] for row in wtable["data"]] == sample_ids
    config = wandb_config(evaluated.run)
    assert config["task"] == "mmlu" and config["model"] == "gpt-tiny" and config["seed"] == 1234

    client = mlflow_client(env)
    run = client.get_run(evaluated.ids["mlflow"])
    assert {k: client.get_metric_history(run.info.run_id, k)[0].value for k in want} == pytest.approx(want)
    p = run.data.params
    assert (p["task"], p["model"], p["seed"], p["run_id"]) == ("mmlu", "gpt-tiny", "1234", evaluated.rows[0]["run_id"])
    assert p["task_version"] == evaluated.rows[0]["task_version"] and "time" not in p
    mtable = json.loads(Path(client.download_artifacts(run.info.run_id, "records.json")).read_text())
    assert [row[0] for row in mtable["data"]] == sample_ids and mtable["columns"][0] == "sample_id"


# --- bad input and failures ---------------------------------------------------------------------------

def test_unknown_logger_is_one_line_naming_the_valid_ones(tmp_path, env):
    p = run_module("harness.train", *TRAIN[:-1], "logger=[tensorboard,neptune]", f"output_dir={tmp_path / 'out'}",
                   env=env)
    one_error(p, "unknown logger 'neptune'", "valid: tensorboard, wandb, mlflow")
    assert not (tmp_path / "out").exists()
    p = run_module("harness", "task=mmlu", "model=gpt-tiny", "logger=comet", f"leaderboard={tmp_path / 'lb.csv'}",
                   f"hydra.run.dir={tmp_path / 'run'}", env=env)
    one_error(p, "unknown logger 'comet'")
    assert not (tmp_path / "lb.csv").exists() and not (tmp_path / "run" / "records.jsonl").exists()


@pytest.mark.parametrize("name,modules", [("wandb", ["wandb"]), ("mlflow", ["mlflow"]),
                                          ("tensorboard", ["tensorboard", "torch.utils.tensorboard"])])
def test_missing_package_is_one_line_before_any_work(name, modules, tmp_path, env, monkeypatch):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)           # `import m` raises ImportError
    p = run_module("harness.train", *TRAIN[:-1], f"logger={name}", f"output_dir={tmp_path / 'out'}", env=env)
    one_error(p, f"logger={name} needs the {name} package: pip install 'harness[{name}]'")
    assert not (tmp_path / "out").exists()


def test_a_tracker_that_cannot_start_is_an_error(tmp_path, monkeypatch):
    from harness.cli import UserError
    from harness.trackers import open_trackers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    with pytest.raises(UserError, match="logger=mlflow could not start"):
        open_trackers(["mlflow"], tmp_path, "run-1", {"a": 1})
    assert not (tmp_path / "trackers.json").exists()


def test_a_tracker_failing_mid_run_warns_once_and_the_others_carry_on(caplog):
    from harness.trackers import Trackers

    class Broken:
        def log_metrics(self, step, metrics):
            raise ConnectionError("network is unreachable")

    class Good:
        def __init__(self):
            self.seen = []

        def log_metrics(self, step, metrics):
            self.seen.append((step, metrics))

    good = Good()
    trackers = Trackers({"wandb": Broken(), "tensorboard": good})
    with caplog.at_level(logging.WARNING, logger="harness"):
        for step in range(3):
            trackers.log_metrics(step, {"loss": 1.0})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "logger=wandb failed" in warnings[0] and "network is unreachable" in warnings[0]
    assert [s for s, _ in good.seen] == [0, 1, 2]
