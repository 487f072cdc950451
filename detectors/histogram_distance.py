"""Sample-size-corrected, calibrated distances between two log-bucket histograms.

PSI, Jensen-Shannon, Kolmogorov-Smirnov on the binned CDFs and Wasserstein-1, each returned as a
*corrected* value (the raw distance minus its expectation when both histograms are samples of the
same distribution, so identical distributions score near 0 whatever the sample sizes and bin
sparsity) and with a *threshold* derived from a per-evaluation false-alarm probability ``alpha``.

Null distributions, with ``n``, ``m`` the two counts and ``N = n m / (n + m)``:

* PSI (the symmetrised Kullback-Leibler divergence) and Jensen-Shannon are, to second order,
  ``X^2 / N`` and ``X^2 / (8 N)`` with ``X^2`` the two-sample chi-square homogeneity statistic,
  asymptotically chi-square with ``B - 1`` degrees of freedom (Pearson 1900). To keep that
  approximation honest and the distances finite, adjacent buckets are merged (in value order) until
  every merged bin expects at least ``min_expected`` values in the smaller sample, and at most
  ``max_bins`` bins remain; 0.5 pseudo-counts keep logarithms finite.
* KS: ``sqrt(N) D`` tends to the Kolmogorov distribution, conservative for binned data.
* Wasserstein-1: ``sqrt(N) W`` tends to ``int |B(F(x))| dx`` for a Brownian bridge ``B`` and the
  pooled CDF ``F`` (del Barrio, Gine and Matran 1999). Its mean is
  ``sqrt(2 / pi) int sqrt(F (1 - F)) dx``; the threshold adds the Borell-TIS Gaussian
  concentration bound ``sqrt(2 s^2 log(1 / alpha))`` with ``s^2 = Var(int B(F(x)) dx)``,
  so it is conservative. Units are those of the values.

KS and Wasserstein use the buckets as given (they need no minimum count).

References
----------
Pearson, K. (1900). On the criterion that a given system of deviations ... Philosophical Magazine
50(302), 157-175.
Lin, J. (1991). Divergence measures based on the Shannon entropy. IEEE Trans. Information Theory
37(1), 145-151.
del Barrio, E., Gine, E. and Matran, C. (1999). Central limit theorems for the Wasserstein distance
between the empirical and the true distributions. Annals of Probability 27(2), 1009-1071.
Ledoux, M. and Talagrand, M. (1991). Probability in Banach Spaces. Springer (Borell-TIS).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._calibration import KOLMOGOROV_MEAN, check_run_length, chi2_isf, kolmogorov_isf
from ._edge import _EdgeAlarm

DISTANCES = ("psi", "js", "ks", "wasserstein")


def as_bins(obj: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lower, upper, counts)`` of a Summary, a LogHistogram or such a tuple itself."""
    if hasattr(obj, "histogram"):
        obj = obj.histogram
    if hasattr(obj, "bins"):
        lower, upper, counts = obj.bins()
    else:
        try:
            lower, upper, counts = obj
        except (TypeError, ValueError):
            raise ValueError(
                "expected a Summary, a LogHistogram or a (lower, upper, counts) tuple, "
                f"got {type(obj).__name__}"
            ) from None
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    if not lower.shape == upper.shape == counts.shape or lower.ndim != 1:
        raise ValueError("lower, upper and counts must be 1-d arrays of the same length")
    if counts.size and counts.min() < 0:
        raise ValueError("counts must be >= 0")
    return lower, upper, counts


def merge_bins(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add several ``(lower, upper, counts)`` histograms bucket by bucket (aligned on upper)."""
    if not parts:
        empty = np.zeros(0)
        return empty, empty.copy(), np.zeros(0, dtype=np.int64)
    lower = np.concatenate([p[0] for p in parts])
    upper = np.concatenate([p[1] for p in parts])
    counts = np.concatenate([p[2] for p in parts])
    keys, first, inverse = np.unique(upper, return_index=True, return_inverse=True)
    return (
        lower[first],
        keys,
        np.bincount(inverse, weights=counts, minlength=keys.size).astype(np.int64),
    )


def _align(a, b):
    la, ua, ca = a
    lb, ub, cb = b
    upper = np.union1d(ua, ub)
    lower = np.empty_like(upper)
    p = np.zeros(upper.size, dtype=np.float64)
    q = np.zeros(upper.size, dtype=np.float64)
    ia = np.searchsorted(upper, ua)
    ib = np.searchsorted(upper, ub)
    lower[ia] = la
    lower[ib] = lb
    p[ia] = ca
    q[ib] = cb
    return lower, upper, p, q


def _coarsen(p, q, n, m, min_expected, max_bins):
    """Merge adjacent bins so each expects >= min_expected in the smaller sample."""
    pooled = np.cumsum(p + q)
    total = pooled[-1]
    step = max(min_expected * total / min(n, m), total / max_bins)
    group = np.minimum(np.floor(pooled / step - 1e-9), np.floor(total / step - 1e-9) - 1)
    group = np.maximum(group, 0).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    return np.add.reduceat(p, starts), np.add.reduceat(q, starts)


def histogram_distances(
    a: Any,
    b: Any,
    *,
    alpha: float,
    max_bins: int = 20,
    min_expected: float = 5.0,
) -> dict[str, dict[str, float]]:
    """Corrected distances between ``a`` and ``b`` and their thresholds at level ``alpha``.

    ``a`` and ``b`` are Summaries, LogHistograms (same ``relative_accuracy``) or
    ``(lower, upper, counts)`` tuples. Returns ``{name: {"raw", "null_mean", "corrected",
    "threshold"}}`` for every name in ``DISTANCES``, where ``threshold`` is on the corrected scale
    (``corrected > threshold`` has probability about ``alpha`` under no change), plus
    ``{"n": ..., "m": ..., "bins": ...}`` under ``"_sizes"``.

    Examples
    --------
    >>> import numpy as np
    >>> from armguard.detectors import Summary
    >>> from armguard.detectors.histogram_distance import histogram_distances
    >>> rng = np.random.default_rng(42)
    >>> same = histogram_distances(
    ...     Summary.from_values(rng.lognormal(0, 1, 5_000)),
    ...     Summary.from_values(rng.lognormal(0, 1, 800)), alpha=1e-4)
    >>> round(same["psi"]["raw"], 4), round(same["psi"]["corrected"], 4)
    (0.0183, -0.0078)
    >>> moved = histogram_distances(
    ...     Summary.from_values(rng.lognormal(0, 1, 5_000)),
    ...     Summary.from_values(rng.lognormal(0.3, 1, 800)), alpha=1e-4)
    >>> round(moved["ks"]["corrected"], 3), round(moved["ks"]["threshold"], 3)
    (0.089, 0.052)
    """
    la, ua, ca = as_bins(a)
    lb, ub, cb = as_bins(b)
    n = float(ca.sum())
    m = float(cb.sum())
    if n == 0 or m == 0:
        raise ValueError(f"both histograms must be non-empty, got counts {int(n)} and {int(m)}")
    _, upper, p, q = _align((la, ua, ca), (lb, ub, cb))
    n_eff = n * m / (n + m)
    out: dict[str, dict[str, float]] = {}

    # PSI and JS on coarsened bins.
    cp, cq = _coarsen(p, q, n, m, min_expected, max_bins)
    k = cp.size
    df = max(k - 1, 1)
    chi2_thr = chi2_isf(alpha, df)
    pp = (cp + 0.5) / (n + 0.5 * k)
    qq = (cq + 0.5) / (m + 0.5 * k)
    psi = float(np.sum((pp - qq) * np.log(pp / qq)))
    mid = 0.5 * (pp + qq)
    js = float(0.5 * np.sum(pp * np.log(pp / mid)) + 0.5 * np.sum(qq * np.log(qq / mid)))
    for name, raw, scale in (("psi", psi, 1.0), ("js", js, 0.125)):
        null = scale * (k - 1) / n_eff
        out[name] = {
            "raw": raw,
            "null_mean": null,
            "corrected": raw - null,
            "threshold": scale * chi2_thr / n_eff - null,
        }

    # KS and Wasserstein on the fine buckets.
    fp = np.cumsum(p) / n
    fq = np.cumsum(q) / m
    diff = np.abs(fp - fq)
    ks = float(diff.max())
    root = math.sqrt(n_eff)
    null = KOLMOGOROV_MEAN / root
    out["ks"] = {
        "raw": ks,
        "null_mean": null,
        "corrected": ks - null,
        "threshold": kolmogorov_isf(alpha) / root - null,
    }
    # Distribution mass sits at the bucket upper edges; W = sum |F - G| dx over the gaps.
    dx = np.diff(upper)
    w = float(np.sum(diff[:-1] * dx))
    pooled = (np.cumsum(p + q) / (n + m))[:-1]
    mean_bridge = math.sqrt(2.0 / math.pi) * float(np.sum(np.sqrt(pooled * (1.0 - pooled)) * dx))
    # Var(int B(F) dx) = sum_ij (min(F_i, F_j) - F_i F_j) dx_i dx_j, in O(B) with suffix sums.
    tail = np.cumsum(dx[::-1])[::-1] - dx  # sum of dx_j for j > i
    var = float(np.sum(pooled * dx * (dx + 2.0 * tail)) - np.sum(pooled * dx) ** 2)
    var = max(var, 0.0)
    null = mean_bridge / root
    out["wasserstein"] = {
        "raw": w,
        "null_mean": null,
        "corrected": w - null,
        "threshold": math.sqrt(2.0 * var * math.log(1.0 / alpha)) / root,
    }
    out["_sizes"] = {"n": n, "m": m, "bins": float(k)}
    return out


class _HistogramDrift(_EdgeAlarm):
    """Shared parameters, evaluation and results of the histogram drift detectors (private)."""

    def _init_drift(
        self,
        expected_run_length: float,
        distance: str,
        max_bins: int,
        min_expected: float,
        clear_fraction: float,
        min_effect: float,
    ) -> None:
        self.expected_run_length = check_run_length(expected_run_length)
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = distance
        if isinstance(max_bins, bool) or not isinstance(max_bins, int) or max_bins < 2:
            raise ValueError(f"max_bins must be an int >= 2, got {max_bins!r}")
        self.max_bins = max_bins
        if (
            isinstance(min_expected, bool)
            or not isinstance(min_expected, int | float)
            or not 0 < min_expected < math.inf
        ):
            raise ValueError(f"min_expected must be a finite number > 0, got {min_expected!r}")
        self.min_expected = float(min_expected)
        if (
            isinstance(clear_fraction, bool)
            or not isinstance(clear_fraction, int | float)
            or not 0 <= clear_fraction <= 1
        ):
            raise ValueError(f"clear_fraction must be a number in [0, 1], got {clear_fraction!r}")
        self.clear_fraction = float(clear_fraction)
        if (
            isinstance(min_effect, bool)
            or not isinstance(min_effect, int | float)
            or not 0 <= min_effect < math.inf
        ):
            raise ValueError(f"min_effect must be a finite number >= 0, got {min_effect!r}")
        self.min_effect = float(min_effect)
        self._distances: dict[str, float] = {}
        self._score = 0.0
        self._threshold = 0.0

    def _params(self) -> dict:
        return {
            "expected_run_length": self.expected_run_length,
            "distance": self.distance,
            "max_bins": self.max_bins,
            "min_expected": self.min_expected,
            "clear_fraction": self.clear_fraction,
            "min_effect": self.min_effect,
        }

    def _evaluate(self, a, b) -> None:
        res = histogram_distances(
            a,
            b,
            alpha=1.0 / self.expected_run_length,
            max_bins=self.max_bins,
            min_expected=self.min_expected,
        )
        self._distances = {name: res[name]["corrected"] for name in DISTANCES}
        self._score = res[self.distance]["corrected"]
        # Statistical threshold, raised to the smallest drift worth an alarm if one is set:
        # on very large windows a real but negligible difference is significant.
        self._threshold = max(res[self.distance]["threshold"], self.min_effect)
        if self._score > self._threshold:
            self._set_level(True)
        elif self._in_alarm:
            # Hysteresis: an alarm clears only once the score is well below the threshold.
            self._set_level(self._score > self.clear_fraction * self._threshold)
        else:
            self._set_level(False)

    def _hold(self) -> None:
        """No evaluation possible this update (a window is empty): keep the level."""
        self._set_level(self._in_alarm)

    @property
    def score(self) -> float:
        """The chosen distance, corrected for sample size (near 0 under no change)."""
        return self._score

    @property
    def threshold(self) -> float:
        """Alarm threshold on ``score`` derived from ``expected_run_length``."""
        return self._threshold

    @property
    def distances(self) -> dict[str, float]:
        """All four corrected distances of the last evaluation (empty before the first)."""
        return dict(self._distances)

    def to_dict(self) -> dict:
        """Current result as a JSON-safe dict (for metrics and decision records)."""
        return {
            "alarm": self._alarm,
            "in_alarm": self._in_alarm,
            "score": self._score,
            "threshold": self._threshold,
            "distance": self.distance,
            "distances": dict(self._distances),
            "n_alarms": self._n_alarms,
        }

    def _result_state(self) -> dict:
        return {
            "distances": dict(self._distances),
            "score": self._score,
            "threshold": self._threshold,
            **self._edge_state(),
        }

    def _load_result_state(self, state: dict) -> None:
        self._distances = {k: float(v) for k, v in state["distances"].items()}
        self._score = float(state["score"])
        self._threshold = float(state["threshold"])
        self._load_edge_state(state)
