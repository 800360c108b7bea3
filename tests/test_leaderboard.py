"""The leaderboard CSV under concurrent appends: no torn or interleaved rows, one header."""
import csv
import multiprocessing as mp

import pytest

from harness.report.store import COLUMNS, LeaderboardError, append_rows, read_leaderboard

PROCS, CALLS, ROWS_PER_CALL = 8, 25, 2   # 8 processes x 50 rows


def _row(proc: int, call: int, k: int) -> dict:
    return dict(time="2026-01-01T00:00:00+00:00", run_id=f"p{proc}-c{call}", model="m",
                checkpoint_sha="0123abc", provenance='parent "x", with, commas', task="t",
                task_version="v", num_fewshot=0, metric=f"acc/{k}", value=0.1 * proc, stderr=None,
                n=10, n_unscored=0, seed=1, dtype="float32", device="cpu", batch_size=8,
                harness_version="0.1.0", wall_s=1.5, judge_model="", judge_digest="")


def _worker(path: str, proc: int, barrier) -> None:
    barrier.wait()
    for call in range(CALLS):
        append_rows(path, [_row(proc, call, k) for k in range(ROWS_PER_CALL)])


def test_concurrent_appends_never_tear(tmp_path):
    path = str(tmp_path / "sub" / "leaderboard.csv")
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(PROCS)
    procs = [ctx.Process(target=_worker, args=(path, i, barrier)) for i in range(PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == COLUMNS
    data = rows[1:]
    assert len(data) == PROCS * CALLS * ROWS_PER_CALL == 400
    assert all(len(r) == len(COLUMNS) for r in data)
    assert sum(r == COLUMNS for r in rows) == 1
    run_ids = [r[COLUMNS.index("run_id")] for r in data]
    for i in range(0, len(data), ROWS_PER_CALL):   # one call's rows stay together
        assert len(set(run_ids[i:i + ROWS_PER_CALL])) == 1
    assert len(set(run_ids)) == PROCS * CALLS
    df = read_leaderboard(path)
    assert len(df) == 400 and list(df.columns) == COLUMNS
    assert df["checkpoint_sha"].eq("0123abc").all()
    assert df["provenance"].eq('parent "x", with, commas').all()
    assert df["stderr"].isna().all() and df["n"].eq(10).all()


def test_header_mismatch_raises(tmp_path):
    path = tmp_path / "lb.csv"
    path.write_text("time,model,value\n2026,m,1\n")
    before = path.read_bytes()
    with pytest.raises(LeaderboardError, match="header"):
        append_rows(path, [_row(0, 0, 0)])
    assert path.read_bytes() == before


def test_unknown_column_raises_and_writes_nothing(tmp_path):
    path = tmp_path / "lb.csv"
    append_rows(path, [_row(0, 0, 0)])
    before = path.read_bytes()
    with pytest.raises(LeaderboardError, match="bogus"):
        append_rows(path, [dict(_row(0, 1, 0), bogus=1)])
    assert path.read_bytes() == before
    assert len(read_leaderboard(path)) == 1


# --- one row per call from 8 processes, and the old-header migration racing with them ---------

APPENDS = 100
OLD_COLUMNS = COLUMNS[:COLUMNS.index("judge_digest") + 1]   # the header before split/parent/...


def _one_row_worker(path: str, proc: int, barrier) -> None:
    barrier.wait()
    for i in range(APPENDS):
        append_rows(path, [dict(_row(proc, i, 0), run_id=f"p{proc}-i{i}", split="test",
                                parent=f"parent-{proc}", trained_on="sms_spam/train")])


def _race(path: str) -> None:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(PROCS)
    procs = [ctx.Process(target=_one_row_worker, args=(path, i, barrier)) for i in range(PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def _old_file(path, rows: int) -> list[list[str]]:
    old = [[f"2025-01-0{k + 1}T00:00:00+00:00", f"old-{k}", "m", "sha", "line one\nline two", "t", "v",
            "0", "acc", "0.5", "", "10", "0", "1", "float32", "cpu", "8", "0.0.1", "1.0", "", ""]
           for k in range(rows)]
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([OLD_COLUMNS, *old])
    return old


def _check_race(path: str, old: list[list[str]]) -> None:
    with open(path, newline="") as f:
        text = f.read()
    assert text.endswith("\n")
    rows = list(csv.reader(text.splitlines(keepends=True)))
    assert rows[0] == COLUMNS and sum(r == COLUMNS for r in rows) == 1
    assert all(len(r) == len(COLUMNS) for r in rows)          # no torn or glued lines
    df = read_leaderboard(path)
    assert len(df) == len(old) + PROCS * APPENDS
    new = df[df.run_id.str.startswith("p")]
    assert sorted(new.run_id) == sorted(f"p{p}-i{i}" for p in range(PROCS) for i in range(APPENDS))
    assert (new.parent == [f"parent-{r.split('-')[0][1:]}" for r in new.run_id]).all()
    assert new.split.eq("test").all() and new.trained_on.eq("sms_spam/train").all()
    for p in range(PROCS):   # each process's rows keep their order
        mine = list(new[new.parent == f"parent-{p}"].run_id)
        assert mine == [f"p{p}-i{i}" for i in range(APPENDS)]
    assert rows[1:1 + len(old)] == [r + [""] * (len(COLUMNS) - len(r)) for r in old]   # migrated first, intact


def test_800_single_row_appends(tmp_path):
    path = str(tmp_path / "lb.csv")
    _race(path)
    _check_race(path, [])


def test_header_migration_races_with_appends(tmp_path):
    path = tmp_path / "lb.csv"
    old = _old_file(path, 3)
    _race(str(path))
    _check_race(str(path), old)


def test_migration_is_atomic_and_keeps_old_rows(tmp_path):
    path = tmp_path / "lb.csv"
    old = _old_file(path, 2)
    inode = path.stat().st_ino
    df_before = read_leaderboard(path)                 # an old file reads with the new columns, empty
    assert list(df_before.columns) == COLUMNS and (df_before.parent == "").all()
    append_rows(path, [dict(_row(0, 0, 0), parent="base", contamination="none")])
    assert path.stat().st_ino != inode                # replaced by rename, not rewritten in place
    assert (tmp_path / "lb.csv.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lb.csv", "lb.csv.lock"]   # no temp file left
    df = read_leaderboard(path)
    assert list(df.run_id) == ["old-0", "old-1", "p0-c0"]
    assert df.provenance.iloc[0] == "line one\nline two"
    assert list(df.parent) == ["", "", "base"] and list(df.contamination) == ["", "", "none"]
    append_rows(path, [_row(1, 0, 0)])                 # now a current file: plain append
    assert len(read_leaderboard(path)) == 3 + 1 and len(old) == 2


def test_migration_refuses_a_row_wider_than_its_header(tmp_path):
    path = tmp_path / "lb.csv"
    _old_file(path, 1)
    with open(path, "a") as f:
        f.write(",".join(["x"] * (len(OLD_COLUMNS) + 1)) + "\n")
    before = path.read_bytes()
    with pytest.raises(LeaderboardError, match="Expected 21 fields in line 3, saw 22"):
        append_rows(path, [_row(0, 0, 0)])
    assert path.read_bytes() == before


def test_the_store_does_not_know_the_renderer():
    """Data flows one way: the engine appends through harness.report.store; the renderer and compare
    read. Importing the store (what every eval run does) loads neither."""
    import subprocess
    import sys

    code = ("import sys, harness.report.store; "
            "print([m for m in ('harness.report.render', 'harness.report.compare', 'harness.leaderboard') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert out.stdout.strip() == "[]"
