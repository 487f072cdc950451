"""Summaries of many groups of values at once: one numpy pass instead of one call per group.

A flush of ingest summarises every (experiment, arm, metric) that received values: with 10,000
experiments that is tens of thousands of small groups, and one ``Summary.update_many`` per group
would cost more than the records themselves. :func:`summarise_groups` sorts the values by group
once and computes every group's moments, extremes and log-histogram buckets with segment
reductions, producing exactly the state :meth:`Summary.to_state` would (histogram counts, count,
min and max identical; sum, mean and m2 equal up to floating-point summation order).

:class:`GroupSummaries` keeps the result in columns and builds one group's state dict on demand,
so a flush can serialise experiment by experiment without holding every state at once.

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

__all__ = ["GroupSummaries", "summarise_groups"]

_TINY = float(np.finfo(np.float64).tiny)  # the zero bucket's bound, as in LogHistogram


def _stores(
    keys: np.ndarray, seg: np.ndarray, n_groups: int, max_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dense bucket stores of every group from bucket ``keys`` of the values whose (sorted,
    ascending) group index is ``seg``: per group the lowest key, the start and width of its
    counts in one concatenated ``counts`` array (width 0: no values), and a mask of groups whose
    key range exceeds ``max_bins`` (those need the collapsing store; the caller summarises them
    one by one). Returns (offsets, bases, widths, counts, too_wide).
    """
    offsets = np.zeros(n_groups, dtype=np.int64)
    bases = np.zeros(n_groups, dtype=np.int64)
    widths = np.zeros(n_groups, dtype=np.int64)
    too_wide = np.zeros(n_groups, dtype=bool)
    if not keys.shape[0]:
        return offsets, bases, widths, np.zeros(0, dtype=np.int64), too_wide
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
    offsets[present] = kmin
    bases[present] = base
    widths[present] = width
    return offsets, bases, widths, counts, too_wide


class GroupSummaries:
    """The summaries of many groups of values, in columns; :meth:`state` builds one group's
    ``Summary.to_state()`` dict.

    Parameters
    ----------
    values
        Finite float64 values.
    groups
        Integer group label of each value (same length).
    relative_accuracy, max_bins
        As for :class:`~armguard.detectors.summary.Summary`.
    numpy_counts
        Give the histogram bucket counts as int64 array views instead of lists (no per-bucket
        Python objects); serialise with ``orjson.OPT_SERIALIZE_NUMPY``. ``Summary.from_state``
        accepts either.

    Examples
    --------
    >>> import numpy as np
    >>> g = GroupSummaries(np.array([1.0, 2.0, 4.0, 8.0]), np.array([7, 3, 7, 3]))
    >>> g.labels.tolist(), [g.state(j)["n"] for j in range(len(g))], g.index(7)
    ([3, 7], [2, 2], 1)
    >>> g.state(1)["sum"], g.state(1)["h"]["p"][0]
    (5.0, 0)
    """

    def __init__(
        self,
        values: np.ndarray,
        groups: np.ndarray,
        *,
        relative_accuracy: float = 0.01,
        max_bins: int = 2048,
        numpy_counts: bool = False,
    ):
        values = np.asarray(values, dtype=np.float64)
        groups = np.asarray(groups, dtype=np.int64)
        if values.shape != groups.shape or values.ndim != 1:
            raise ValueError("values and groups must be 1-d arrays of the same length")
        if values.shape[0] and not np.isfinite(values).all():
            raise ValueError("values must be finite (no NaN or inf)")
        hist = LogHistogram(relative_accuracy=relative_accuracy, max_bins=max_bins)
        self._ra = hist.relative_accuracy
        self._mb = max_bins
        order = np.argsort(groups, kind="stable")
        g = groups[order]
        v = values[order]
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if g.shape[0] else g[:0]
        self.labels: np.ndarray = g[starts]
        n_groups = self.labels.shape[0]
        counts = np.diff(np.r_[starts, v.shape[0]]).astype(np.int64)
        self._index: dict[int, int] | None = None
        if not n_groups:
            self._cols: tuple[list[Any], ...] = ()
            self._pos = self._neg = ([], [], [], [])
            self._wide: dict[int, dict[str, Any]] = {}
            return
        sums = np.add.reduceat(v, starts)
        means = sums / counts
        dev = v - np.repeat(means, counts)
        m2 = np.add.reduceat(dev * dev, starts)
        seg = np.repeat(np.arange(n_groups), counts)
        pos = v >= _TINY
        neg = v <= -_TINY
        zeros = np.bincount(seg[~(pos | neg)], minlength=n_groups)
        p_off, p_base, p_width, p_counts, p_wide = _stores(
            hist._keys(v[pos]), seg[pos], n_groups, max_bins
        )
        n_off, n_base, n_width, n_counts, n_wide = _stores(
            hist._keys(-v[neg]), seg[neg], n_groups, max_bins
        )
        # One conversion per column; per-group work is then plain list indexing.
        self._cols = (
            counts.tolist(),
            sums.tolist(),
            means.tolist(),
            m2.tolist(),
            np.minimum.reduceat(v, starts).tolist(),
            np.maximum.reduceat(v, starts).tolist(),
            zeros.tolist(),
        )
        self._pos = (
            p_off.tolist(),
            p_base.tolist(),
            p_width.tolist(),
            p_counts if numpy_counts else p_counts.tolist(),
        )
        self._neg = (
            n_off.tolist(),
            n_base.tolist(),
            n_width.tolist(),
            n_counts if numpy_counts else n_counts.tolist(),
        )
        self._wide = {}
        for j in np.flatnonzero(p_wide | n_wide).tolist():
            # Keys span more than max_bins: the collapsing store decides which buckets merge.
            ref = Summary(relative_accuracy=relative_accuracy, max_bins=max_bins)
            ref.update_many(v[starts[j] : starts[j] + counts[j]])
            self._wide[j] = ref.to_state()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def index(self, label: int) -> int:
        """Position of a group label in :attr:`labels` (``KeyError`` if it has no values)."""
        if self._index is None:
            self._index = {g: j for j, g in enumerate(self.labels.tolist())}
        return self._index[label]

    def state(self, j: int) -> dict[str, Any]:
        """The ``Summary.to_state()`` dict of the group at position ``j``."""
        if self._wide and j in self._wide:
            return self._wide[j]
        counts, sums, means, m2s, mins, maxs, zeros = self._cols
        p_off, p_base, p_width, p_counts = self._pos
        n_off, n_base, n_width, n_counts = self._neg
        w = p_width[j]
        if w:
            b = p_base[j]
            pos = [p_off[j], p_counts[b : b + w]]
        else:
            pos = [0, []]
        w = n_width[j]
        if w:
            b = n_base[j]
            neg = [n_off[j], n_counts[b : b + w]]
        else:
            neg = [0, []]
        return {
            "v": 1,
            "n": counts[j],
            "sum": sums[j],
            "mean": means[j],
            "m2": m2s[j],
            "min": mins[j],
            "max": maxs[j],
            "h": {"ra": self._ra, "mb": self._mb, "p": pos, "n": neg, "z": zeros[j]},
        }


def summarise_groups(
    values: np.ndarray,
    groups: np.ndarray,
    *,
    relative_accuracy: float = 0.01,
    max_bins: int = 2048,
    numpy_counts: bool = False,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Summarise ``values`` per group label; return (sorted distinct labels, their states).

    Every state at once; see :class:`GroupSummaries` (same parameters) to build them one at a
    time.
    """
    g = GroupSummaries(
        values,
        groups,
        relative_accuracy=relative_accuracy,
        max_bins=max_bins,
        numpy_counts=numpy_counts,
    )
    return g.labels, [g.state(j) for j in range(len(g))]
