"""Many histogram pairs' distances in one vectorised pass (private).

A single evaluation of :mod:`~armguard.detectors.histogram_distance` makes some twenty numpy
calls on a few hundred buckets, and each call costs about a microsecond whatever the array size:
the floor of one update is ~15 us. Thousands of experiments evaluate at the same event-time
boundaries, so this module lays K (treatment, control) pairs of LogHistograms out on one flat
array, one segment per pair (the dense key layout of ``histogram_distance._key_layout``), and
computes every pair's distance with a fixed number of numpy calls.

Segments are handled without a Python loop over them:

* each store's counts go to their layout positions with one slice assignment (cheaper than
  building an index for one scatter), into a buffer reused between batches: fresh megabyte
  arrays cost a page fault per 4 KiB on first touch, more than the arithmetic on them;
* the CDF counts are one cumulative sum over all segments, each segment's start value
  subtracted. Counts are int64, so these sums are exact (and several times faster than a
  float cumulative sum) and a pair's values do not depend on what else is in the batch;
* the PSI/JS merged bins come from one ``searchsorted`` on the global pooled cumulative counts:
  the group boundary ``j`` of a pair is the first bucket whose inclusive pooled count ``x``
  satisfies ``x / step - 1e-9 >= j``, the single-pair rule, turned into the smallest such
  integer ``x`` (checked with the same float expression) so the search is exact;
* per-pair sums (PSI, JS and Wasserstein terms) are ``np.bincount`` with weights, which adds each
  pair's terms in order: again independent of the rest of the batch.

So a pair's results are bit for bit the same in a batch of one and in a batch of thousands (the
daemon relies on that: live and replayed decisions are byte-identical whatever the batching),
and equal to the single-pair code up to the rounding of ``np.log``/``np.exp`` against ``math``
and of sequential sums against ``np.dot`` (about 1e-15 relative). The fixed cost of a pass is
~100 us of numpy calls, so fewer than eight PSI or KS pairs are evaluated one by one with the
same arithmetic (``_EXACT``), bit for bit the batch's result.
"""

from __future__ import annotations

import math
from array import array
from typing import Any, NamedTuple

import numpy as np

from ._calibration import KOLMOGOROV_MEAN, chi2_isf, kolmogorov_isf
from .histogram_distance import _KERNELS, DISTANCES, _chi2_scaled, _histogram_of, _key_pair, align
from .summary import Summary

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CHUNK = 256
_FAR = 1 << 60  # beyond any bucket key
_KEEP = 1 << 22  # a scratch buffer larger than this (32 MiB, very wide layouts) is not kept


def _ints(values: list[int]) -> np.ndarray:
    """An int64 array of a list of ints, without numpy's per-element type discovery (which
    costs more than the rest of a pair's layout)."""
    return np.frombuffer(array("q", values), dtype=np.int64)


def _floats(values: list[float]) -> np.ndarray:
    """A float64 array of a list of numbers, as ``np.asarray(values, dtype=np.float64)``."""
    return np.frombuffer(array("d", values), dtype=np.float64)


class _Scratch:
    """A reusable int64 buffer for the large arrays of one batch at a time (private)."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = np.zeros(0, dtype=np.int64)

    def take(self, size: int) -> np.ndarray:
        if self.buf.shape[0] < size:
            self.buf = np.empty(max(size, 2 * self.buf.shape[0]), dtype=np.int64)
        return self.buf[:size]


# Free scratch buffers. list.pop and list.append are atomic, so concurrent batches each get
# their own buffer; one is kept per batch running at the same time.
_FREE: list[_Scratch] = []


def batch_distances(
    hists: list[tuple[Any, Any]],
    *,
    alpha: list[float],
    min_expected: list[float],
    max_bins: list[int],
    distances: set[str],
    thresholds: set[str],
) -> dict[str, Any]:
    """Distances of K pairs of LogHistograms, each pair of one relative accuracy.

    ``alpha``, ``min_expected`` and ``max_bins`` hold each pair's parameters. Every name in
    ``distances`` is computed for every pair, with its threshold when the name is also in
    ``thresholds`` (NaN otherwise). Returns arrays of length K: ``"n"``, ``"m"`` (the two
    counts, float), ``"bins"`` (merged PSI/JS bins, when PSI or JS is computed) and, per name,
    ``(raw, null_mean, threshold)``. Pairs with an empty side (``n == 0`` or ``m == 0``) get
    meaningless values; the caller holds them.

    Large batches run in chunks of ``_CHUNK`` pairs: the flat arrays then stay in the CPU's
    cache (a batch of thousands of pairs spans megabytes and runs twice as slow per pair).
    """
    return _run(_pair_layout, hists, alpha, min_expected, max_bins, distances, thresholds)


def batch_window_distances(
    windows: list[Any],
    *,
    alpha: list[float],
    min_expected: list[float],
    max_bins: list[int],
    distances: set[str],
    thresholds: set[str],
) -> dict[str, Any]:
    """:func:`batch_distances` of K (recent window, reference) pairs kept by bucket key.

    Each of ``windows`` holds ``win`` and ``ref``, int64 counts on one dense key layout
    ``(ln, nhi, plo)`` with element 0 always 0, and ``log_gamma`` (``window_drift._Keys``).
    The window is the first side (``"n"``), the reference the second (``"m"``). The same
    arithmetic as :func:`batch_distances` on the same buckets, so the same results bit for bit
    as that function's on the two histograms the arrays count.
    """
    return _run(_window_layout, windows, alpha, min_expected, max_bins, distances, thresholds)


def _run(
    lay_out: Any,
    items: list[Any],
    alpha: list[float],
    min_expected: list[float],
    max_bins: list[int],
    distances: set[str],
    thresholds: set[str],
) -> dict[str, Any]:
    try:
        scratch = _FREE.pop()
    except IndexError:  # first use, or another batch (thread) holds it
        scratch = _Scratch()
    try:
        if len(items) <= _CHUNK:
            return _batch(
                lay_out(scratch, items), alpha, min_expected, max_bins, distances, thresholds
            )
        parts = [
            _batch(
                lay_out(scratch, items[i : i + _CHUNK]),
                alpha[i : i + _CHUNK],
                min_expected[i : i + _CHUNK],
                max_bins[i : i + _CHUNK],
                distances,
                thresholds,
            )
            for i in range(0, len(items), _CHUNK)
        ]
    finally:
        if scratch.buf.shape[0] <= _KEEP:
            _FREE.append(scratch)
    out: dict[str, Any] = {}
    for key, value in parts[0].items():
        if isinstance(value, tuple):
            out[key] = tuple(np.concatenate([p[key][i] for p in parts]) for i in range(3))
        else:
            out[key] = np.concatenate([p[key] for p in parts])
    return out


class _Layout(NamedTuple):
    """Both sides' counts of K pairs on one flat array (private).

    ``w`` holds the first side's counts at ``[0, total)`` and the second's at
    ``[total, 2 total)``; pair ``k`` spans ``[seg[k], seg[k + 1])`` of each, on the dense key
    layout ``(ln[k], nhi[k], plo[k])`` of ``histogram_distance._key_layout``. ``buf`` is the
    scratch buffer ``w`` starts, ``5 total + 3`` long; ``log_gamma()`` gives each pair's.
    """

    buf: np.ndarray
    total: int
    seg: np.ndarray
    sizes: np.ndarray
    ln: np.ndarray
    nhi: np.ndarray
    plo: np.ndarray
    log_gamma: Any


def _pair_layout(scratch: _Scratch, hists: list[tuple[Any, Any]]) -> _Layout:
    k_pairs = len(hists)
    stores: list[tuple] = []  # treatment, control, treatment, ...
    flat: list[int] = []
    for ht, hc in hists:
        s = ht.stores()
        t = hc.stores()
        stores += (s, t)
        flat += (s[0], len(s[1]), s[2], s[3], len(s[4]), t[0], len(t[1]), t[2], t[3], len(t[4]))
    meta = _ints(flat).reshape(k_pairs, 2, 5)
    n_off, n_len, zero, p_off, p_len = (meta[:, :, i] for i in range(5))
    # The layout of each pair (see histogram_distance._key_layout): negative keys nlo..nhi-1
    # (largest first), the zero bucket at ln, positive keys plo..phi-1 after it.
    if n_len.any():
        _, nhi, ln = _span(n_off, n_len)
    else:  # the common case: no negative values
        nhi = ln = np.zeros(k_pairs, dtype=np.int64)
    plo, _, lp = _span(p_off, p_len)
    sizes = ln + 1 + lp
    seg = np.zeros(k_pairs + 1, dtype=np.int64)  # segment k spans [seg[k], seg[k + 1])
    np.cumsum(sizes, out=seg[1:])
    total = int(seg[-1])
    # Both sides' counts on the layout: treatment at [0, total), control at [total, 2 total).
    # Every large array of the pass lives in one reusable buffer: fresh megabyte arrays cost
    # a page fault per 4 KiB on first touch, more than the arithmetic on them.
    buf = scratch.take(5 * total + 3)
    w = buf[: 2 * total]
    w.fill(0)
    side = np.stack((seg[:-1], seg[:-1] + total), axis=1)
    # One slice assignment per store: cheaper than building an index for a scatter.
    at = (side + (ln + 1 - plo)[:, None] + p_off).ravel().tolist()
    ends = (side + (ln + 1 - plo)[:, None] + p_off + p_len).ravel().tolist()
    for a, b, s in zip(at, ends, stores, strict=True):
        if b > a:
            w[a:b] = s[4]
    if n_len.any():
        at = (side + nhi[:, None] - n_off - n_len).ravel().tolist()
        for i, s in enumerate(stores):
            counts = s[1]
            if counts.shape[0]:
                w[at[i] : at[i] + counts.shape[0]] = counts[::-1]
    w[(side + ln[:, None]).ravel()] = zero.ravel()
    return _Layout(
        buf, total, seg, sizes, ln, nhi, plo, lambda: [math.log(h.gamma) for h, _ in hists]
    )


def _window_layout(scratch: _Scratch, windows: list[Any]) -> _Layout:
    # A window's arrays are its layout plus one leading empty position: that is the layout
    # one negative key wider, (ln + 1, nhi + 1, plo), whose extra key nhi is empty. So each
    # side is one concatenation of whole arrays.
    k_pairs = len(windows)
    flat: list[int] = []
    for x in windows:
        flat += (x.win.shape[0], x.ln + 1, x.nhi + 1, x.plo)
    meta = _ints(flat).reshape(k_pairs, 4)
    sizes = meta[:, 0]
    seg = np.zeros(k_pairs + 1, dtype=np.int64)
    np.cumsum(sizes, out=seg[1:])
    total = int(seg[-1])
    buf = scratch.take(5 * total + 3)
    np.concatenate([x.win for x in windows] + [x.ref for x in windows], out=buf[: 2 * total])
    return _Layout(
        buf, total, seg, sizes, meta[:, 1], meta[:, 2], meta[:, 3],
        lambda: [x.log_gamma for x in windows],
    )  # fmt: skip


def _batch(
    layout: _Layout,
    alpha: list[float],
    min_expected: list[float],
    max_bins: list[int],
    distances: set[str],
    thresholds: set[str],
) -> dict[str, Any]:
    buf, total, seg, sizes = layout.buf, layout.total, layout.seg, layout.sizes
    k_pairs = sizes.shape[0]
    w = buf[: 2 * total]
    cp = buf[2 * total : 3 * total + 1]
    cq = buf[3 * total + 1 : 4 * total + 2]
    pooled = buf[4 * total + 2 :]
    # Exclusive cumulative counts: cp[i] counts the treatment values before global position i.
    cp[0] = 0
    cq[0] = 0
    np.cumsum(w[:total], out=cp[1:])
    np.cumsum(w[total:], out=cq[1:])
    np.add(cp, cq, out=pooled)
    a = cp[seg[:-1]]
    b = cq[seg[:-1]]
    n = (cp[seg[1:]] - a).astype(np.float64)
    m = (cq[seg[1:]] - b).astype(np.float64)
    out: dict[str, Any] = {"n": n, "m": m}
    ok = (n > 0) & (m > 0)
    # Held pairs (an empty side) get placeholder counts so nothing divides by zero.
    nn = np.where(ok, n, 1.0)
    mm = np.where(ok, m, 1.0)
    n_eff = nn * mm / (nn + mm)
    alpha_a = _floats(alpha)
    with np.errstate(divide="ignore", invalid="ignore"):  # held pairs only
        if distances & {"psi", "js"}:
            _coarse_distances(
                out, cp, cq, pooled, seg, a, b, nn, mm, n_eff, ok, alpha_a, min_expected, max_bins,
                distances, thresholds,
            )  # fmt: skip
        if distances & {"ks", "wasserstein"}:
            sid = np.repeat(np.arange(k_pairs), sizes)
            # Inclusive CDFs at every position (the single-pair gap without its two zero ends).
            gap = np.abs((cp[1:] - a[sid]) / nn[sid] - (cq[1:] - b[sid]) / mm[sid])
            root = np.sqrt(n_eff)
            if "ks" in distances:
                raw = np.maximum.reduceat(gap, seg[:-1])
                null = KOLMOGOROV_MEAN / root
                if "ks" in thresholds:
                    thr = _per_alpha(kolmogorov_isf, alpha_a) / root - null
                else:
                    thr = np.full(k_pairs, math.nan)
                out["ks"] = (raw, null, thr)
            if "wasserstein" in distances:
                out["wasserstein"] = _wasserstein(
                    layout, sid, w, total, cp, cq, gap, a, b, nn, mm, root, alpha_a,
                    "wasserstein" in thresholds,
                )  # fmt: skip
    return out


def _span(off: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair: lowest key, one past the highest and the width of both sides' stores."""
    has = length > 0
    lo = np.where(has, off, _FAR)
    hi = np.where(has, off + length, -_FAR)
    lo = np.minimum(lo[:, 0], lo[:, 1])
    hi = np.maximum(hi[:, 0], hi[:, 1])
    some = hi > lo  # else neither side has a bucket of this sign
    lo = np.where(some, lo, 0)
    hi = np.where(some, hi, 0)
    return lo, hi, hi - lo


def _per_alpha(fn: Any, alpha: np.ndarray) -> np.ndarray:
    """``fn(alpha)`` for every pair, computed once per distinct alpha."""
    values, inverse = np.unique(alpha, return_inverse=True)
    return np.array([fn(x) for x in values.tolist()])[inverse]


def _coarse_distances(
    out: dict[str, Any],
    cp: np.ndarray,
    cq: np.ndarray,
    pooled: np.ndarray,
    seg: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    n: np.ndarray,
    m: np.ndarray,
    n_eff: np.ndarray,
    ok: np.ndarray,
    alpha: np.ndarray,
    min_expected: list[float],
    max_bins: list[int],
    distances: set[str],
    thresholds: set[str],
) -> None:
    """PSI and JS on the merged bins of every pair (see ``histogram_distance._coarsen``)."""
    k_pairs = n.shape[0]
    tot = n + m
    step = np.maximum(_floats(min_expected) * tot / np.minimum(n, m), tot / _floats(max_bins))
    last = np.floor(tot / step - 1e-9) - 1.0
    n_bounds = np.where(ok & (last >= 1.0), last, 0.0).astype(np.int64)
    n_j = int(n_bounds.sum())
    # Boundary j = 1 .. last of every pair: pair index and j.
    pj = np.repeat(np.arange(k_pairs), n_bounds)
    first = np.cumsum(n_bounds)
    first -= n_bounds
    jj = np.arange(n_j, dtype=np.float64) - np.repeat(first - 1, n_bounds)
    sj = step[pj]
    # The smallest integer pooled count x with x / step - 1e-9 >= j, by the very expression
    # the single-pair code evaluates (the ceil is within one of it; step up or down to it).
    x = np.ceil(sj * (jj + 1e-9))
    for _ in range(8):
        up = x / sj - 1e-9 < jj
        down = ~up & ((x - 1.0) / sj - 1e-9 >= jj)
        if not (up.any() or down.any()):
            break
        x += up
        x -= down
    ab = (a + b)[pj]
    # First position whose inclusive pooled count reaches x: pooled[g + 1] >= target.
    g = pooled.searchsorted(ab + x.astype(np.int64)) - 1
    before = pooled[g] - ab  # pooled count before the group's first bucket
    # A group is kept when values lie between its start and the previous boundary's.
    prev = np.empty(n_j, dtype=np.int64)
    prev[:1] = 0
    prev[1:] = before[:-1]
    prev[first[n_bounds > 0]] = 0
    keep = before > prev
    groups = 1 + np.bincount(pj[keep], minlength=k_pairs)
    bounds = np.concatenate((seg, g[keep]))
    bounds.sort(kind="stable")  # two sorted runs: a merge
    gp = np.repeat(np.arange(k_pairs), groups)
    kf = groups.astype(np.float64)
    p = (np.diff(cp[bounds]) + 0.5) / (n + 0.5 * kf)[gp]
    q = (np.diff(cq[bounds]) + 0.5) / (m + 0.5 * kf)[gp]
    out["bins"] = groups
    df = groups - 1
    for name, scale in (("psi", 1.0), ("js", 0.125)):
        if name not in distances:
            continue
        if name == "psi":
            raw = np.bincount(gp, (p - q) * np.log(p / q), minlength=k_pairs)
        else:
            mid = 0.5 * (p + q)
            to_p = np.bincount(gp, p * np.log(p / mid), minlength=k_pairs)
            to_q = np.bincount(gp, q * np.log(q / mid), minlength=k_pairs)
            raw = 0.5 * to_p + 0.5 * to_q
        null = scale * df / n_eff
        if name in thresholds:
            thr = scale * _chi2_isf_many(alpha, np.maximum(df, 1)) / n_eff - null
        else:
            thr = np.full(k_pairs, math.nan)
        out[name] = (raw, null, thr)


def _chi2_isf_many(alpha: np.ndarray, df: np.ndarray) -> np.ndarray:
    """``chi2_isf(alpha, df)`` for every pair, computed once per distinct (alpha, df)."""
    cache: dict[tuple[float, int], float] = {}
    out = []
    for key in zip(alpha.tolist(), df.tolist(), strict=True):
        v = cache.get(key)
        if v is None:
            v = cache[key] = chi2_isf(*key)
        out.append(v)
    return np.array(out)


def _wasserstein(
    layout: _Layout,
    sid: np.ndarray,
    w: np.ndarray,
    total: int,
    cp: np.ndarray,
    cq: np.ndarray,
    gap: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    n: np.ndarray,
    m: np.ndarray,
    root: np.ndarray,
    alpha: np.ndarray,
    threshold: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wasserstein-1 on the buckets either side lists (see ``histogram_distance._wasserstein``)."""
    seg, ln, nhi, plo = layout.seg, layout.ln, layout.nhi, layout.plo
    k_pairs = n.shape[0]
    idx = np.flatnonzero((w[:total] + w[total:]) > 0)
    pk = sid[idx]
    local = idx - seg[:-1][pk]
    lg = np.array(layout.log_gamma())[pk]
    ln_k = ln[pk]
    neg = local < ln_k
    # Negative bucket of key k: upper edge -exp((k - 1) lg); positive: exp(k lg); zero: 0.
    key = np.where(neg, nhi[pk] - 2 - local, local + (plo[pk] - ln_k - 1))
    upper = np.exp(key.astype(np.float64) * lg)
    upper = np.where(neg, -upper, np.where(local == ln_k, 0.0, upper))
    # Gaps between consecutive listed buckets of the same pair.
    inner = pk[1:] == pk[:-1]
    gp = pk[:-1][inner]
    dx = (upper[1:] - upper[:-1])[inner]
    at = idx[:-1][inner]  # the bucket before each gap: CDFs inclusive of it
    raw = np.bincount(gp, gap[at] * dx, minlength=k_pairs)
    f = ((cp[at + 1] - a[gp]) + (cq[at + 1] - b[gp])) / (n + m)[gp]
    mean_bridge = _SQRT_2_OVER_PI * np.bincount(gp, np.sqrt(f * (1.0 - f)) * dx, minlength=k_pairs)
    null = mean_bridge / root
    if not threshold:
        return raw, null, np.full(k_pairs, math.nan)
    # Var(int B(F) dx) = sum_i F_i dx_i (2 u_last - u_i - u_{i+1}) - (sum_i F_i dx_i)^2
    last_at = np.cumsum(np.bincount(pk, minlength=k_pairs)) - 1  # each pair's last bucket
    u_last = upper[last_at[gp]]
    g = f * dx
    span = (2.0 * u_last - upper[:-1][inner]) - upper[1:][inner]
    var = np.bincount(gp, g * span, minlength=k_pairs) - np.bincount(gp, g, minlength=k_pairs) ** 2
    var = np.maximum(var, 0.0)
    thr = np.sqrt(2.0 * var * np.log(1.0 / alpha)) / root
    return raw, null, thr


def detector_distances(
    run: Any, items: list[Any], detectors: list[Any], all_distances: bool
) -> tuple[list[bool], dict[str, list[float]], dict[str, list[float]]]:
    """The batch pass ``run`` (:func:`batch_distances` or :func:`batch_window_distances`) on
    ``items``, one per detector, with each detector's parameters: whether both sides were
    non-empty, and per distance name the corrected distances and the thresholds, one per
    detector. The distances are those the detectors decide on, all four with
    ``all_distances``; the thresholds those they decide on."""
    names = {det.distance for det in detectors}
    res = run(
        items,
        alpha=[1.0 / det.expected_run_length for det in detectors],
        min_expected=[det.min_expected for det in detectors],
        max_bins=[det.max_bins for det in detectors],
        distances=set(DISTANCES) if all_distances else names,
        thresholds=names,
    )
    ok = ((res["n"] > 0) & (res["m"] > 0)).tolist()
    corrected = {name: (res[name][0] - res[name][1]).tolist() for name in DISTANCES if name in res}
    return ok, corrected, {name: res[name][2].tolist() for name in names}


def evaluate_many(
    detectors: list[Any], pairs: list[tuple[Any, Any]], all_distances: bool
) -> list[tuple[float, float, dict[str, float] | None, Any] | None]:
    """Evaluate each histogram drift detector's distance on its (treatment, control) pair.

    Returns, per detector, None when a side is empty (the detector holds), else ``(score,
    threshold, distances, pair)``: the corrected decision distance, its calibrated threshold,
    all four corrected distances when ``all_distances`` (else None) and the aligned pair when it
    was evaluated singly (so the detector can compute the others when read), else None. Pairs of
    LogHistograms (or Summaries) of one relative accuracy go through :func:`batch_distances`,
    anything else (bins tuples, mixed accuracies) through the single-pair code: which path a
    pair takes depends on the pair only, so its result does not depend on the rest of the batch.
    """
    results: list[tuple[float, float, dict[str, float] | None, Any] | None] = [None] * len(pairs)
    batch: list[int] = []
    hists: list[tuple[Any, Any]] = []
    single: list[int] = []
    for i, (t, c) in enumerate(pairs):
        # Summaries are the common input: skip the generic look-up for them.
        ht = t.histogram if type(t) is Summary else _histogram_of(t)
        hc = c.histogram if type(c) is Summary else _histogram_of(c)
        if ht is not None and hc is not None and ht.relative_accuracy == hc.relative_accuracy:
            batch.append(i)
            hists.append((ht, hc))
        else:
            single.append(i)
    if len(batch) < _SMALL and not all_distances:
        # A few pairs: the vectorised pass costs ~100 us of fixed numpy overhead, the pair
        # alone ~20 us. PSI and KS have single-pair forms bit for bit equal to the batch.
        few = [i for i in batch if detectors[i].distance in _EXACT]
        if few:
            keep = set(few)
            hists = [h for i, h in zip(batch, hists, strict=True) if i not in keep]
            batch = [i for i in batch if i not in keep]
            for i in few:
                det = detectors[i]
                pair = _key_pair(*_histogram_pair(pairs[i]))
                if pair.n and pair.m:
                    raw, null, thr = _EXACT[det.distance](
                        pair, 1.0 / det.expected_run_length, det.min_expected, det.max_bins
                    )
                    results[i] = (raw - null, thr, None, pair)
    for i in single:
        det = detectors[i]
        t, c = pairs[i]
        pair = align(t, c)
        if pair.n and pair.m:
            alpha = 1.0 / det.expected_run_length
            raw, null, thr = _KERNELS[det.distance](pair, alpha, det.min_expected, det.max_bins)
            dist = None
            if all_distances:
                dist = {
                    name: raw - null
                    if name == det.distance
                    else _corrected(pair, name, det.min_expected, det.max_bins)
                    for name in DISTANCES
                }
            results[i] = (raw - null, thr, dist, None if all_distances else pair)
    if not batch:
        return results
    dets = [detectors[i] for i in batch]
    ok, corrected, thresholds = detector_distances(batch_distances, hists, dets, all_distances)
    for j, i in enumerate(batch):
        if ok[j]:
            name = dets[j].distance
            dist = {d: corrected[d][j] for d in DISTANCES} if all_distances else None
            results[i] = (corrected[name][j], thresholds[name][j], dist, None)
    return results


def _histogram_pair(pair: tuple[Any, Any]) -> tuple[Any, Any]:
    return _histogram_of(pair[0]), _histogram_of(pair[1])


def _psi_exact(
    pair: Any, alpha: float | None, min_expected: float, max_bins: int
) -> tuple[float, ...]:
    """``histogram_distance._psi`` with the batch's arithmetic: ``np.log`` (which may differ
    from ``math.log`` in the last bit) and the terms summed in order, as ``np.bincount`` does."""
    cps, cqs = pair.coarse(min_expected, max_bins)
    k = len(cps)
    p = (np.array(cps) + 0.5) / (pair.n + 0.5 * k)
    q = (np.array(cqs) + 0.5) / (pair.m + 0.5 * k)
    raw = 0.0
    for term in ((p - q) * np.log(p / q)).tolist():
        raw += term
    return _chi2_scaled(raw, 1.0, k, pair.n_eff, alpha)


# Single-pair forms whose results equal the batch's bit for bit (KS is a maximum of exact
# quotients either way); a pair's result must not depend on the size of its batch.
_EXACT = {"psi": _psi_exact, "ks": _KERNELS["ks"]}
_SMALL = 8  # below this many batchable pairs, PSI and KS pairs are evaluated one by one


def _corrected(pair: Any, name: str, min_expected: float, max_bins: int) -> float:
    raw, null, _ = _KERNELS[name](pair, None, min_expected, max_bins)
    return raw - null
