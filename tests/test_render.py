"""The comparable leaderboard table: columns split by comparability keys, latest/best cells, outputs."""

import pandas as pd
import pytest

from clitools import ROOT, run_module
from harness.report.store import append_rows
from harness.report.render import RenderError, build_table, format_cell, load, prepare, render, to_markdown


def row(model, metric, value, *, time, task="mmlu", version="v1aaaa", shots=0, stderr=0.02, n=100,
        unscored=0, sha="sha-a", dtype="float32", judge=("", ""), run=None, **extra):
    return dict(time=time, run_id=run or f"{model}-{time}", model=model, checkpoint_sha=sha, task=task,
                task_version=version, num_fewshot=shots, metric=metric, value=value, stderr=stderr, n=n,
                n_unscored=unscored, seed=1234, dtype=dtype, device="cpu", split="test",
                judge_model=judge[0], judge_digest=judge[1], **extra)


@pytest.fixture
def board(tmp_path):
    path = tmp_path / "lb.csv"
    append_rows(path, [
        row("base", "acc", 0.40, time="2026-01-01T00:00:00+00:00"),
        row("base", "acc", 0.30, time="2026-01-03T00:00:00+00:00"),          # latest, not best
        row("base", "acc", 0.50, time="2026-01-02T00:00:00+00:00", shots=5, version="v2bbbb"),
        row("tuned", "acc", 0.712, time="2026-01-02T00:00:00+00:00", stderr=0.021, n=97, unscored=3,
            parent="base", trained_on="instruction/train"),
        row("tuned", "acc/anatomy", 0.9, time="2026-01-02T00:00:00+00:00"),
        row("tuned", "acc", 0.95, time="2026-01-02T00:00:00+00:00", task="sms_spam", version="s1",
            contamination="0.25"),
        row("base", "acc", 0.55, time="2026-01-02T00:00:00+00:00", task="sms_spam", version="s1",
            contamination="0.0"),                                            # measured, clean: no mark
        row("tuned", "word_perplexity", 30.0, time="2026-01-01T00:00:00+00:00", task="wikitext2", stderr=None),
        row("tuned", "word_perplexity", 20.0, time="2026-01-02T00:00:00+00:00", task="wikitext2", stderr=None),
        row("tuned", "word_perplexity", 25.0, time="2026-01-03T00:00:00+00:00", task="wikitext2", stderr=None),
        # same few-shot count, another task version (new data files): never the same column
        row("base", "acc", 0.6, time="2026-01-04T00:00:00+00:00", task="arc", version="v3cccc"),
        row("tuned", "acc", 0.7, time="2026-01-04T00:00:00+00:00", task="arc", version="v4dddd"),
        # judged task: two judge digests, and the task's own CI rows
        row("tuned", "score", 61.0, time="2026-01-05T00:00:00+00:00", task="instruct", stderr=2.0,
            judge=("llama3", "digest11"), run="j1", judge_unscored_rate=0.04, judge_agreement=0.9),
        row("tuned", "score_ci95_low", 57.5, time="2026-01-05T00:00:00+00:00", task="instruct", stderr=None,
            judge=("llama3", "digest11"), run="j1"),
        row("tuned", "score_ci95_high", 64.5, time="2026-01-05T00:00:00+00:00", task="instruct", stderr=None,
            judge=("llama3", "digest11"), run="j1"),
        row("tuned", "score", 55.0, time="2026-01-05T00:00:00+00:00", task="instruct", stderr=2.0,
            judge=("llama3", "digest22"), run="j2"),
    ])
    return path


def test_columns_split_by_comparability_keys(board):
    table = build_table(prepare(load(board)))
    labels = [c.label for c in table.columns]
    assert labels == ["arc/acc [v:v3cc]", "arc/acc [v:v4dd]",
                      "instruct/score (judge:llama3@digest11)", "instruct/score (judge:llama3@digest22)",
                      "mmlu/acc (0-shot)", "mmlu/acc (5-shot)", "sms_spam/acc", "wikitext2/word_perplexity ↓"]
    # per-subject breakdowns and the CI companions are not columns of their own
    assert not any("anatomy" in lb or "ci95" in lb for lb in labels)
    assert table.models == ["base", "tuned"]
    assert table.info["tuned"] == {"parent": "base", "trained_on": "instruction/train"}
    cells = table.cells
    assert ("tuned", "arc/acc [v:v3cc]") not in cells and ("base", "arc/acc [v:v4dd]") not in cells
    assert cells[("tuned", "instruct/score (judge:llama3@digest11)")].value == 61.0
    assert cells[("tuned", "instruct/score (judge:llama3@digest22)")].value == 55.0


def test_latest_versus_best(board):
    latest = build_table(prepare(load(board)), select="latest").cells
    best = build_table(prepare(load(board)), select="best").cells
    assert latest[("base", "mmlu/acc (0-shot)")].value == 0.30
    assert best[("base", "mmlu/acc (0-shot)")].value == 0.40
    assert latest[("tuned", "wikitext2/word_perplexity ↓")].value == 25.0
    assert best[("tuned", "wikitext2/word_perplexity ↓")].value == 20.0     # lower is better


def test_markdown_cells(board):
    md = to_markdown(build_table(prepare(load(board))))
    lines = md.splitlines()
    assert lines[0] == ("| model | parent | trained_on | arc/acc [v:v3cc] | arc/acc [v:v4dd] | "
                        "instruct/score (judge:llama3@digest11) | instruct/score (judge:llama3@digest22) | "
                        "mmlu/acc (0-shot) | mmlu/acc (5-shot) | sms_spam/acc | wikitext2/word_perplexity ↓ |")
    assert lines[2] == "| base | — | — | 60.0 ± 2.0 | — | — | — | 30.0 ± 2.0 | 50.0 ± 2.0 | 55.0 ± 2.0 | — |"
    assert lines[3] == ("| tuned | base | instruction/train | — | 70.0 ± 2.0 | 61 ± 2 ⟨judge: unscored 4%, "
                        "self-agreement 90%⟩ | 55 ± 2 | "
                        "71.2 ± 2.1 (n=97, 3 unscored) | — | 95.0 ± 2.0 † | 25 |")
    assert lines[-2:] == ["† the model may have seen this test data in training: the fraction of the task's "
                          "samples that share an n-gram with its training data (`contamination`):",
                          "- tuned on sms_spam: 25.0%"]
    assert ("- `mmlu/acc (5-shot)`: task=mmlu, metric=acc, task_version=v2bbbb, num_fewshot=5, dtype=float32, "
            "split=test, judge_model=—, judge_digest=—") in lines


def test_ci95_uses_the_tasks_own_interval(board):
    table = build_table(prepare(load(board)), interval="ci95")
    cols = {c.label: c for c in table.columns}
    judged = cols["instruct/score (judge:llama3@digest11)"]
    assert format_cell(table.cells[("tuned", judged.label)], judged, "ci95") == (
        "61 [57.5, 64.5] ⟨judge: unscored 4%, self-agreement 90%⟩")
    acc = cols["mmlu/acc (0-shot)"]          # normal interval from stderr: 0.30 -/+ 1.96 * 0.02
    assert format_cell(table.cells[("base", acc.label)], acc, "ci95") == "30.0 [26.1, 33.9]"


def test_filters_and_dtype_and_checkpoint_split(tmp_path):
    path = tmp_path / "lb.csv"
    append_rows(path, [row("m", "acc", 0.5, time="2026-01-01T00:00:00+00:00", dtype="float32"),
                       row("m", "acc", 0.6, time="2026-01-01T00:00:00+00:00", dtype="bfloat16"),
                       row("m", "acc", 0.7, time="2026-01-02T00:00:00+00:00", sha="other-weights"),
                       row("m", "acc/anatomy", 0.8, time="2026-01-01T00:00:00+00:00")])
    table = build_table(prepare(load(path), metrics=["acc", "acc/anatomy"]))
    assert [c.label for c in table.columns] == ["mmlu/acc (float32)", "mmlu/acc (bfloat16)", "mmlu/acc/anatomy"]
    assert table.models == ["m@sha-a", "m@other-we"]      # one name, two checkpoints: two rows
    with pytest.raises(RenderError, match="no rows for model 'nope'; the leaderboard has: m"):
        prepare(load(path), models=["nope"])
    with pytest.raises(RenderError, match="select=.*latest"):
        build_table(prepare(load(path)), select="worst")


def test_render_writes_all_outputs(board, tmp_path):
    out = tmp_path / "out"
    markdown, written = render(board, out)
    assert [p.name for p in written] == ["leaderboard.md", "leaderboard_table.csv", "leaderboard.png"]
    assert (out / "leaderboard.md").read_text() == markdown
    png = (out / "leaderboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    tidy = pd.read_csv(out / "leaderboard_table.csv", keep_default_na=False)
    assert len(tidy) == 10 and set(tidy.model) == {"base", "tuned"}
    judged = tidy[tidy.judge_digest == "digest11"].iloc[0]
    assert (float(judged.ci95_low), float(judged.ci95_high), judged.run_id) == (57.5, 64.5, "j1")
    assert sorted(p.name for p in out.iterdir()) == ["leaderboard.md", "leaderboard.png", "leaderboard_table.csv"]


def cli(*args, cwd=ROOT):
    """`python -m harness.leaderboard args`, run in this process (same status and output)."""
    return run_module("harness.leaderboard", *args, cwd=cwd)


def test_cli_prints_table_and_writes_files(board, tmp_path):
    p = cli(f"leaderboard={board}", f"out_dir={tmp_path / 'o'}", "tasks=[mmlu]", "select=best", "plot=false")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == "| model | parent | trained_on | mmlu/acc (0-shot) | mmlu/acc (5-shot) |"
    assert "| base | — | — | 40.0 ± 2.0 | 50.0 ± 2.0 |" in p.stdout
    assert sorted(x.name for x in (tmp_path / "o").iterdir()) == ["leaderboard.md", "leaderboard_table.csv"]


@pytest.mark.parametrize("content", [None, "", "time,model\n"])
def test_cli_missing_or_empty_leaderboard(tmp_path, content):
    board = tmp_path / "lb.csv"
    if content is not None:
        board.write_text(content)
    if content == "time,model\n":
        expect = "not a harness leaderboard"
    else:
        expect = "no leaderboard at" if content is None else "not a readable leaderboard"
    p = cli(f"leaderboard={board}", f"out_dir={tmp_path / 'o'}")
    assert p.returncode == 2
    assert p.stderr.splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: ") and expect in p.stderr
    assert not (tmp_path / "o").exists()


def test_cli_header_only_leaderboard(tmp_path):
    board = tmp_path / "lb.csv"
    append_rows(board, [])
    p = cli(f"leaderboard={board}", f"out_dir={tmp_path / 'o'}")
    assert p.returncode == 2 and p.stderr.strip() == f"error: {board} has no rows yet: run `python -m harness task=...` first"
