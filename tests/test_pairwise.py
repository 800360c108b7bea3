"""Pairwise verdict statistics: FastChat's `[[A]]` parse, MT-Bench's swap rule, rates with CIs and
the AlpacaEval-2-style length-controlled win rate, on hand-computed and synthetic verdict sets."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from harness.cli import UserError
from harness.pairwise import (
    PairVerdict,
    PairwiseError,
    combine,
    length_controlled,
    parse_verdict,
    summarise,
    wilson_ci,
)


@pytest.mark.parametrize("reply, verdict", [
    ("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"),
    ("Assistant A is more accurate.\n\nFinal verdict: [[A]]", "A"),
    ("Both are equally good. [[C]]", "tie"),
    ("Verdict:[[B]].", "B"),
    # FastChat tests [[A]], then [[B]], then [[C]]: the first token present wins, wherever it sits
    ("[[B]] ... on reflection [[A]]", "A"),
    ("Output [[C]] for a tie; here: [[B]]", "B"),
    # anything else is unscored
    ("", None), (None, None), ("A", None), ("[A]", None), ("[[a]]", None), ("[[ A ]]", None),
    ("Assistant A is better.", None), ("[[tie]]", None), ("[[D]]", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


# first: the model shown as A; swapped: the model shown as B. A verdict that flips with the order
# (the judge followed the position) is a tie.
@pytest.mark.parametrize("first, swapped, outcome, consistent", [
    ("A", "B", "win", True), ("B", "A", "loss", True), ("tie", "tie", "tie", True),
    ("A", "A", "tie", False), ("B", "B", "tie", False),
    ("A", "tie", "tie", False), ("tie", "B", "tie", False),
    ("B", "tie", "tie", False), ("tie", "A", "tie", False),
    (None, "B", None, None), ("A", None, None, None), (None, None, None, None),
])
def test_swap_rule_truth_table(first, swapped, outcome, consistent):
    assert combine(first, swapped) == PairVerdict(outcome, consistent, first, swapped)


def test_combine_refuses_raw_labels():
    with pytest.raises(PairwiseError, match="pass parse_verdict") as e:
        combine("[[A]]", "B")
    assert isinstance(e.value, UserError)


def test_wilson_ci_hand_computed_and_against_scipy():
    # 2 of 4, z = 1.959964: centre 0.5, half = z/(1 + z^2/4) * sqrt(1/16 + z^2/64) = 0.349961
    lo, hi = wilson_ci(2, 4)
    assert lo == pytest.approx(0.150039, abs=1e-6) and hi == pytest.approx(0.849961, abs=1e-6)
    for k, n in [(0, 5), (1, 5), (2, 5), (5, 5), (37, 120)]:
        ref = binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_ci(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert wilson_ci(0, 0) is None


VERDICTS = [combine("A", "B"), combine("A", "B"), combine("B", "A"), combine("tie", "tie"),
            combine("A", "A"), combine(None, "B"), combine("A", None)]


def test_summary_hand_computed():
    s = summarise(VERDICTS, n_resamples=2000, seed=3)
    # 7 pairs, 2 unscored; of 5 scored: 2 wins, 2 ties (one agreed, one flipped), 1 loss
    assert (s.n_pairs, s.unscored) == (7, 2)
    assert (s.win.k, s.win.n, s.win.rate) == (2, 5, 0.4)
    assert (s.tie.k, s.tie.n, s.tie.rate) == (2, 5, 0.4)
    assert (s.loss.k, s.loss.n, s.loss.rate) == (1, 5, 0.2)
    assert s.win.ci == pytest.approx((0.117621, 0.769276), abs=1e-6)
    assert s.loss.ci == pytest.approx((0.036224, 0.624465), abs=1e-6)
    # 5 pairs parsed in both orders, 4 agreed
    assert (s.swap_consistency.k, s.swap_consistency.n, s.swap_consistency.rate) == (4, 5, 0.8)
    assert s.swap_consistency.ci == pytest.approx((0.375535, 0.963776), abs=1e-6)
    assert s.win_rate_adjusted == pytest.approx(0.6)          # (2 + 2/2) / 5
    # resampled means of {1, 1, .5, .5, 0} are multiples of 0.1; their 2.5%/97.5% points here:
    assert s.win_rate_adjusted_ci == pytest.approx((0.3, 0.9))
    assert summarise(VERDICTS, n_resamples=2000, seed=3) == s                    # seeded


def test_bootstrap_is_seeded():
    many = VERDICTS * 40
    a, b = (summarise(many, n_resamples=500, seed=k).win_rate_adjusted_ci for k in (0, 1))
    assert summarise(many, n_resamples=500, seed=0).win_rate_adjusted_ci == a and a != b
    assert a[0] < 0.6 < a[1]


def test_summary_degenerate_sets():
    all_wins = summarise([combine("A", "B")] * 3)
    assert all_wins.win_rate_adjusted == 1.0 and all_wins.win_rate_adjusted_ci == (1.0, 1.0)
    assert all_wins.win.ci == pytest.approx((0.438503, 1.0), abs=1e-6)
    none = summarise([combine(None, None), combine("A", None)])
    assert (none.n_pairs, none.unscored, none.win.rate, none.win.ci) == (2, 2, None, None)
    assert none.swap_consistency.n == 0 and none.win_rate_adjusted is None
    assert summarise([]).n_pairs == 0


def _length_driven(seed: int, n: int = 2000, longer_wins: float = 0.8, mean_diff: float = 60.0):
    """Verdicts where only length matters: the longer answer wins with probability `longer_wins`;
    the model's answers are longer on average, so its raw win rate is well above 50%."""
    rng = np.random.default_rng(seed)
    d = rng.normal(mean_diff, 100.0, n)
    model_wins = (d > 0) == (rng.random(n) < longer_wins)
    return [combine("A", "B") if w else combine("B", "A") for w in model_wins], d


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_length_controlled_removes_a_pure_length_effect(seed):
    verdicts, d = _length_driven(seed)
    lc = length_controlled(verdicts, d)
    assert lc.n == 2000 and lc.note == ""
    assert lc.raw_win_rate > 0.6                      # length alone buys > 10 points raw
    assert lc.lc_win_rate == pytest.approx(0.5, abs=0.02)
    assert lc.length_coef > 1.0
    assert lc.raw_win_rate == summarise(verdicts, n_resamples=10).win_rate_adjusted


def test_length_controlled_keeps_a_real_quality_gap():
    rng = np.random.default_rng(7)
    d = rng.normal(60.0, 100.0, 2000)                 # lengths unrelated to who wins
    verdicts = [combine("A", "B") if w else combine("B", "A") for w in rng.random(2000) < 0.7]
    lc = length_controlled(verdicts, d)
    assert lc.lc_win_rate == pytest.approx(lc.raw_win_rate, abs=0.02)
    assert lc.lc_win_rate == pytest.approx(0.7, abs=0.03)


def test_length_controlled_ties_unscored_and_degenerate_inputs():
    # ties count half; unscored pairs are skipped (their length difference is ignored)
    v = [combine("A", "B"), combine("tie", "tie"), combine("B", "A"), combine(None, "A")]
    lc = length_controlled(v, [0, 0, 0, 999])
    assert (lc.n, lc.raw_win_rate, lc.lc_win_rate, lc.length_coef) == (3, 0.5, 0.5, None)
    assert lc.note == "no length variation: LC equals raw"
    lc = length_controlled([combine("A", "B")] * 3, [5, -5, 10])
    assert (lc.raw_win_rate, lc.lc_win_rate) == (1.0, 1.0) and lc.note.startswith("all one outcome")
    # a symmetric set: longer wins in both directions, intercept 0 -> LC exactly balanced
    v = [combine("A", "B"), combine("B", "A"), combine("B", "A"), combine("A", "B")]
    lc = length_controlled(v, [10, -10, 10, -10])
    assert lc.raw_win_rate == 0.5 and lc.lc_win_rate == pytest.approx(0.5, abs=1e-6)
    assert length_controlled([combine(None, None)], [1]).lc_win_rate is None
    with pytest.raises(PairwiseError, match="one length difference per sample"):
        length_controlled(v, [1, 2])
    with pytest.raises(PairwiseError, match="finite"):
        length_controlled(v, [1, 2, float("nan"), 4])


def test_summary_refuses_hand_built_outcomes():
    with pytest.raises(PairwiseError, match="build verdicts with combine"):
        summarise([PairVerdict("A", True, "A", "B")])
