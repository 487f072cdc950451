"""Summaries of many groups of values at once: one numpy pass instead of one call per group.

A flush of ingest summarises every (experiment, arm, metric) that received values: with 10,000
experiments that is tens of thousands of small groups, and one ``Summary.update_many`` per group
would cost more than the records themselves. :func:`summarise_groups` sorts the values by group
once and computes every group's moments, extremes and log-histogram buckets with segment
reductions, producing exactly the state :meth:`Summary.to_state` would (histogram counts, count,
min and max identical; sum, mean and m2 equal up to floating-point summation order).

Examples
--------
>>> import numpy as np
>>> from armguard.detectors.summary import Summary
>>> rng = np.random.default_rng(42)
>>> values = rng.gamma(2.0, 50.0, size=1000)
>>> groups = rng.integers(0, 3, size=1000)
>>> ids, states = summarise_groups(values, groups)
>>> ids.tolist(), [s["n"] for s in states]
([0, 1, 2], [345, 321, 334])
>>> ref = Summary.from_values(values[groups == 1])
>>> Summary.from_state(states[1]).histogram == ref.histogram
True
>>> round(Summary.from_state(states[1]).mean - ref.mean, 9)
0.0
"""

from __future__ import annotations

from typing import Any

import numpy as np

from armguard.detectors.summary import LogHistogram, Summary

__all__ = ["summarise_groups"]

_TINY = float(np.finfo(np.float64).tiny)  # the zero bucket's bound, as in LogHistogram
_EMPTY_STORE: list[Any] = [0, []]


def _stores(
    keys: np.ndarray, seg: np.ndarray, n_groups: int, max_bins: int, numpy_counts: bool
) -> tuple[list[list[Any]], np.ndarray]:
    """Dense bucket stores ``[offset, counts]`` per group from bucket ``keys`` of the values
    whose (sorted, ascending) group index is ``seg``; also a mask of groups whose key range
    exceeds ``max_bins`` (those need the collapsing store: the caller summarises them one by one).
    """
    out: list[list[Any]] = [_EMPTY_STORE] * n_groups
    too_wide = np.zeros(n_groups, dtype=bool)
    if not keys.shape[0]:
        return out, too_wide
    starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
    present = seg[starts]
    kmin = np.minimum.reduceat(keys, starts)
    kmax = np.maximum.reduceat(keys, starts)
    width = kmax - kmin + 1
    wide = width > max_bins
    too_wide[present[wide]] = True
    width = np.where(wide, 0, width)
    base = np.r_[0, np.cumsum(width)[:-1]]
    lengths = np.diff(np.r_[starts, keys.shape[0]])
    seg_of_value = np.repeat(np.arange(present.shape[0]), lengths)
    keep = ~wide[seg_of_value]
    idx = base[seg_of_value[keep]] + (keys[keep] - kmin[seg_of_value[keep]])
    counts = np.bincount(idx, minlength=int(width.sum()))
    # Views into one array (no per-bucket Python objects), or one conversion then list slices.
    counts_src: Any = counts if numpy_counts else counts.tolist()
    for g, k0, b, w in zip(
        present.tolist(), kmin.tolist(), base.tolist(), width.tolist(), strict=True
    ):
        if w:
            out[g] = [k0, counts_src[b : b + w]]
    return out, too_wide


def summarise_groups(
    values: np.ndarray,
    groups: np.ndarray,
    *,
    relative_accuracy: float = 0.01,
    max_bins: int = 2048,
    numpy_counts: bool = False,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Summarise ``values`` per group label; return (sorted distinct labels, their states).

    Parameters
    ----------
    values
        Finite float64 values.
    groups
        Integer group label of each value (same length).
    relative_accuracy, max_bins
        As for :class:`~armguard.detectors.summary.Summary`.
    numpy_counts
        Give the histogram bucket counts as int64 array views instead of lists: much less
        memory and time for many groups; serialise with ``orjson.OPT_SERIALIZE_NUMPY``
        (``Summary.from_state`` accepts either).

    Returns
    -------
    labels, states
        The distinct labels ascending, and for each a ``Summary.to_state()`` dict of its values.
    """
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    if values.shape != groups.shape or values.ndim != 1:
        raise ValueError("values and groups must be 1-d arrays of the same length")
    if not values.shape[0]:
        return np.zeros(0, dtype=np.int64), []
    if not np.isfinite(values).all():
        raise ValueError("values must be finite (no NaN or inf)")
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    v = values[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    labels = g[starts]
    n_groups = labels.shape[0]
    counts = np.diff(np.r_[starts, v.shape[0]])
    sums = np.add.reduceat(v, starts)
    means = sums / counts
    dev = v - np.repeat(means, counts)
    m2 = np.add.reduceat(dev * dev, starts)
    mins = np.minimum.reduceat(v, starts)
    maxs = np.maximum.reduceat(v, starts)

    seg = np.repeat(np.arange(n_groups), counts)
    hist = LogHistogram(relative_accuracy=relative_accuracy, max_bins=max_bins)
    pos = v >= _TINY
    neg = v <= -_TINY
    zeros = np.bincount(seg[~(pos | neg)], minlength=n_groups)
    p_stores, p_wide = _stores(hist._keys(v[pos]), seg[pos], n_groups, max_bins, numpy_counts)
    n_stores, n_wide = _stores(hist._keys(-v[neg]), seg[neg], n_groups, max_bins, numpy_counts)
    wide = p_wide | n_wide
    ra = hist.relative_accuracy

    states = []
    for j, (n, s, mean, sq, lo, hi, z, ps, ns) in enumerate(
        zip(
            counts.tolist(),
            sums.tolist(),
            means.tolist(),
            m2.tolist(),
            mins.tolist(),
            maxs.tolist(),
            zeros.tolist(),
            p_stores,
            n_stores,
            strict=True,
        )
    ):
        if wide[j]:
            # Keys span more than max_bins: the collapsing store decides which buckets merge.
            ref = Summary(relative_accuracy=relative_accuracy, max_bins=max_bins)
            ref.update_many(v[starts[j] : starts[j] + n])
            states.append(ref.to_state())
            continue
        states.append(
            {
                "v": 1,
                "n": n,
                "sum": s,
                "mean": mean,
                "m2": sq,
                "min": lo,
                "max": hi,
                "h": {"ra": ra, "mb": max_bins, "p": ps, "n": ns, "z": z},
            }
        )
    return labels, states
