"""Arena ratings: Bradley-Terry on the Elo scale from pairwise battles, as Chatbot Arena computes them.

    validate_battles(df)                 -> the battles, checked (model_a, model_b, winner in a/b/tie)
    fit_ratings(df, anchor=..., ...)     -> Elo-scale ratings of the anchor's connected models
    bootstrap_ratings(df, rounds, seed)  -> one row of ratings per resample, plus the dropped count
    arena(df, anchor=..., rounds, seed)  -> ArenaResult: table with 95% intervals, unrated models,
                                            model pairs never compared
    python -m harness.arena runs=...     -> the same from task=pairwise run folders (harness/arena_cli.py)

Model: P(a beats b) = 1 / (1 + base ** ((R_b - R_a) / scale)). LMSYS's `compute_mle_elo` fits this as
a logistic regression without intercept whose design row has +log(base) in a's column and -log(base)
in b's, a win weighted 2 and a tie 1 *each way* (so a tie is half a win for both), then rating =
scale * coef + init (400, 10, 1000), shifted so an anchor model sits at a chosen rating. We solve
the same likelihood by Newton's method (it is concave; a few iterations, exact to ~1e-9 Elo) instead
of calling scikit-learn, so the tests can check the result against a direct LogisticRegression fit
rather than against itself. Ratings are only identified up to a shift inside one connected group
of models, so: with an anchor the anchor is pinned at `anchor_rating`; without one (only allowed
when every model is connected) the mean is pinned there, which is what the min-norm solution LMSYS's
unpenalised fit starts from gives. A model not connected to the anchor by any chain of battles has
no rating relative to it: it is reported in `unrated` and never extrapolated.

The maximum-likelihood ratings are finite only when every split of the models into two groups has
each group scoring (a win or a tie) against the other (Zermelo / Ford): a model that never lost
would go to +infinity. `fit_ratings` refuses that with a one-line UserError instead of printing the
arbitrary large number an iteration cap produces. The bootstrap (LMSYS: resample battles with
replacement, refit, take the 2.5/97.5 percentiles) drops resamples with no finite fit and counts them
in `dropped_rounds`: the interval is then conditional on a finite fit, and the count says how much
that matters (a few percent is harmless; many means too few battles).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from harness.cli import UserError

WINNERS = ("a", "b", "tie")
SCALE, BASE, INIT_RATING = 400.0, 10.0, 1000.0


@dataclass(frozen=True)
class ArenaResult:
    table: pd.DataFrame                          # index model: rating, lower, upper, battles, score
    unrated: tuple[str, ...]                     # models with no battle chain to the anchor
    never_compared: tuple[tuple[str, str], ...]  # model pairs (sorted) with no battle between them
    rounds: int                                  # bootstrap resamples drawn
    dropped_rounds: int                          # of those, resamples with no finite fit


def validate_battles(battles: pd.DataFrame) -> pd.DataFrame:
    """The battles as (model_a, model_b, winner) strings, or a UserError naming the first bad row:
    a misspelt winner label or a self-battle would otherwise be silently dropped or mis-counted."""
    missing = [c for c in ("model_a", "model_b", "winner") if c not in battles.columns]
    if missing:
        raise UserError(f"battles lack column(s) {', '.join(missing)}: give model_a, model_b, winner")
    if len(battles) == 0:
        raise UserError("no battles to rate: give at least one row of model_a, model_b, winner")
    df = battles[["model_a", "model_b", "winner"]].reset_index(drop=True)
    for i, (a, b, w) in enumerate(df.itertuples(index=False)):
        if not isinstance(a, str) or not isinstance(b, str) or not a or not b:
            raise UserError(f"battle row {i}: model names must be non-empty strings, got {a!r}, {b!r}")
        if a == b:
            raise UserError(f"battle row {i}: model {a!r} battles itself; drop self-battles")
        if w not in WINNERS:
            raise UserError(f"battle row {i}: winner {w!r} is not one of a, b, tie; relabel it")
    return df


def _encode(df: pd.DataFrame, models: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ia, ib, sa): model indices of each battle and a's score in it (1 win, 0.5 tie, 0 loss)."""
    index = {m: k for k, m in enumerate(models)}
    w = df["winner"].to_numpy()
    return (df["model_a"].map(index).to_numpy(), df["model_b"].map(index).to_numpy(),
            np.where(w == "a", 1.0, np.where(w == "tie", 0.5, 0.0)))


def _tables(ia, ib, sa, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, N): S[i, j] = score of i against j (wins + ties/2), N[i, j] = battles between i and j."""
    S, N = np.zeros((p, p)), np.zeros((p, p))
    np.add.at(S, (ia, ib), sa)
    np.add.at(S, (ib, ia), 1.0 - sa)
    np.add.at(N, (ia, ib), 1.0)
    np.add.at(N, (ib, ia), 1.0)
    return S, N


def _bounded(S: np.ndarray) -> bool:
    """Finite MLE <=> the 'scored against' digraph (edge i->j when S[i, j] > 0) is strongly connected."""
    if len(S) <= 1:
        return True
    n, _ = connected_components(csr_matrix(S > 0), directed=True, connection="strong")
    return n == 1


def _newton(S: np.ndarray, N: np.ndarray, pin: int) -> np.ndarray:
    """Natural-log strengths maximising sum S_ij log sigmoid(t_i - t_j), with t[pin] = 0.
    Newton with step halving; the reduced Hessian is a weighted graph Laplacian minus the pinned
    row/column, positive definite for a connected group, so each step is well defined."""
    p = len(S)
    t = np.zeros(p)
    free = np.arange(p) != pin
    if not free.any():
        return t

    def loglik(t):
        d = t[:, None] - t[None, :]
        return float(np.sum(S * -np.logaddexp(0.0, -d)))

    ll = loglik(t)
    for _ in range(200):
        d = t[:, None] - t[None, :]
        P = 1.0 / (1.0 + np.exp(-d))
        grad = (S - N * P).sum(axis=1)
        W = N * P * (1.0 - P)
        H = np.diag(W.sum(axis=1)) - W            # negative Hessian
        step = np.linalg.solve(H[np.ix_(free, free)], grad[free])
        if np.max(np.abs(step)) < 1e-12:
            break
        for _ in range(60):
            cand = t.copy()
            cand[free] += step
            new = loglik(cand)
            if new >= ll - 1e-12:
                t, ll = cand, new
                break
            step = step / 2
        else:
            break
    return t


def _fit(S, N, pin, anchor_rating, scale, base, centre):
    """Ratings from the tables of one group of models, or None when the group is split or the MLE
    is not finite. The pinned model (or, with centre, the mean) sits at anchor_rating."""
    if len(S) > 1 and connected_components(csr_matrix(N > 0), directed=False)[0] != 1:
        return None
    if not _bounded(S):
        return None
    r = scale * _newton(S, N, pin) / math.log(base)
    return r + anchor_rating - (r.mean() if centre else r[pin])


def _groups(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(models sorted by name, the connected groups of models that battled, each sorted)."""
    models = sorted(set(df["model_a"]) | set(df["model_b"]))
    _, N = _tables(*_encode(df, models), len(models))
    _, labels = connected_components(csr_matrix(N > 0), directed=False)
    groups = [[m for m, g in zip(models, labels) if g == k] for k in sorted(set(labels))]
    return models, groups


def _anchor_group(df, anchor):
    """(all models, the anchor's group, the battles inside that group)."""
    models, groups = _groups(df)
    if anchor is None:
        if len(groups) > 1:
            raise UserError(f"battles form {len(groups)} unconnected groups of models; "
                            "name an anchor model so the others are reported, not rated")
        return models, models, df
    if anchor not in models:
        raise UserError(f"anchor model {anchor!r} has no battles; pick one of {', '.join(models)}")
    group = next(g for g in groups if anchor in g)
    return models, group, df[df["model_a"].isin(group)].reset_index(drop=True)


def fit_ratings(battles: pd.DataFrame, anchor: str | None = None, anchor_rating: float = INIT_RATING,
                scale: float = SCALE, base: float = BASE) -> pd.Series:
    """Elo-scale ratings of the models connected to `anchor` (all models if anchor is None), highest
    first. UserError when some of them won (or lost) every battle against the rest: no finite MLE."""
    df = validate_battles(battles)
    _, group, sub = _anchor_group(df, anchor)
    pin = group.index(anchor) if anchor is not None else 0
    r = _fit(*_tables(*_encode(sub, group), len(group)), pin, anchor_rating, scale, base,
             centre=anchor is None)
    if r is None:
        raise UserError("ratings are unbounded: some models won (or lost) every battle against the "
                        "others they met; add battles between them before rating")
    return pd.Series(r, index=group).sort_values(ascending=False)


def bootstrap_ratings(battles: pd.DataFrame, rounds: int = 1000, seed: int = 0,
                      anchor: str | None = None, anchor_rating: float = INIT_RATING,
                      scale: float = SCALE, base: float = BASE) -> tuple[pd.DataFrame, int]:
    """(ratings, dropped): one row per kept resample of the battles (rows drawn with replacement
    from a numpy Generator seeded with `seed`, so a seed fixes the result), columns the anchor's
    connected models. A resample that loses a model, splits the group or has no finite fit is
    dropped and counted: the ratings it would give are unbounded, not merely noisy."""
    if not isinstance(rounds, int) or rounds < 1:
        raise UserError(f"bootstrap rounds must be a positive integer, got {rounds!r}")
    df = validate_battles(battles)
    _, group, sub = _anchor_group(df, anchor)
    pin = group.index(anchor) if anchor is not None else 0
    ia, ib, sa = _encode(sub, group)
    rng = np.random.default_rng(seed)
    rows, dropped = [], 0
    for _ in range(rounds):
        k = rng.integers(0, len(sub), len(sub))
        r = _fit(*_tables(ia[k], ib[k], sa[k], len(group)), pin, anchor_rating, scale, base,
                 centre=anchor is None)
        if r is None:
            dropped += 1
        else:
            rows.append(r)
    return pd.DataFrame(np.array(rows).reshape(len(rows), len(group)), columns=group), dropped


def arena(battles: pd.DataFrame, anchor: str | None = None, anchor_rating: float = INIT_RATING,
          rounds: int = 1000, seed: int = 0, scale: float = SCALE, base: float = BASE) -> ArenaResult:
    """Ratings with bootstrap 95% intervals for the anchor's group; the other models listed in
    `unrated` (NaN rating) and every pair of models that never met in `never_compared`."""
    df = validate_battles(battles)
    models, group, _ = _anchor_group(df, anchor)
    point = fit_ratings(df, anchor, anchor_rating, scale, base)
    boot, dropped = bootstrap_ratings(df, rounds, seed, anchor, anchor_rating, scale, base)
    if len(boot) == 0:
        raise UserError(f"all {rounds} bootstrap resamples had unbounded ratings; add battles")
    S, N = _tables(*_encode(df, models), len(models))
    table = pd.DataFrame({
        "rating": point.reindex(models),
        "lower": boot.quantile(0.025).reindex(models),
        "upper": boot.quantile(0.975).reindex(models),
        "battles": pd.Series(N.sum(axis=1), index=models).astype(int),
        "score": pd.Series(S.sum(axis=1), index=models),
    }, index=pd.Index(models, name="model"))
    table = table.sort_values("rating", ascending=False, na_position="last")
    unrated = tuple(m for m in models if m not in group)
    never = tuple((a, b) for i, a in enumerate(models) for j, b in enumerate(models)
                  if i < j and N[i, j] == 0)
    return ArenaResult(table, unrated, never, rounds, dropped)


if __name__ == "__main__":          # python -m harness.arena runs=... : the CLI is harness/arena_cli.py
    from harness.arena_cli import main
    from harness.cli import exit_after

    exit_after(main)
