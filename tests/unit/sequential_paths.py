"""Vectorised simulation of many monitoring paths for the sequential-test proofs.

Every statistic the tests use is a function of each arm's cumulative ``(n, sum, m2)``, so a whole
path with a look after every batch is a pair of cumulative sums; thousands of paths are a few
numpy arrays instead of Python loops over Summaries.
"""

from __future__ import annotations

import numpy as np


def cumulative(batch: int, sums: np.ndarray, sumsq: np.ndarray):
    """(n, sum, m2) after each look from per-batch sums and sums of squares (paths x looks)."""
    looks = sums.shape[1]
    n = np.broadcast_to(batch * np.arange(1, looks + 1, dtype=np.float64), sums.shape)
    s = np.cumsum(sums, axis=1)
    ss = np.cumsum(sumsq, axis=1)
    return n, s, np.maximum(ss - s * s / n, 0.0)


def gaussian(rng, paths: int, looks: int, batch: int, mean: float, sd: float):
    """Per-batch sums and sums of squares of N(mean, sd^2) values, drawn exactly per batch."""
    sums = rng.normal(batch * mean, sd * np.sqrt(batch), size=(paths, looks))
    m2 = sd * sd * rng.chisquare(batch - 1, size=(paths, looks))
    return cumulative(batch, sums, m2 + sums * sums / batch)


def lognormal(rng, paths: int, looks: int, batch: int, mu: float, sigma: float):
    x = rng.lognormal(mu, sigma, size=(paths, looks, batch))
    return cumulative(batch, x.sum(axis=2), np.einsum("plb,plb->pl", x, x))


def binary(rng, paths: int, looks: int, batch: int, p: float):
    x = rng.binomial(batch, p, size=(paths, looks)).astype(np.float64)
    return cumulative(batch, x, x)


def first_crossing(log_e: np.ndarray, alpha: float, eligible: np.ndarray | None = None):
    """Index of the first look whose evidence reaches 1/alpha on each path (-1 if none)."""
    hit = log_e >= -np.log(alpha)
    if eligible is not None:
        hit &= eligible
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def rate_minus_error(hits: np.ndarray, z: float = 3.0) -> float:
    """Observed rate minus ``z`` standard errors; a false-positive rate is "at most alpha within
    simulation error" when this is at most alpha."""
    p = float(np.mean(hits))
    return p - z * np.sqrt(max(p * (1 - p), 1e-12) / hits.size)
