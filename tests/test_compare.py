"""Paired comparison of two runs: the statistics against hand-computed values, the CLI's refusals,
and an end-to-end comparison of two real runs."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from harness.report.compare import CompareError, compare, data_hash, load_run
from harness.records import RecordWriter, load_records
from harness.report.stats import (binomial_two_sided_half, mcnemar_exact, mean_stderr, normal_ci,
                           paired_bootstrap)
from tasks.base import Record

from clitools import run_module


# --- harness.report.stats ------------------------------------------------------------------------------

def test_mcnemar_exact_hand_computed():
    # b=8 discordant pairs favour a, c=2 favour b: p = 2 * (C(10,0)+C(10,1)+C(10,2)) / 2^10 = 112/1024
    a = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 3, dtype=float)
    b = np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] * 3, dtype=float)
    r = mcnemar_exact(a, b)
    assert (r.n, r.a_only, r.b_only) == (18, 8, 2)
    assert r.p_value == 0.109375
    assert mcnemar_exact(b, a).p_value == 0.109375
    assert binomial_two_sided_half(5, 10) == 1.0 and binomial_two_sided_half(0, 0) == 1.0
    assert binomial_two_sided_half(0, 1) == 1.0 and binomial_two_sided_half(0, 5) == 2 / 32


def test_mcnemar_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(8, 10), (3, 17), (0, 12), (40, 100), (250, 480)]:
        assert binomial_two_sided_half(k, n) == pytest.approx(stats.binomtest(k, n, 0.5).pvalue, rel=1e-12)


def test_mcnemar_rejects_non_binary():
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0.5, 1.0], [1.0, 0.0])


def test_mean_stderr_and_normal_ci():
    mean, se = mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)     # std (ddof=1) = sqrt(5/3)
    assert mean_stderr([3.0]) == (3.0, None)
    low, high = normal_ci(0.5, 0.1)
    assert low == pytest.approx(0.5 - 0.1959964, abs=1e-7) and high == pytest.approx(0.5 + 0.1959964, abs=1e-7)


def test_paired_bootstrap_exact_cases():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    same = paired_bootstrap(a, a, n_resamples=500)
    assert (same.difference, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    shift = paired_bootstrap(a + 0.5, a, n_resamples=999)   # every resample differs by exactly 0.5
    assert shift.difference == 0.5 and shift.ci_low == pytest.approx(0.5) and shift.ci_high == pytest.approx(0.5)
    assert shift.p_value == 1 / 1000                          # the smallest p 999 resamples can give
    w = paired_bootstrap([1.0, 0.0], [0.0, 0.0], n_resamples=10, weights=[3.0, 1.0])
    assert w.mean_a == 0.75 and w.difference == 0.75          # weighted mean (3*1 + 1*0) / 4


def test_paired_bootstrap_is_seeded_and_close_to_normal_theory():
    rng = np.random.default_rng(7)
    a = rng.normal(0.3, 1.0, 2000)
    b = a + rng.normal(-0.1, 0.5, 2000)
    r1, r2 = paired_bootstrap(a, b, seed=3), paired_bootstrap(a, b, seed=3)
    assert r1 == r2
    assert paired_bootstrap(a, b, seed=4) != r1
    d = a - b
    low, high = normal_ci(d.mean(), d.std(ddof=1) / math.sqrt(d.size))
    assert r1.ci_low == pytest.approx(low, abs=0.01) and r1.ci_high == pytest.approx(high, abs=0.01)
    assert r1.p_value < 0.001 and r1.n_resamples == 10_000


# --- harness.compare on records written by the real RecordWriter ---------------------------------

def fake_run(folder: Path, scores: dict, task="mmlu", version="v1", model="m", targets=None,
             prompt_hash="h") -> Path:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"key": {"task": task, "task_version": version, "model": model,
                                                         "seed": 1234}, "run_id": "x", "scoring_s": 0.0}))
    with RecordWriter(folder / "records.jsonl") as w:
        w.write([Record(sample_id=i, prompt_hash=prompt_hash, prediction=None, target=(targets or {}).get(i),
                        scores=s)
                 for i, s in scores.items()])
    return folder


def acc_runs(tmp_path):
    a = [1] * 8 + [0] * 2 + [1] * 5 + [0] * 3 + [None, 1]
    b = [0] * 8 + [1] * 2 + [1] * 5 + [0] * 3 + [1, None]
    ids = [f"s{i:02d}" for i in range(len(a))]
    ra = fake_run(tmp_path / "a", {i: {"acc": v} for i, v in zip(ids, a)}, model="model-a")
    rb = fake_run(tmp_path / "b", {i: {"acc": v} for i, v in zip(ids, b)}, model="model-b")
    return ra, rb


def test_compare_accuracy_runs(tmp_path):
    ra, rb = acc_runs(tmp_path)
    r = compare(load_run(ra, "a"), load_run(rb, "b"))
    assert r["metric"] == "acc" and r["test"] == "mcnemar_exact"
    assert r["mcnemar"] == {"a_right_b_wrong": 8, "a_wrong_b_right": 2, "p_value": 0.109375}
    assert r["p_value"] == 0.109375 and r["n_paired"] == 18
    assert r["unscored"] == {"a": ["s18"], "b": ["s19"], "excluded": 2}
    assert r["a"]["mean"] == 13 / 18 and r["b"]["mean"] == 7 / 18
    assert r["difference"] == pytest.approx(6 / 18)
    assert r["ci95"][0] < 6 / 18 < r["ci95"][1]


def test_compare_real_valued_scores(tmp_path):
    scores_a = {f"q{i}": {"score": float(s)} for i, s in enumerate([7, 8, 6, 9, 7, 8, 5, 9, 8, 7])}
    scores_b = {f"q{i}": {"score": float(s)} for i, s in enumerate([6, 8, 5, 7, 7, 6, 5, 8, 6, 7])}
    ra = fake_run(tmp_path / "a", scores_a, task="instruct")
    rb = fake_run(tmp_path / "b", scores_b, task="instruct")
    r = compare(load_run(ra, "a"), load_run(rb, "b"), n_resamples=2000)
    assert r["test"] == "paired_bootstrap" and "mcnemar" not in r
    assert r["difference"] == pytest.approx(0.9) and r["ci95"][0] > 0 and r["p_value"] < 0.05


def test_compare_perplexity_records(tmp_path):
    docs = {"d0": (-120.0, -100.0, 40), "d1": (-300.0, -310.0, 100), "d2": (-50.0, -45.0, 20)}
    ra = fake_run(tmp_path / "a", {k: {"loglikelihood": a, "words": w, "bytes": 5 * w} for k, (a, _, w) in docs.items()},
                  task="wikitext2")
    rb = fake_run(tmp_path / "b", {k: {"loglikelihood": b, "words": w, "bytes": 5 * w} for k, (_, b, w) in docs.items()},
                  task="wikitext2")
    r = compare(load_run(ra, "a"), load_run(rb, "b"), n_resamples=500)
    assert r["metric"] == "loglikelihood_per_word"
    assert r["a"]["mean"] == pytest.approx(-470 / 160)                 # corpus total / total words
    assert r["a"]["word_perplexity"] == pytest.approx(math.exp(470 / 160))
    assert r["b"]["word_perplexity"] == pytest.approx(math.exp(455 / 160))


def test_compare_refuses_incomparable_runs(tmp_path):
    ra = fake_run(tmp_path / "a", {"s1": {"acc": 1}, "s2": {"acc": 0}, "s3": {"acc": 1}})
    rb = fake_run(tmp_path / "b", {"s1": {"acc": 1}, "s4": {"acc": 0}, "s5": {"acc": 0}})
    with pytest.raises(CompareError, match="2 only in a, 2 only in b"):
        compare(load_run(ra, "a"), load_run(rb, "b"))
    # another task version over the same data is compared (below); over other data it is refused
    rv = fake_run(tmp_path / "v", {"s1": {"acc": 1}, "s2": {"acc": 0}, "s3": {"acc": 1}}, version="v2",
                  targets={"s2": "B"})
    with pytest.raises(CompareError, match=r"different data: sample s2 has data hash \w+ in a, \w+ in b \(1 of 3 samples differ\)"):
        compare(load_run(ra, "a"), load_run(rv, "b"))
    rt = fake_run(tmp_path / "t", {"s1": {"acc": 1}}, task="arc")
    with pytest.raises(CompareError, match="tasks differ"):
        compare(load_run(ra, "a"), load_run(rt, "b"))
    with pytest.raises(CompareError, match="metric 'f1' is not in both"):
        compare(load_run(ra, "a"), load_run(ra, "b"), metric="f1")


def cli(*args):
    """`python -m harness.compare args`, run in this process (same status and output)."""
    return run_module("harness.compare", *args)


def one_error(p, needle):
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and needle in p.stderr, p.stderr


def test_cli_report_json_and_errors(tmp_path):
    ra, rb = acc_runs(tmp_path)
    out = tmp_path / "cmp.json"
    p = cli(f"a={ra}", f"b={rb}", f"out={out}", "n_resamples=1000")
    assert p.returncode == 0, p.stderr
    assert "p-value     0.109375 (exact McNemar, two-sided)" in p.stdout
    assert "a right & b wrong: 8, a wrong & b right: 2" in p.stdout
    assert "unscored a  s18" in p.stdout and "unscored b  s19" in p.stdout
    assert json.loads(out.read_text())["p_value"] == 0.109375
    one_error(cli(f"a={ra}"), "missing value for b")
    one_error(cli(f"a={ra}", f"b={tmp_path / 'absent'}"), "no such run folder")
    only = fake_run(tmp_path / "c", {"s00": {"acc": 1}})
    one_error(cli(f"a={ra}", f"b={only}", f"out={tmp_path / 'no.json'}"), "19 only in a, 0 only in b")
    assert not (tmp_path / "no.json").exists()


def harness(*args):
    return run_module("harness", *args)


def test_end_to_end_two_real_runs(tmp_path):
    runs = {}
    for model in ("gpt-tiny", "llama-tiny"):
        runs[model] = tmp_path / model
        p = harness("task=sms_spam", f"model={model}", "task.limit=20", f"leaderboard={tmp_path / 'lb.csv'}",
                    f"hydra.run.dir={runs[model]}")
        assert p.returncode == 0, p.stderr
    out = tmp_path / "cmp.json"
    p = cli(f"a={runs['gpt-tiny']}", f"b={runs['llama-tiny']}", f"out={out}")
    assert p.returncode == 0, p.stderr
    assert "p-value" in p.stdout and "gpt-tiny" in p.stdout and "llama-tiny" in p.stdout
    result = json.loads(out.read_text())
    # recount the discordant pairs straight from the records
    a = {r.sample_id: r.scores["acc"] for r in load_records(runs["gpt-tiny"] / "records.jsonl")}
    b = {r.sample_id: r.scores["acc"] for r in load_records(runs["llama-tiny"] / "records.jsonl")}
    assert len(a) == len(b) == 20 and result["n_paired"] == 20
    a_only = sum(a[i] == 1 and b[i] == 0 for i in a)
    b_only = sum(a[i] == 0 and b[i] == 1 for i in a)
    assert result["mcnemar"]["a_right_b_wrong"] == a_only and result["mcnemar"]["a_wrong_b_right"] == b_only
    assert result["p_value"] == binomial_two_sided_half(a_only, a_only + b_only)


# --- prompt variants of the same data pair; other data does not ---------------------------------

def test_data_hash_ignores_prompt_fields_only():
    base = Record("anatomy/test/0000-ab", "p0", "A", "B", {"acc": 0.0},
                  {"subject": "anatomy", "loglikelihoods": [-1.0, -2.0, -3.0, -4.0]})
    shots = Record("anatomy/test/0000-ab", "p5", "B", "B", {"acc": 1.0},
                   {"subject": "anatomy", "num_fewshot": 3, "loglikelihoods": [-5.0, -1.0, -6.0, -7.0]})
    assert data_hash(base) == data_hash(shots)
    for other in (Record(base.sample_id, "p0", "A", "C", {"acc": 0.0}, dict(base.extra)),          # answer
                  Record(base.sample_id, "p0", "A", "B", {"acc": 0.0}, {"subject": "virology",
                                                                         "loglikelihoods": [0.0] * 4}),
                  Record(base.sample_id, "p0", "A", "B", {"acc": 0.0}, {"subject": "anatomy",
                                                                         "loglikelihoods": [0.0] * 3})):
        assert data_hash(other) != data_hash(base)


def test_other_task_version_same_data_is_compared_with_a_note(tmp_path):
    scores = {"s1": {"acc": 1}, "s2": {"acc": 0}, "s3": {"acc": 1}}
    ra = fake_run(tmp_path / "a", scores, targets={"s1": "A", "s2": "C", "s3": "D"})
    rb = fake_run(tmp_path / "b", {"s1": {"acc": 0}, "s2": {"acc": 0}, "s3": {"acc": 1}}, version="v2",
                  targets={"s1": "A", "s2": "C", "s3": "D"}, prompt_hash="h5")
    r = compare(load_run(ra, "a"), load_run(rb, "b"), n_resamples=100)
    assert r["note"] == ("prompt settings differ (task version v1 vs v2; 3 of 3 prompts differ); "
                         "paired on the same data by sample id and data hash")
    assert r["mcnemar"] == {"a_right_b_wrong": 1, "a_wrong_b_right": 0, "p_value": 1.0}
    assert (r["a"]["task_version"], r["b"]["task_version"]) == ("v1", "v2")
    assert compare(load_run(ra, "a"), load_run(ra, "b"), n_resamples=100)["note"] is None


def mmlu_run(tmp_path, name, *args):
    folder = tmp_path / name
    p = harness("task=mmlu", "model=gpt-tiny", "task.limit=12", f"leaderboard={tmp_path / 'lb.csv'}",
                f"hydra.run.dir={folder}", *args)
    assert p.returncode == 0, p.stderr
    return folder


def test_zero_vs_five_shot_mmlu_pair_and_other_data_is_refused(tmp_path):
    zero = mmlu_run(tmp_path, "zero", "task.subjects=[anatomy]", "task.num_fewshot=0")
    five = mmlu_run(tmp_path, "five", "task.subjects=[anatomy]", "task.num_fewshot=5")
    assert json.loads((zero / "run.json").read_text())["key"]["task_version"] != \
        json.loads((five / "run.json").read_text())["key"]["task_version"]
    out = tmp_path / "cmp.json"
    p = cli(f"a={five}", f"b={zero}", f"out={out}", "n_resamples=1000")
    assert p.returncode == 0, p.stderr
    assert ("note        prompt settings differ (task.num_fewshot 5 vs 0; 12 of 12 prompts differ); "
            "paired on the same data by sample id and data hash\n") in p.stdout
    result = json.loads(out.read_text())
    a = {r.sample_id: r.scores["acc"] for r in load_records(five / "records.jsonl")}
    b = {r.sample_id: r.scores["acc"] for r in load_records(zero / "records.jsonl")}
    a_only = sum(a[i] == 1 and b[i] == 0 for i in a)
    b_only = sum(a[i] == 0 and b[i] == 1 for i in a)
    assert result["n_paired"] == 12 and (a_only, b_only) == (result["mcnemar"]["a_right_b_wrong"],
                                                             result["mcnemar"]["a_wrong_b_right"])
    assert result["p_value"] == binomial_two_sided_half(a_only, a_only + b_only)
    assert f"p-value     {result['p_value']:.6g} (exact McNemar, two-sided)" in p.stdout

    other = mmlu_run(tmp_path, "astronomy", "task.subjects=[astronomy]", "task.num_fewshot=5")
    one_error(cli(f"a={five}", f"b={other}"), "12 only in a, 12 only in b (e.g. anatomy/test/0000-")
    # the same sample ids over other data (a data file edited between the runs): one answer changed
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "run.json").write_text((zero / "run.json").read_text())
    records = load_records(zero / "records.jsonl")
    wrong = {"A": "B", "B": "C", "C": "D", "D": "A"}[records[4].target]
    records[4] = Record(**{**records[4].__dict__, "target": wrong})
    with RecordWriter(edited / "records.jsonl") as w:
        w.write(records)
    one_error(cli(f"a={five}", f"b={edited}"), f"different data: sample {records[4].sample_id} has data hash")
