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
from itertools import repeat
from typing import Any

import numpy as np

from ._calibration import KOLMOGOROV_MEAN, check_run_length, chi2_isf, kolmogorov_isf
from ._edge import _EdgeAlarm
from .summary import LogHistogram

DISTANCES = ("psi", "js", "ks", "wasserstein")


def as_bins(obj: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lower, upper, counts)`` of a Summary, a LogHistogram or such a tuple itself."""
    if hasattr(obj, "histogram"):
        obj = obj.histogram
    if hasattr(obj, "bins"):
        # A histogram's own bins are well formed (float edges, int64 counts >= 0): checking
        # them again would cost more than the rest of an update.
        return obj.bins()
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
    if counts.shape[0] and np.minimum.reduce(counts) < 0:
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


# Each kernel returns (raw, null_mean, threshold on the corrected scale) for an aligned pair;
# alpha=None skips the threshold (NaN) when only the distance is wanted.
# The arithmetic below runs once per evaluation on a few hundred buckets and ~20 merged bins,
# where numpy's fixed cost per call (about a microsecond) outweighs the work: it is written to
# make few numpy calls on the fine buckets and to do the merged-bin arithmetic on plain floats.

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GROUP_EDGES: dict[int, np.ndarray] = {}  # last -> [1.0, 2.0, ..., last], for searchsorted


class _Pair:
    """Two histograms aligned on the union of their buckets (private).

    ``cp[i]`` and ``cq[i]`` count the values of each in the union's buckets ``0 .. i - 1`` (so
    ``cp[0] == 0`` and ``cp[-1] == n``); ``upper`` holds the union's upper edges, ascending.
    What several distances share (the CDF gap, the merged bins) is computed once, on demand.
    """

    __slots__ = ("_coarse", "_gap", "cp", "cq", "m", "n", "upper")

    # Whether the buckets may include ones empty in both (a key-aligned pair): the merged bins
    # then skip a group by its counts instead of by its position (see _coarsen).
    dense = False

    def __init__(self, upper: np.ndarray | None, cp: np.ndarray, cq: np.ndarray) -> None:
        self.upper = upper
        self.cp = cp
        self.cq = cq
        self.n = float(cp[-1])
        self.m = float(cq[-1])
        self._gap: np.ndarray | None = None
        self._coarse: tuple[list[float], list[float]] | None = None

    @property
    def n_eff(self) -> float:
        return self.n * self.m / (self.n + self.m)

    def gap(self) -> np.ndarray:
        """``|F(x) - G(x)|`` at every union edge (index ``i`` = after ``i`` buckets)."""
        if self._gap is None:
            self._gap = np.abs(self.cp / self.n - self.cq / self.m)
        return self._gap

    def coarse(self, min_expected: float, max_bins: int) -> tuple[list[float], list[float]]:
        """Counts of both in adjacent buckets merged until each merged bin expects at least
        ``min_expected`` values in the smaller sample, and at most ``max_bins`` remain."""
        if self._coarse is None:
            self._coarse = _coarsen(self, min_expected, max_bins)
        return self._coarse

    def fine(self) -> _Pair:
        """The pair on the buckets either histogram lists, with their upper edges."""
        return self


def _pair(a: tuple, b: tuple) -> _Pair:
    """Align two ``(lower, upper, counts)`` histograms on the union of their upper edges."""
    ua, ca = a[1], a[2]
    ub, cb = b[1], b[2]
    u = np.concatenate((ua, ub))
    u.sort(kind="stable")  # two sorted runs: a merge
    keep = np.empty(u.shape[0], dtype=bool)
    keep[:1] = True
    np.not_equal(u[1:], u[:-1], out=keep[1:])
    upper = u[keep]
    size = upper.shape[0] + 1
    p = np.zeros(size)
    q = np.zeros(size)
    p[1:][upper.searchsorted(ua)] = ca
    q[1:][upper.searchsorted(ub)] = cb
    return _Pair(upper, np.add.accumulate(p), np.add.accumulate(q))


class _KeyPair(_Pair):
    """Two LogHistograms of the same relative accuracy aligned by integer bucket key (private).

    The buckets are every key of a dense layout (see :func:`_key_layout`), so some are empty
    in both histograms. Such buckets change no CDF value, no maximum CDF gap and no merged bin
    (a merged bin never starts at an empty bucket), so KS, PSI and JS read the dense layout
    directly; Wasserstein sums over gaps between edges, so :meth:`fine` drops the empty
    buckets and computes the edges of the rest, bit for bit those of ``LogHistogram.bins()``.
    """

    __slots__ = ("_layout",)
    dense = True

    def __init__(self, cp: np.ndarray, cq: np.ndarray, layout: tuple) -> None:
        super().__init__(None, cp, cq)
        self._layout = layout

    def fine(self) -> _Pair:
        cp, cq = self.cp, self.cq
        pooled = cp + cq
        idx = np.flatnonzero(pooled[1:] > pooled[:-1])
        take = np.empty(idx.shape[0] + 1, dtype=np.intp)
        take[0] = 0
        np.add(idx, 1, out=take[1:])
        return _Pair(_layout_edges(idx, *self._layout), cp[take], cq[take])


def _layout_edges(idx: np.ndarray, ln: int, nhi: int, plo: int, log_gamma: float) -> np.ndarray:
    """Upper edges of the dense-layout positions ``idx`` (ascending), as ``bins()`` has them."""
    i0 = int(idx.searchsorted(ln))
    i1 = int(idx.searchsorted(ln, side="right"))
    upper = np.zeros(idx.shape[0])
    if i0:  # negative buckets: the magnitude's lower edge, negated
        kf = (nhi - 1 - idx[:i0]).astype(np.float64)
        upper[:i0] = -np.exp((kf - 1.0) * log_gamma)
    if i1 < idx.shape[0]:
        kf = (idx[i1:] + (plo - ln - 1)).astype(np.float64)
        upper[i1:] = np.exp(kf * log_gamma)
    return upper


def _key_layout(ha: Any, hb: Any) -> tuple | None:
    """Where the buckets of two LogHistograms go on one dense layout of positions.

    The layout runs over every negative key either lists (largest magnitude first, so the
    positions ascend by value), then the zero bucket, then every positive key either lists.
    Returns ``(size, ln, nhi, plo, stores_a, stores_b, log_gamma)`` or None when the layout
    would be much wider than the buckets it holds (values of very different magnitudes).
    """
    sa = ha.stores()
    sb = hb.stores()
    nlo = plo = 0
    nhi = phi = 0
    first = True
    for off, counts in ((sa[0], sa[1]), (sb[0], sb[1])):
        if counts.shape[0]:
            end = off + counts.shape[0]
            if first:
                nlo, nhi, first = off, end, False
            else:
                nlo, nhi = min(nlo, off), max(nhi, end)
    first = True
    for off, counts in ((sa[3], sa[4]), (sb[3], sb[4])):
        if counts.shape[0]:
            end = off + counts.shape[0]
            if first:
                plo, phi, first = off, end, False
            else:
                plo, phi = min(plo, off), max(phi, end)
    ln = nhi - nlo
    size = ln + 1 + phi - plo
    held = sa[1].shape[0] + sa[4].shape[0] + sb[1].shape[0] + sb[4].shape[0]
    if size > 4 * held + 1024:
        return None
    return size, ln, nhi, plo, sa, sb, math.log(ha.gamma)


def _fill(out: np.ndarray, stores: tuple, ln: int, nhi: int, plo: int) -> None:
    """Write one histogram's counts at their layout positions plus one (out[0] stays 0)."""
    n_off, n_counts, zero, p_off, p_counts = stores
    k = n_counts.shape[0]
    if k:
        start = nhi - n_off - k + 1
        out[start : start + k] = n_counts[::-1]
    out[ln + 1] = zero
    k = p_counts.shape[0]
    if k:
        start = ln + 2 + p_off - plo
        out[start : start + k] = p_counts


def _key_pair(ha: Any, hb: Any) -> _Pair:
    """Align two LogHistograms of the same relative accuracy by bucket key."""
    layout = _key_layout(ha, hb)
    if layout is None:
        return _pair(ha.bins(), hb.bins())
    size, ln, nhi, plo, sa, sb, log_gamma = layout
    p = np.zeros(size + 1)
    q = np.zeros(size + 1)
    _fill(p, sa, ln, nhi, plo)
    _fill(q, sb, ln, nhi, plo)
    np.add.accumulate(p, out=p)
    np.add.accumulate(q, out=q)
    return _KeyPair(p, q, (ln, nhi, plo, log_gamma))


def _histogram_of(obj: Any) -> LogHistogram | None:
    h = getattr(obj, "histogram", obj)
    return h if isinstance(h, LogHistogram) else None


def align(a: Any, b: Any) -> _Pair:
    """Align two histograms (Summaries, LogHistograms or bins tuples) on their buckets.

    Two LogHistograms with the same relative accuracy are aligned by integer bucket key, without
    computing edges; anything else by the union of the upper edges of their ``bins()``. Both
    give the same CDFs, merged bins and distances.
    """
    ha = _histogram_of(a)
    if ha is not None:
        hb = _histogram_of(b)
        if hb is not None and hb.relative_accuracy == ha.relative_accuracy:
            return _key_pair(ha, hb)
    return _pair(as_bins(a), as_bins(b))


def _coarsen(pair: _Pair, min_expected: float, max_bins: int) -> tuple[list[float], list[float]]:
    n, m = pair.n, pair.m
    total = n + m
    step = max(min_expected * total / min(n, m), total / max_bins)
    # Bucket i joins group clip(floor(pooled_i / step - 1e-9), 0, last), pooled_i the pooled
    # count up to and including it. pooled is non-decreasing, so group j >= 1 starts at the
    # first bucket with pooled_i / step - 1e-9 >= j: one searchsorted finds every boundary.
    last = math.floor(total / step - 1e-9) - 1
    if last < 1:
        return [n], [m]
    edges = _GROUP_EDGES.get(last)
    if edges is None:
        edges = _GROUP_EDGES[last] = np.arange(1.0, last + 1.0)
    v = (pair.cp[1:] + pair.cq[1:]) / step
    v -= 1e-9
    starts = v.searchsorted(edges)
    at_p = pair.cp[starts].tolist()
    at_q = pair.cq[starts].tolist()
    cps, cqs = [], []
    prev, pp, qq = 0, 0.0, 0.0
    if pair.dense:
        # Starts are non-empty buckets (an empty one has the pooled count of the one before),
        # but the first non-empty bucket need not be at position 0, so positions cannot tell
        # an empty first group; counts can: a group is empty when no value lies between its
        # start and the previous group's (bins() lists no empty bucket, so this is the rule
        # above on the same buckets).
        for x, y in zip(at_p, at_q, strict=True):
            if x + y > pp + qq:
                cps.append(x - pp)
                cqs.append(y - qq)
                pp, qq = x, y
    else:
        for s, x, y in zip(starts.tolist(), at_p, at_q, strict=True):
            if s > prev:  # a group with no bucket (a bucket spanning several steps) is skipped
                cps.append(x - pp)
                cqs.append(y - qq)
                prev, pp, qq = s, x, y
    cps.append(n - pp)
    cqs.append(m - qq)
    return cps, cqs


def _psi(pair: _Pair, alpha: float | None, min_expected: float, max_bins: int) -> tuple[float, ...]:
    """(raw, null_mean, threshold) of PSI: 0.5 pseudo-counts on the merged bins."""
    cps, cqs = pair.coarse(min_expected, max_bins)
    k = len(cps)
    dn = pair.n + 0.5 * k
    dm = pair.m + 0.5 * k
    log = math.log
    raw = 0.0
    for x, y in zip(cps, cqs, strict=True):
        p = (x + 0.5) / dn
        q = (y + 0.5) / dm
        raw += (p - q) * log(p / q)
    return _chi2_scaled(raw, 1.0, k, pair.n_eff, alpha)


def _js(pair: _Pair, alpha: float | None, min_expected: float, max_bins: int) -> tuple[float, ...]:
    """(raw, null_mean, threshold) of the Jensen-Shannon divergence on the merged bins."""
    cps, cqs = pair.coarse(min_expected, max_bins)
    k = len(cps)
    dn = pair.n + 0.5 * k
    dm = pair.m + 0.5 * k
    log = math.log
    to_p = to_q = 0.0
    for x, y in zip(cps, cqs, strict=True):
        p = (x + 0.5) / dn
        q = (y + 0.5) / dm
        mid = 0.5 * (p + q)
        to_p += p * log(p / mid)
        to_q += q * log(q / mid)
    return _chi2_scaled(0.5 * to_p + 0.5 * to_q, 0.125, k, pair.n_eff, alpha)


def _chi2_scaled(
    raw: float, scale: float, k: int, n_eff: float, alpha: float | None
) -> tuple[float, ...]:
    # PSI ~ X^2 / N and JS ~ X^2 / (8 N), X^2 ~ chi-square(k - 1): mean and upper alpha quantile.
    null = scale * (k - 1) / n_eff
    if alpha is None:
        return raw, null, math.nan
    return raw, null, scale * chi2_isf(alpha, max(k - 1, 1)) / n_eff - null


def _ks(pair: _Pair, alpha: float | None, min_expected: float, max_bins: int) -> tuple[float, ...]:
    """(raw, null_mean, threshold) of KS on the binned CDFs (the fine buckets)."""
    raw = float(np.maximum.reduce(pair.gap()))
    root = math.sqrt(pair.n_eff)
    null = KOLMOGOROV_MEAN / root
    if alpha is None:
        return raw, null, math.nan
    return raw, null, kolmogorov_isf(alpha) / root - null


def _wasserstein(
    pair: _Pair, alpha: float | None, min_expected: float, max_bins: int
) -> tuple[float, ...]:
    """(raw, null_mean, threshold) of Wasserstein-1 on the fine buckets.

    ``alpha=None`` skips the threshold (NaN), the costly part, when only the distance is read.
    """
    # Distribution mass sits at the bucket upper edges; W = sum |F - G| dx over the gaps.
    pair = pair.fine()
    upper = pair.upper
    dx = upper[1:] - upper[:-1]
    raw = float(np.dot(pair.gap()[1:-1], dx))
    f = (pair.cp[1:-1] + pair.cq[1:-1]) / (pair.n + pair.m)  # pooled CDF at each gap
    mean_bridge = _SQRT_2_OVER_PI * float(np.dot(np.sqrt(f * (1.0 - f)), dx))
    # Var(int B(F) dx) = sum_ij (min(F_i, F_j) - F_i F_j) dx_i dx_j
    #                  = sum_i F_i dx_i (dx_i + 2 sum_{j > i} dx_j) - (sum_i F_i dx_i)^2,
    # and dx_i + 2 sum_{j > i} dx_j = 2 u_last - u_i - u_{i+1}: O(B), no suffix sums.
    root = math.sqrt(pair.n_eff)
    if alpha is None:
        return raw, mean_bridge / root, math.nan
    g = f * dx
    span = (2.0 * float(upper[-1]) - upper[:-1]) - upper[1:]
    var = max(float(np.dot(g, span)) - float(np.add.reduce(g)) ** 2, 0.0)
    return raw, mean_bridge / root, math.sqrt(2.0 * var * math.log(1.0 / alpha)) / root


_KERNELS = {"psi": _psi, "js": _js, "ks": _ks, "wasserstein": _wasserstein}


def _all_distances(
    pair: _Pair, alpha: float, min_expected: float, max_bins: int
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in DISTANCES:
        raw, null, threshold = _KERNELS[name](pair, alpha, min_expected, max_bins)
        out[name] = {"raw": raw, "null_mean": null, "corrected": raw - null, "threshold": threshold}
    k = len(pair.coarse(min_expected, max_bins)[0])
    out["_sizes"] = {"n": pair.n, "m": pair.m, "bins": float(k)}
    return out


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
    pair = align(a, b)
    if pair.n == 0 or pair.m == 0:
        raise ValueError(
            f"both histograms must be non-empty, got counts {int(pair.n)} and {int(pair.m)}"
        )
    return _all_distances(pair, alpha, min_expected, max_bins)


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
        # Corrected distances of the last evaluation known so far: the decision distance, and
        # the other three once read (they are diagnostics, computed from _pair on first read,
        # so neither update() nor to_state() pays for them).
        self._distances: dict[str, float] = {}
        self._pair: _Pair | None = None  # the last evaluation's histograms, until distances read
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

    def _evaluate(self, pair: _Pair) -> None:
        """Decide on the configured distance of an aligned pair (both non-empty)."""
        alpha = 1.0 / self.expected_run_length
        raw, null, threshold = _KERNELS[self.distance](
            pair, alpha, self.min_expected, self.max_bins
        )
        self._decide(raw - null, threshold)
        self._pair = pair

    def _decide(self, score: float, threshold: float) -> None:
        """Record an evaluation's score and calibrated threshold and move the alarm."""
        self._distances = {self.distance: score}
        self._pair = None
        self._score = score
        # Statistical threshold, raised to the smallest drift worth an alarm if one is set:
        # on very large windows a real but negligible difference is significant.
        self._threshold = max(threshold, self.min_effect)
        if self._score > self._threshold:
            self._set_level(True)
        elif self._in_alarm:
            # Hysteresis: an alarm clears only once the score is well below the threshold.
            self._set_level(self._score > self.clear_fraction * self._threshold)
        else:
            self._set_level(False)

    def _all(self) -> dict[str, float]:
        pair = self._pair
        if pair is not None:
            # The configured distance is the score; the others need no threshold.
            out = {}
            for name in DISTANCES:
                if name == self.distance:
                    out[name] = self._score
                else:
                    raw, null, _ = _KERNELS[name](pair, None, self.min_expected, self.max_bins)
                    out[name] = raw - null
            self._distances = out
            self._pair = None
        return self._distances

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
        """All four corrected distances of the last evaluation (empty before the first).

        The three besides ``distance`` are diagnostics, computed on first read from the last
        evaluation's histograms. A detector rebuilt by ``from_state`` knows those that had been
        read when its state was taken (a state never pays for them), and a batch update
        (``update_many``) computes them only when asked to: otherwise only ``distance``'s.
        """
        return dict(self._all())

    def to_dict(self) -> dict:
        """Current result as a JSON-safe dict (for metrics and decision records)."""
        return {
            "alarm": self._alarm,
            "in_alarm": self._in_alarm,
            "score": self._score,
            "threshold": self._threshold,
            "distance": self.distance,
            "distances": dict(self._all()),
            "n_alarms": self._n_alarms,
        }

    def _result_state(self) -> dict:
        return {
            "distances": dict(self._distances),  # those known: computing the rest is not free
            "score": self._score,
            "threshold": self._threshold,
            **self._edge_state(),
        }

    def _load_result_state(self, state: dict) -> None:
        self._distances = {k: float(v) for k, v in state["distances"].items()}
        self._score = float(state["score"])
        self._threshold = float(state["threshold"])
        self._load_edge_state(state)


def _decide_many(
    detectors: list[Any],
    ok: list[bool],
    scores: dict[str, list[float]],
    thresholds: dict[str, list[float]],
) -> None:
    """``_decide(score, threshold)`` of each detector (``_hold()`` where not ``ok``: an empty
    side), in list order, inlined: a batch updates thousands of detectors, so no method call or
    result tuple per detector. ``scores`` and ``thresholds`` hold, for each distance the
    detectors use, one value per detector; a detector takes its own distance's. Bit for bit what
    ``_decide`` and ``_hold`` do (``max(threshold, min_effect)`` keeps ``threshold`` on a tie or
    a NaN, as the comparison below does)."""
    if len(scores) == 1:  # the usual batch: no look-up by name
        ((name, values),) = scores.items()
        rows: Any = zip(repeat(name), values, thresholds[name])
    else:
        rows = (
            (d.distance, scores[d.distance][j], thresholds[d.distance][j])
            for j, d in enumerate(detectors)
        )
    for det, good, (name, score, threshold) in zip(detectors, ok, rows, strict=True):
        in_alarm = det._in_alarm
        if not good:  # `_hold`: the level kept
            det._alarm = False
            continue
        det._distances = {name: score}
        det._pair = None
        det._score = score
        if threshold < det.min_effect:
            threshold = det.min_effect
        det._threshold = threshold
        if score > threshold:
            level = True
        elif in_alarm:  # hysteresis
            level = score > det.clear_fraction * threshold
        else:
            level = False
        det._alarm = alarm = level and not in_alarm
        det._in_alarm = level
        if alarm:
            det._n_alarms += 1
