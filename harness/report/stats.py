"""Statistics for comparing two runs on the same samples: pure functions on numpy arrays.

    mean_stderr(x)                      -> (mean, sample std / sqrt(n))
    normal_ci(mean, stderr, level=0.95) -> (low, high), mean -/+ z * stderr
    mcnemar_exact(a, b)                 -> McNemar: discordant counts and the exact two-sided p-value
    paired_bootstrap(a, b, ...)         -> mean difference a - b, its percentile CI and a p-value

McNemar's exact test is the two-sided binomial test on the discordant pairs: under "both runs are
equally accurate" a pair that only one run gets right is equally likely to favour either, so the
count favouring a is Binomial(b + c, 1/2). p = min(1, 2 * P(X <= min(b, c))), summed exactly in
integers (scipy.stats.binomtest(b, b + c, 0.5) gives the same number).

The paired bootstrap resamples *samples* (with replacement), keeping each sample's two scores
together, so the per-sample correlation between the runs is kept. The CI is the percentile
interval of the resampled mean differences. The p-value is the shifted-null bootstrap test (Efron &
Tibshirani 1993, section 16.4): recentre the resampled differences on 0 (the null of no difference)
and count how often they are at least as far from 0 as the observed difference:
p = (1 + #{|d*_i - d| >= |d|}) / (1 + n_resamples); the +1 keeps p > 0 with finite resamples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

BOOTSTRAP_CELLS = 1 << 22   # indices drawn per block (32 MiB of int64): bounded memory for big n


@dataclass(frozen=True)
class McNemarResult:
    n: int                # paired samples
    a_only: int           # b in McNemar's table: a right, b wrong
    b_only: int           # c: a wrong, b right
    p_value: float


@dataclass(frozen=True)
class BootstrapResult:
    mean_a: float
    mean_b: float
    difference: float     # mean_a - mean_b (weighted when weights are given)
    ci_low: float
    ci_high: float
    level: float
    p_value: float        # shifted-null bootstrap test, two-sided
    n_resamples: int
    seed: int


def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values; drop unscored samples first")
    return arr


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_1d(a, "a"), _as_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} vs {b.size}")
    return a, b


def mean_stderr(x) -> tuple[float, float | None]:
    """Mean and its standard error (sample std with ddof=1 over sqrt(n)); stderr None for n < 2."""
    x = _as_1d(x, "x")
    if x.size == 0:
        return float("nan"), None
    if x.size < 2:
        return float(x[0]), None
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def z_value(level: float = 0.95) -> float:
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def normal_ci(mean: float, stderr: float, level: float = 0.95) -> tuple[float, float]:
    """Normal-approximation interval mean -/+ z * stderr (z = 1.95996... for 95%)."""
    half = z_value(level) * stderr
    return mean - half, mean + half


def binomial_two_sided_half(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips: min(1, 2 * P(X <= min(k, n-k)))."""
    if n == 0:
        return 1.0
    tail, term = 0, 1                  # term = C(n, i), updated exactly in integers
    for i in range(min(k, n - k) + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / 2**n)   # one correctly rounded division of exact integers


def mcnemar_exact(a, b) -> McNemarResult:
    """Exact McNemar test on paired 0/1 outcomes (1 = correct) of runs a and b."""
    a, b = _paired(a, b)
    if not (np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
        raise ValueError("McNemar's test needs 0/1 scores; use paired_bootstrap for real-valued ones")
    a_only = int(np.sum((a == 1) & (b == 0)))
    b_only = int(np.sum((a == 0) & (b == 1)))
    return McNemarResult(int(a.size), a_only, b_only, binomial_two_sided_half(a_only, a_only + b_only))


def _resampled_means(values: np.ndarray, weights: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
    if weights is None:
        return values[idx].mean(axis=1)
    return (values[idx] * weights[idx]).sum(axis=1) / weights[idx].sum(axis=1)


def paired_bootstrap(a, b, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95,
                     weights=None) -> BootstrapResult:
    """Paired bootstrap of mean(a) - mean(b) over samples; deterministic for a given seed.

    `weights` (optional, positive) make every mean a weighted mean: with a = log-likelihood per word
    of each document and weights = its word count, the means are corpus-level log-likelihood per
    word (minus log word perplexity), the number perplexity reports."""
    a, b = _paired(a, b)
    if a.size == 0:
        raise ValueError("no paired samples to compare")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    w = None if weights is None else _as_1d(weights, "weights")
    if w is not None and (w.shape != a.shape or (w <= 0).any()):
        raise ValueError("weights must be positive, one per paired sample")
    diff = a - b

    def mean(x: np.ndarray) -> float:
        return float(x.mean() if w is None else (x * w).sum() / w.sum())

    observed = mean(diff)
    rng = np.random.Generator(np.random.PCG64(seed))
    block = max(1, BOOTSTRAP_CELLS // a.size)
    resampled = np.empty(int(n_resamples))
    for start in range(0, resampled.size, block):   # blocks bound memory; their size depends only on n,
        rows = min(block, resampled.size - start)      # so a seed always gives the same draws
        idx = rng.integers(0, a.size, size=(rows, a.size))
        resampled[start:start + rows] = _resampled_means(diff, w, idx)
    alpha = (1 - level) / 2
    low, high = np.quantile(resampled, [alpha, 1 - alpha])
    extreme = np.abs(resampled - observed) >= abs(observed) - 1e-12 * max(1.0, abs(observed))
    p = (1 + int(extreme.sum())) / (1 + resampled.size)
    return BootstrapResult(mean(a), mean(b), observed, float(low), float(high), level, min(1.0, p),
                           int(n_resamples), int(seed))
