"""Arena ratings: hand-computed Bradley-Terry fits, agreement with scikit-learn's logistic regression
(the way LMSYS fits it), seeded bootstrap, unconnected models reported, bad battles refused."""
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from harness.arena import arena, bootstrap_ratings, fit_ratings, validate_battles
from harness.cli import UserError


def battles(*rows):
    """rows of (model_a, model_b, winner, count)."""
    out = [(a, b, w) for a, b, w, n in rows for _ in range(n)]
    return pd.DataFrame(out, columns=["model_a", "model_b", "winner"])


def test_two_models_ties_count_half_a_win_each_way():
    # A scores 2 + 0.5 = 2.5, B 1 + 0.5 = 1.5: R_A - R_B = 400 log10(2.5 / 1.5) = 88.7395...
    df = battles(("A", "B", "a", 2), ("B", "A", "a", 1), ("A", "B", "tie", 1))
    diff = 400 * math.log10(5 / 3)
    r = fit_ratings(df, anchor="B")
    assert list(r.index) == ["A", "B"]
    assert r["B"] == pytest.approx(1000.0, abs=1e-9)
    assert r["A"] == pytest.approx(1000.0 + diff, abs=1e-6)
    assert diff == pytest.approx(88.7395, abs=1e-4)
    # no anchor: the mean sits at 1000, as LMSYS's min-norm unpenalised fit gives
    r = fit_ratings(df)
    assert r["A"] == pytest.approx(1000.0 + diff / 2, abs=1e-6)
    assert r["B"] == pytest.approx(1000.0 - diff / 2, abs=1e-6)
    # the anchor sits wherever it is asked to
    assert fit_ratings(df, anchor="A", anchor_rating=1114.0)["B"] == pytest.approx(1114.0 - diff, abs=1e-6)


def test_three_models_with_exact_strength_ratios():
    # strengths 4 : 2 : 1 and win counts in exactly those ratios (A-B 2:1, B-C 2:1, A-C 4:1), so the
    # score equations hold at R_A - R_C = 400 log10 4 = 240.824, R_B - R_C = 400 log10 2 = 120.412
    df = battles(("A", "B", "a", 2), ("A", "B", "b", 1), ("B", "C", "a", 2), ("C", "B", "a", 1),
                 ("A", "C", "a", 4), ("C", "A", "a", 1))
    r = fit_ratings(df, anchor="C")
    assert list(r.index) == ["A", "B", "C"]
    assert r["A"] == pytest.approx(1240.824, abs=1e-3)
    assert r["B"] == pytest.approx(1120.412, abs=1e-3)
    assert r["C"] == pytest.approx(1000.0, abs=1e-9)


def random_battles(seed=0, n=400):
    rng = np.random.default_rng(seed)
    true = {"m1": 1100.0, "m2": 1050.0, "m3": 1000.0, "m4": 900.0}
    names = list(true)
    rows = []
    for _ in range(n):
        a, b = rng.choice(names, 2, replace=False)
        p = 1 / (1 + 10 ** ((true[b] - true[a]) / 400))
        u = rng.random()
        rows.append((a, b, "tie" if u < 0.15 else ("a" if u < 0.15 + 0.85 * p else "b")))
    return pd.DataFrame(rows, columns=["model_a", "model_b", "winner"])


def test_agrees_with_a_direct_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    df = random_battles()
    models = sorted(set(df.model_a) | set(df.model_b))
    col = {m: k for k, m in enumerate(models)}
    X, y, w = [], [], []
    for a, b, win in df.itertuples(index=False):
        x = np.zeros(len(models))
        x[col[a]], x[col[b]] = math.log(10), -math.log(10)
        outcomes = [(1.0, 1.0)] if win == "a" else [(0.0, 1.0)] if win == "b" else [(1.0, .5), (0.0, .5)]
        for yy, ww in outcomes:
            X.append(x), y.append(yy), w.append(ww)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-12, max_iter=100000)
        lr.fit(np.array(X), np.array(y), sample_weight=np.array(w))
    sk = pd.Series(400 * lr.coef_[0] + 1000, index=models)
    sk += 1000 - sk["m3"]
    ours = fit_ratings(df, anchor="m3")
    for m in models:
        assert ours[m] == pytest.approx(sk[m], abs=1e-4)   # 1.6e-7 seen
    assert list(ours.index) == ["m1", "m2", "m3", "m4"]


def test_bootstrap_is_seeded_and_its_interval_holds_the_estimate():
    df = random_battles(seed=1, n=200)
    one, d1 = bootstrap_ratings(df, rounds=50, seed=7, anchor="m3")
    two, d2 = bootstrap_ratings(df, rounds=50, seed=7, anchor="m3")
    pd.testing.assert_frame_equal(one, two)
    assert (d1, d2) == (0, 0) and one.shape == (50, 4)
    other, _ = bootstrap_ratings(df, rounds=50, seed=8, anchor="m3")
    assert not one.equals(other)
    res = arena(df, anchor="m3", rounds=100, seed=7)
    t = res.table
    assert list(t.index) == ["m1", "m2", "m3", "m4"]
    assert ((t.lower <= t.rating) & (t.rating <= t.upper)).all()
    assert t.loc["m3", ["rating", "lower", "upper"]].tolist() == pytest.approx([1000.0] * 3)
    assert (t.loc[["m1", "m2", "m4"], "upper"] - t.loc[["m1", "m2", "m4"], "lower"] > 0).all()
    assert t.battles.sum() == 2 * 200 and t.score.sum() == 200
    assert res.unrated == () and res.never_compared == () and res.dropped_rounds == 0
    # no anchor: every resample is centred on 1000, as the point estimate is
    free, _ = bootstrap_ratings(df, rounds=20, seed=3)
    assert np.allclose(free.mean(axis=1), 1000.0, atol=1e-9)


def test_models_not_connected_to_the_anchor_are_reported_not_rated():
    df = battles(("A", "B", "a", 2), ("B", "A", "a", 1), ("C", "D", "a", 1), ("D", "C", "a", 1),
                 ("B", "E", "a", 1), ("E", "B", "a", 1))
    res = arena(df, anchor="A", rounds=20, seed=0)
    assert res.unrated == ("C", "D")
    assert res.never_compared == (("A", "C"), ("A", "D"), ("A", "E"), ("B", "C"), ("B", "D"),
                                  ("C", "E"), ("D", "E"))
    assert list(res.table.index[-2:]) == ["C", "D"]
    assert res.table.loc[["C", "D"], "rating"].isna().all()
    assert res.table.loc["A", "rating"] == pytest.approx(1000.0)
    # B is 400 log10(2) below A; E met only B and split 1-1, so sits level with B
    assert res.table.loc["B", "rating"] == pytest.approx(1000 - 400 * math.log10(2), abs=1e-6)
    assert res.table.loc["E", "rating"] == pytest.approx(res.table.loc["B", "rating"], abs=1e-6)
    # 5 battles in A's group: most resamples lose E or leave a one-way pair; those are counted
    assert (res.rounds, res.dropped_rounds) == (20, 16)
    assert list(fit_ratings(df, anchor="C").index) == ["C", "D"]
    with pytest.raises(UserError, match="2 unconnected groups of models; name an anchor"):
        fit_ratings(df)


@pytest.mark.parametrize("rows, message", [
    ([("A", "B", "model_a")], "battle row 0: winner 'model_a' is not one of a, b, tie; relabel it"),
    ([("A", "B", "a"), ("A", "A", "tie")], "battle row 1: model 'A' battles itself; drop self-battles"),
    ([("A", None, "a")], "battle row 0: model names must be non-empty strings, got 'A', None"),
    ([], "no battles to rate: give at least one row of model_a, model_b, winner"),
])
def test_bad_battles_are_one_line_user_errors(rows, message):
    df = pd.DataFrame(rows, columns=["model_a", "model_b", "winner"])
    with pytest.raises(UserError) as e:
        validate_battles(df)
    assert str(e.value) == message
    with pytest.raises(UserError):
        arena(df, anchor="A", rounds=5)


def test_refuses_unbounded_ratings_and_unknown_anchor():
    df = battles(("A", "B", "a", 3), ("B", "C", "a", 1), ("C", "B", "a", 1))   # A never lost
    with pytest.raises(UserError, match="^ratings are unbounded: some models won"):
        fit_ratings(df, anchor="B")
    with pytest.raises(UserError, match="^anchor model 'Z' has no battles; pick one of A, B, C$"):
        fit_ratings(df, anchor="Z")
    with pytest.raises(UserError, match="^battles lack column"):
        fit_ratings(df.drop(columns="winner"))
    with pytest.raises(UserError, match="^bootstrap rounds must be a positive integer, got 0$"):
        bootstrap_ratings(battles(("A", "B", "tie", 1)), rounds=0)
