"""The leaderboard CSV under concurrent appends: no torn or interleaved rows, one header."""
import csv
import multiprocessing as mp

import pytest

from harness.leaderboard import COLUMNS, LeaderboardError, append_rows, read_leaderboard

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
