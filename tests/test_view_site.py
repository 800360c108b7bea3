"""The results viewer's data, without a browser (tests/test_view.py drives the pages in Chromium):
every sample reaches the run's data script, the newest record of a sample wins, a prompt cannot
end its <script> early, the comparison lists exactly the samples compare() counts as discordant,
and bad input is one `error:` line."""
import json
from pathlib import Path

import pytest
from clitools import run_module

from harness.report import site
from harness.report.compare import compare, format_report, load_run
from harness.report.store import append_rows
from tasks.base import Record


def _write_run(folder: Path, run_id: str, model: str, accs: dict[str, float | None], task: str = "mmlu",
               extra: dict | None = None, repeated: list[Record] = ()) -> Path:
    """A run folder as harness.evaluate leaves it: run.json, records.jsonl, metrics.json, .hydra/config.yaml."""
    folder.mkdir(parents=True)
    key = {"task": task, "task_version": "v1", "seed": 1, "model": model, "checkpoint_sha": "abc", "dtype": "float32",
           "device": "cpu"}
    (folder / "run.json").write_text(json.dumps({"key": key, "run_id": run_id, "scoring_s": 1.5}))
    records = list(repeated) + [
        Record(i, "h", "A" if acc else "B", "A", {"acc": acc},
               {"loglikelihoods": [-1.0, -2.0], "choices": [" A", " B"], "subject": i.split("/")[0], **(extra or {})})
        for i, acc in accs.items()]
    (folder / "records.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    scored = [a for a in accs.values() if a is not None]
    (folder / "metrics.json").write_text(json.dumps([{"metric": "acc", "value": sum(scored) / len(scored), "stderr": 0.1,
                                                      "n": len(scored), "n_unscored": len(accs) - len(scored)}]))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(f"task:\n  name: {task}\n")
    return folder


def _data(site_dir: Path, name: str):
    text = (site_dir / "data" / name).read_text()
    assert text.startswith("window.HARNESS = ") and text.endswith(";\n")
    return json.loads(text[len("window.HARNESS = "):-2])


IDS = [f"{s}/test/{i:04d}" for s in ("algebra", "anatomy") for i in range(30)]


@pytest.fixture
def two_runs(tmp_path):
    a = _write_run(tmp_path / "a", "20260101T000000Z-aaaaaa", "model-a", {i: float(k % 2) for k, i in enumerate(IDS)})
    b = _write_run(tmp_path / "b", "20260102T000000Z-bbbbbb", "model-b", {i: float(k % 3 == 0) for k, i in enumerate(IDS)})
    return a, b


def test_every_sample_in_the_data_script_and_the_newest_record_wins(tmp_path):
    retried = Record(IDS[3], "h", None, "A", {"acc": None}, {"retry": True, "subject": "algebra"})
    folder = _write_run(tmp_path / "run", "20260101T000000Z-cccccc", "m", {i: 1.0 for i in IDS}, repeated=[retried])
    index = site.build(tmp_path / "none.csv", [str(folder)], tmp_path / "site")
    assert index == tmp_path / "site" / "index.html" and index.is_file()
    data = _data(tmp_path / "site", "run-20260101T000000Z-cccccc.js")
    ids = [s["id"] for s in data["samples"]]
    assert sorted(ids) == sorted(IDS) and len(ids) == len(IDS)            # every sample, once
    again = data["samples"][ids.index(IDS[3])]
    assert again["scores"] == {"acc": 1.0} and again["prediction"] == "A"
    assert data["primary"] == "acc" and data["binary"] is True
    assert data["subjects"] == {"algebra": 1.0, "anatomy": 1.0}
    assert (tmp_path / "site" / "runs" / "20260101T000000Z-cccccc.html").is_file()


def test_a_prompt_cannot_close_the_script_tag(tmp_path):
    evil = "Q: </script><script>alert(1)</script> </SCRIPT"
    folder = _write_run(tmp_path / "run", "20260101T000000Z-dddddd", "m", {IDS[0]: 1.0},
                        extra={"prompt": evil, "judge_prompt": [{"role": "user", "content": evil}], "judge_reply": evil})
    site.build(tmp_path / "none.csv", [str(folder)], tmp_path / "site")
    raw = (tmp_path / "site" / "data" / "run-20260101T000000Z-dddddd.js").read_text()
    assert "</" not in raw
    sample = _data(tmp_path / "site", "run-20260101T000000Z-dddddd.js")["samples"][0]
    assert sample["prompt"] == evil and sample["judge"] == {"prompt": f"user: {evil}", "replies": [evil]}


def test_the_comparison_is_compares_own(two_runs, tmp_path):
    a, b = two_runs
    site.build(tmp_path / "none.csv", [str(b), str(a)], tmp_path / "site")
    pair = "20260101T000000Z-aaaaaa__20260102T000000Z-bbbbbb"     # earlier run first, whatever the order given
    assert (tmp_path / "site" / "compare" / f"{pair}.html").is_file()
    data = _data(tmp_path / "site", f"compare-{pair}.js")
    result = compare(load_run(a, "a"), load_run(b, "b"))
    assert data["report"] == format_report(result)
    accs_a = {r["id"]: r["scores"]["acc"] for r in _data(tmp_path / "site", "run-20260101T000000Z-aaaaaa.js")["samples"]}
    accs_b = {r["id"]: r["scores"]["acc"] for r in _data(tmp_path / "site", "run-20260102T000000Z-bbbbbb.js")["samples"]}
    expected = sorted(i for i in IDS if accs_a[i] != accs_b[i])
    assert [d["id"] for d in data["discordant"]] == expected
    assert len(expected) == result["mcnemar"]["a_right_b_wrong"] + result["mcnemar"]["a_wrong_b_right"]
    assert {s["subject"] for s in data["subjects"]} == {"algebra", "anatomy"}
    run_page = _data(tmp_path / "site", "run-20260101T000000Z-aaaaaa.js")
    assert run_page["compare_with"] == [{"page": pair, "other": "20260102T000000Z-bbbbbb"}]


def test_runs_of_other_tasks_or_samples_are_not_paired(tmp_path):
    a = _write_run(tmp_path / "a", "20260101T000000Z-aaaaaa", "m", {i: 1.0 for i in IDS})
    b = _write_run(tmp_path / "b", "20260102T000000Z-bbbbbb", "m", {i: 1.0 for i in IDS}, task="arc_easy")
    c = _write_run(tmp_path / "c", "20260103T000000Z-cccccc", "m", {i: 1.0 for i in IDS[:10]})
    site.build(tmp_path / "none.csv", [str(tmp_path / "*")], tmp_path / "site")
    assert sorted(p.name for p in (tmp_path / "site" / "runs").iterdir()) == [
        f"{r}.html" for r in ("20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb", "20260103T000000Z-cccccc")]
    assert not list((tmp_path / "site" / "compare").iterdir())
    assert {a, b, c} <= set(site.find_runs([str(tmp_path)]))


def test_leaderboard_cells_are_the_markdown_cells_and_link_to_runs_in_the_site(two_runs, tmp_path):
    board = tmp_path / "lb.csv"
    rows = [{"time": f"2026-01-0{k}T00:00:00+00:00", "run_id": run_id, "model": model, "checkpoint_sha": "abc",
             "task": "mmlu", "task_version": "v1", "num_fewshot": 0, "metric": "acc", "value": value, "stderr": 0.05,
             "n": 60, "n_unscored": 0, "dtype": "float32", "split": "test", "contamination": contamination}
            for k, (run_id, model, value, contamination) in enumerate([
                ("20260101T000000Z-aaaaaa", "model-a", 0.5, ""), ("20260102T000000Z-bbbbbb", "model-b", 0.25, "0.2"),
                ("elsewhere-run", "model-c", 0.75, "")], start=1)]
    append_rows(board, rows)
    site.build(board, [str(p) for p in two_runs], tmp_path / "site")
    lb = _data(tmp_path / "site", "index.js")["leaderboard"]
    assert lb["columns"] == ["mmlu/acc"] and [r["model"] for r in lb["rows"]] == ["model-a", "model-b", "model-c"]
    cells = [r["cells"][0] for r in lb["rows"]]
    assert [c["text"] for c in cells] == ["50.0 ± 5.0", "25.0 ± 5.0 †", "75.0 ± 5.0"]
    assert [c["page"] for c in cells] == ["20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb", None]
    assert "† the model may have seen this test data" in lb["notes"] and "model-b on mmlu: 20.0%" in lb["notes"]


def test_training_page_data(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    parent = {"id": "pretrain-20260101T000000Z-aaaaaa", "recipe": "pretrain", "parent": None}
    (folder / "provenance.json").write_text(json.dumps({
        "id": "instruct-20260102T000000Z-bbbbbb", "recipe": "instruct", "n_params": 10, "tokens": 99,
        "config": {"train": {"model": {"arch": "gpt"}}}, "parent": {"name": "x", "provenance": parent}}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "train_loss": 3.0, "lr": 0.1}, {"step": 2, "train_loss": 2.5, "val_loss": 2.8, "lr": 0.05}])
        + '{"step": 3, "train_l')                              # a line cut short by a kill
    site.build(tmp_path / "none.csv", [str(folder)], tmp_path / "site")
    data = _data(tmp_path / "site", "train-instruct-20260102T000000Z-bbbbbb.js")
    assert data["series"] == {"train_loss": [[1, 3.0], [2, 2.5]], "val_loss": [[2, 2.8]], "lr": [[1, 0.1], [2, 0.05]]}
    assert [s["id"] for s in data["lineage"]] == ["instruct-20260102T000000Z-bbbbbb", "pretrain-20260101T000000Z-aaaaaa"]
    assert [s["page"] for s in data["lineage"]] == ["instruct-20260102T000000Z-bbbbbb", None]   # the parent is not in the site
    assert data["model"] == {"arch": "gpt"}


def test_a_crash_leaves_the_previous_site(two_runs, tmp_path, monkeypatch):
    out = tmp_path / "site"
    site.build(tmp_path / "none.csv", [str(two_runs[0])], out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def crash(*_):
        raise RuntimeError("disk full")
    monkeypatch.setattr(site, "write_site", crash)
    with pytest.raises(RuntimeError):
        site.build(tmp_path / "none.csv", [str(p) for p in two_runs], out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "site"]   # no temporary folder left


def _view(*args, cwd):
    return run_module("harness.view", *args, cwd=cwd)


def _one_error(p, *expected):
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr
    for text in expected:
        assert text in p.stderr


def test_cli_builds_and_rebuilds(two_runs, tmp_path):
    out = tmp_path / "results" / "site"
    for _ in range(2):
        p = _view(f"runs=[{two_runs[0]},{two_runs[1]}]", f"out_dir={out}", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == str(out / "index.html")
    assert len(list((out / "compare").iterdir())) == 1


def test_cli_bad_inputs(two_runs, tmp_path):
    _one_error(_view(cwd=tmp_path), "results/leaderboard.csv", "outputs/ and multirun/", "python -m harness task=")
    (tmp_path / "empty").mkdir()
    _one_error(_view("runs=[empty]", cwd=tmp_path), "runs=empty is neither an eval run")
    _one_error(_view("runs=[missing]", cwd=tmp_path), "runs=missing: no such folder")
    _one_error(_view("host=0.0.0.0", cwd=tmp_path), "host=0.0.0.0", "127.0.0.1 only")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "leaderboard.csv").write_text("keep me")
    _one_error(_view(f"runs=[{two_runs[0]}]", "out_dir=results", cwd=tmp_path), "is not a site written by harness.view")
    assert (tmp_path / "results" / "leaderboard.csv").read_text() == "keep me"
