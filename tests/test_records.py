"""records.jsonl I/O and the engine's resume semantics, with a fake task and no model."""
import fcntl
import json
import os

import pytest

from harness.evaluate import evaluate
from harness.records import RecordWriter, load_records
from tasks.base import Metric, Record, Sample

from harness.cli import UserError


def rec(i: int) -> Record:
    return Record(sample_id=f"s{i}", prompt_hash="h", prediction=i, target=i, scores={"acc": 1.0})


class FakeTask:
    name = "fake"
    num_fewshot = 0

    def __init__(self, n=10, version="v1", fail_after=None, drop=False):
        self.n, self.version, self.fail_after, self.drop = n, version, fail_after, drop
        self.scored: list[str] = []

    def samples(self):
        return [Sample(f"s{i}", {"i": i}) for i in range(self.n)]

    def score(self, lm, samples):
        if self.fail_after is not None and len(self.scored) >= self.fail_after:
            raise KeyboardInterrupt  # a kill in the middle of a run
        self.scored += [s.id for s in samples]
        out = [rec(s.data["i"]) for s in samples]
        return out[:-1] if self.drop else out

    def metrics(self, records):
        return {"acc": Metric(sum(r.scores["acc"] for r in records) / len(records), None, len(records))}


def test_torn_last_line_is_tolerated_and_repaired(tmp_path):
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as w:
        w.write([rec(0), rec(1), rec(2)])
    with open(path, "ab") as f:
        f.write(rec(3).to_json().encode()[:20])  # killed mid-write
    assert [r.sample_id for r in load_records(path)] == ["s0", "s1", "s2"]
    with RecordWriter(path) as w:
        w.write([rec(4)])
    assert [r.sample_id for r in load_records(path)] == ["s0", "s1", "s2", "s4"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_whole_unterminated_last_line_is_kept(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(rec(0).to_json() + "\n" + rec(1).to_json())
    assert len(load_records(path)) == 2
    with RecordWriter(path) as w:
        w.write([rec(2)])
    assert [r.sample_id for r in load_records(path)] == ["s0", "s1", "s2"]


def test_corrupt_middle_line_raises(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(rec(0).to_json() + "\n{not json\n" + rec(1).to_json() + "\n")
    with pytest.raises(UserError, match=":2:"):
        load_records(path)
    assert load_records(tmp_path / "absent.jsonl") == []


def test_resume_reuses_finished_records(tmp_path):
    task = FakeTask(n=10, fail_after=6)
    with pytest.raises(KeyboardInterrupt):
        evaluate(task, None, tmp_path, seed=1, chunk_size=3)
    assert len(load_records(tmp_path / "records.jsonl")) == 6
    task2 = FakeTask(n=10)
    res = evaluate(task2, None, tmp_path, seed=1, chunk_size=3)
    assert task2.scored == ["s6", "s7", "s8", "s9"]
    assert res.n_reused == 6 and res.n_samples == 10 and res.metrics["acc"].n == 10
    assert len(load_records(tmp_path / "records.jsonl")) == 10
    # nothing left to do: a third run scores nothing and keeps the run id
    task3 = FakeTask(n=10)
    res3 = evaluate(task3, None, tmp_path, seed=1, chunk_size=3)
    assert task3.scored == [] and res3.run_id == res.run_id
    # a smaller sample set only counts its own records
    res4 = evaluate(FakeTask(n=4), None, tmp_path, seed=1)
    assert res4.metrics["acc"].n == 4


def test_changed_task_version_restarts(tmp_path):
    evaluate(FakeTask(n=5), None, tmp_path, seed=1)
    task = FakeTask(n=5, version="v2")
    res = evaluate(task, None, tmp_path, seed=1)
    assert len(task.scored) == 5 and res.n_reused == 0
    assert json.loads((tmp_path / "run.json").read_text())["key"]["task_version"] == "v2"
    assert len(load_records(tmp_path / "records.jsonl")) == 5
    assert len(list(tmp_path.glob("records.stale-*.jsonl"))) == 1


def test_dropped_record_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="exactly one record"):
        evaluate(FakeTask(n=5, drop=True), None, tmp_path, seed=1)


def test_busy_run_dir_is_refused(tmp_path):
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="in use"):
            evaluate(FakeTask(n=2), None, tmp_path, seed=1)
    finally:
        os.close(fd)
