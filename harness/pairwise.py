"""Pairwise verdicts: parse a judge's `[[A]]`/`[[B]]`/`[[C]]` reply, combine both orders, summarise.

Pure logic (no HTTP): the judge client sends each sample twice, the model under test shown as
assistant A and then, swapped, as assistant B, and hands the two replies here.

    parse_verdict(reply)             -> "A" | "B" | "tie" | None (unparseable = unscored)
    combine(first, swapped)          -> PairVerdict: the model's "win"/"tie"/"loss" (or None) and
                                        whether the judge said the same thing in both orders
    summarise(verdicts, ...)         -> PairwiseSummary: win/tie/loss rates, swap consistency,
                                        unscored count, 95% CIs
    length_controlled(verdicts, d)   -> LengthControlled: AlpacaEval-2-style LC win rate beside the raw

Why these rules:
- Parsing is FastChat's (`fastchat/llm_judge/common.py`, `run_judge_pair`, output_format "[[A]]"):
  plain substring tests in the order `[[A]]`, `[[B]]`, `[[C]]`; the first present wins, so a reply
  holding both `[[A]]` and `[[B]]` reads as A. Copying the rule exactly keeps our numbers comparable
  with published MT-Bench pairwise results. No `[[X]]` at all -> None: unscored, counted, never
  silently turned into a tie or dropped.
- Combining is MT-Bench's conservative rule (FastChat `show_result.py`): a verdict that is not the
  same in both orders counts as a tie, so position bias cannot manufacture wins. Whether the two
  orders agreed is kept: the swap-consistency rate measures the judge's position bias. A pair with
  either order unparseable is unscored as a whole (half a verdict is no verdict).
- Rates are over scored pairs (the unscored count is reported beside them), each with a Wilson 95%
  interval: unlike the normal interval it stays inside [0, 1] and is sane at 0 or n successes.
  The tie-as-half win rate (FastChat's "win_rate_adjusted", AlpacaEval's convention) is not a
  binomial proportion, so it gets a seeded percentile bootstrap.
- Length control follows AlpacaEval 2 (Dubois et al. 2024) without its per-instruction term: a
  logistic regression of the outcome on tanh(length difference / its std), unpenalised (C=inf); the LC win
  rate is the predicted win probability at zero length difference, sigmoid(intercept). Ties enter
  as half a win and half a loss (sample weights 0.5), so LC is comparable to the tie-as-half raw rate.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from harness.cli import UserError
from harness.report.stats import z_value

VERDICTS = ("A", "B", "tie")
OUTCOMES = ("win", "tie", "loss")
_SWAP = {"A": "B", "B": "A", "tie": "tie"}
_OUTCOME_OF_FIRST = {"A": "win", "B": "loss", "tie": "tie"}   # the model is A in the first order
_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


class PairwiseError(UserError):
    """Inputs to the pairwise statistics that cannot be used as given."""


def parse_verdict(reply: str | None) -> str | None:
    """FastChat's `[[A]]` parser: "A", "B", "tie" for `[[C]]`, None when no verdict is in the reply."""
    if not reply:
        return None
    for token, verdict in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if token in reply:
            return verdict
    return None


@dataclass(frozen=True)
class PairVerdict:
    outcome: str | None         # the model's "win" / "tie" / "loss"; None = unscored
    consistent: bool | None     # both orders agreed; None when either order was unparseable
    first: str | None           # raw verdict with the model as A
    swapped: str | None         # raw verdict with the model as B


def combine(first: str | None, swapped: str | None) -> PairVerdict:
    """One sample's verdict from both orders: `first` has the model as assistant A, `swapped` as B.
    Agreeing orders give that outcome; disagreeing ones (A then A, say: the judge followed the
    position, not the answer) give a tie with consistent=False."""
    for v in (first, swapped):
        if v is not None and v not in VERDICTS:
            raise PairwiseError(f"pairwise verdict {v!r} is not one of {VERDICTS} or None; "
                                "pass parse_verdict()'s output")
    if first is None or swapped is None:
        return PairVerdict(None, None, first, swapped)
    agree = first == _SWAP[swapped]
    outcome = _OUTCOME_OF_FIRST[first] if agree else "tie"
    return PairVerdict(outcome, agree, first, swapped)


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval for k successes in n trials; None when n == 0."""
    if n == 0:
        return None
    z = z_value(level)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    k: int
    n: int
    rate: float | None          # k / n; None when n == 0
    ci: tuple[float, float] | None


def _rate(k: int, n: int, level: float) -> Rate:
    return Rate(k, n, k / n if n else None, wilson_ci(k, n, level))


@dataclass(frozen=True)
class PairwiseSummary:
    n_pairs: int                # every sample, scored or not
    unscored: int               # pairs with either order unparseable
    win: Rate                   # over scored pairs
    tie: Rate
    loss: Rate
    swap_consistency: Rate      # over pairs with both orders parsed
    win_rate_adjusted: float | None                 # (wins + ties / 2) / scored
    win_rate_adjusted_ci: tuple[float, float] | None  # seeded percentile bootstrap
    seed: int


def _outcomes(verdicts: Sequence[PairVerdict]) -> list[str | None]:
    out = [v.outcome for v in verdicts]
    bad = [o for o in out if o is not None and o not in OUTCOMES]
    if bad:
        raise PairwiseError(f"pairwise outcome {bad[0]!r} is not one of {OUTCOMES}; "
                            "build verdicts with combine()")
    return out


def summarise(verdicts: Sequence[PairVerdict], level: float = 0.95, n_resamples: int = 10_000,
              seed: int = 0) -> PairwiseSummary:
    """Win/tie/loss and swap-consistency rates with CIs; deterministic for a given seed."""
    outcomes = _outcomes(verdicts)
    scored = [o for o in outcomes if o is not None]
    n = len(scored)
    counts = {o: scored.count(o) for o in OUTCOMES}
    judged = [v.consistent for v in verdicts if v.consistent is not None]
    adjusted, adjusted_ci = None, None
    if n:
        scores = np.array([_SCORE[o] for o in scored])
        adjusted = float(scores.mean())
        rng = np.random.Generator(np.random.PCG64(seed))
        means = scores[rng.integers(0, n, size=(n_resamples, n))].mean(axis=1)
        lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        adjusted_ci = (float(lo), float(hi))
    return PairwiseSummary(
        n_pairs=len(outcomes), unscored=len(outcomes) - n,
        win=_rate(counts["win"], n, level), tie=_rate(counts["tie"], n, level),
        loss=_rate(counts["loss"], n, level),
        swap_consistency=_rate(sum(judged), len(judged), level),
        win_rate_adjusted=adjusted, win_rate_adjusted_ci=adjusted_ci, seed=seed)


@dataclass(frozen=True)
class LengthControlled:
    n: int                      # scored pairs used
    raw_win_rate: float | None  # (wins + ties / 2) / n
    lc_win_rate: float | None   # predicted at zero length difference
    length_coef: float | None   # logistic slope on tanh(d / std(d)); > 0: longer answers win more
    note: str                   # why the fit was skipped, or ""


def length_controlled(verdicts: Sequence[PairVerdict], length_diff: Sequence[float]) -> LengthControlled:
    """AlpacaEval-2-style length-controlled win rate. `length_diff[i]` is len(model) - len(other)
    for sample i (characters or tokens; the normalisation makes the unit irrelevant)."""
    from sklearn.linear_model import LogisticRegression

    outcomes = _outcomes(verdicts)
    if len(outcomes) != len(length_diff):
        raise PairwiseError(f"{len(outcomes)} verdicts but {len(length_diff)} length differences; "
                            "pass one length difference per sample")
    keep = [i for i, o in enumerate(outcomes) if o is not None]
    if not keep:
        return LengthControlled(0, None, None, None, "no scored pairs")
    y = np.array([_SCORE[outcomes[i]] for i in keep])
    d = np.asarray(length_diff, dtype=float)[keep]
    if not np.all(np.isfinite(d)):
        raise PairwiseError("length differences must be finite numbers; check the response lengths")
    raw = float(y.mean())
    sd = float(d.std())
    if sd == 0:
        return LengthControlled(len(keep), raw, raw, None, "no length variation: LC equals raw")
    if raw in (0.0, 1.0):
        return LengthControlled(len(keep), raw, raw, None,
                                "all one outcome: nothing to regress, LC equals raw")
    x = np.tanh(d / sd)[:, None]
    # each sample is a win with weight y and a loss with weight 1 - y: ties become half of each
    xs = np.vstack([x, x])
    ys = np.concatenate([np.ones(len(y)), np.zeros(len(y))])
    ws = np.concatenate([y, 1 - y])
    fit = LogisticRegression(C=np.inf, max_iter=1000).fit(xs, ys, sample_weight=ws)
    intercept = float(fit.intercept_[0])
    return LengthControlled(len(keep), raw, 1 / (1 + math.exp(-intercept)), float(fit.coef_[0, 0]), "")
