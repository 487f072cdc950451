"""Summaries of many groups of values at once: one numpy pass instead of one call per group.

A flush of ingest summarises every (experiment, arm, metric) that received values: with 10,000
experiments that is tens of thousands of small groups, and one ``Summary.update_many`` per group
would cost more than the records themselves. :func:`summarise_groups` computes every group's
moments and extremes in one pass over the values in input order (``bincount`` and
``ufunc.at``: no sort of the values) and its log-histogram buckets with one sort of the (group,
bucket key) codes, producing exactly the state :meth:`Summary.to_state` would (histogram counts,
count, min and max identical; sum, mean and m2 equal up to floating-point summation order).

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

from typing import Any, NamedTuple

import numpy as np

from armguard.detectors.summary import LogHistogram, Summary

__all__ = ["Columns", "GroupSummaries", "StoreColumns", "summarise_groups"]

_TINY = float(np.finfo(np.float64).tiny)  # the zero bucket's bound, as in LogHistogram


class _Stores:
    """The histogram stores (one sign) of every group: the non-empty buckets as (key, count)
    pairs, concatenated group after group (what a version-2 summary record holds), and on
    demand (:meth:`columns`) the encoding ``Summary.to_state()`` chooses for each group."""

    __slots__ = (
        "nnz",
        "offsets",
        "pair_counts",
        "pair_keys",
        "pair_seg",
        "starts",
        "wide",
        "width",
    )

    def __init__(self, keys: np.ndarray, seg: np.ndarray, n_groups: int, max_bins: int) -> None:
        """``keys``: bucket keys of the values whose group position is ``seg`` (any order)."""
        pair_seg, pair_keys, pair_counts = _distinct_pairs(seg, keys)
        nnz = np.bincount(pair_seg, minlength=n_groups)
        starts = np.r_[0, np.cumsum(nnz)[:-1]]
        present = nnz > 0
        offsets = np.zeros(n_groups, dtype=np.int64)
        width = np.zeros(n_groups, dtype=np.int64)
        offsets[present] = pair_keys[starts[present]]
        width[present] = pair_keys[starts[present] + nnz[present] - 1] - offsets[present] + 1
        # Wider than max_bins: the collapsing store decides which buckets merge (GroupSummaries
        # summarises those groups one by one).
        self.wide = width > max_bins
        self.offsets = offsets
        self.width = width
        self.starts = starts
        self.nnz = nnz
        self.pair_seg = pair_seg
        self.pair_keys = pair_keys
        self.pair_counts = pair_counts

    def columns(self, numpy_counts: bool) -> tuple[Any, ...]:
        """Per group (lists): kind (0 empty, 1 dense, 2 sparse), the dense offset, the start
        and length of its slice; then the three concatenated arrays the slices index (pair
        keys, pair counts, dense counts), as int64 arrays or lists. Dense or sparse is the
        choice of ``_sparse_is_smaller`` in summary.py, so states come out byte-identical."""
        nnz, width, offsets = self.nnz, self.width, self.offsets
        present = (nnz > 0) & ~self.wide
        sparse = present & (2 * nnz < width + 1)
        dense = present & ~sparse
        d_width = np.where(dense, width, 0)
        d_base = np.r_[0, np.cumsum(d_width)[:-1]]
        pair_seg, pair_keys = self.pair_seg, self.pair_keys
        in_dense = dense[pair_seg]
        d_seg = pair_seg[in_dense]
        d_counts = np.zeros(int(d_width.sum()), dtype=np.int64)
        d_counts[d_base[d_seg] + pair_keys[in_dense] - offsets[d_seg]] = self.pair_counts[in_dense]
        kind = np.where(sparse, 2, np.where(d_width > 0, 1, 0))
        at = np.where(sparse, self.starts, d_base)
        length = np.where(sparse, nnz, d_width)
        arrays = (pair_keys, self.pair_counts, d_counts)
        if not numpy_counts:
            arrays = tuple(a.tolist() for a in arrays)
        return (kind.tolist(), offsets.tolist(), at.tolist(), length.tolist(), *arrays)


def _store_state(cols: tuple[Any, ...] | None, j: int) -> list[Any]:
    """Group ``j``'s store as ``Summary.to_state()`` encodes it, from :meth:`_Stores.columns`:
    ``[offset, dense counts]``, ``[keys, counts]`` or ``[0, []]`` when empty."""
    if cols is None:
        return [0, []]
    kind, off, at, length, keys, pcounts, dcounts = cols
    k = kind[j]
    b = at[j]
    e = b + length[j]
    if k == 2:
        return [keys[b:e], pcounts[b:e]]
    if k:
        return [off[j], dcounts[b:e]]
    return [0, []]


def _distinct_pairs(seg: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (segment, key) pairs ascending, and how often each occurs."""
    if not keys.shape[0]:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    kmin = int(keys.min())
    span = int(keys.max()) - kmin + 1
    space = (int(seg.max()) + 1) * span
    if space <= 4 * keys.shape[0]:  # few possible codes (few groups): count each, no sort
        tally = np.bincount(seg * span + (keys - kmin), minlength=space)
        distinct = np.flatnonzero(tally)
        pair_seg, pair_key = np.divmod(distinct, span)
        return pair_seg, pair_key + kmin, tally[distinct]
    if space < 2**62:  # one sort of int64 codes (seg, key)
        code = seg * span + (keys - kmin)
        # int32 when the codes fit: numpy's SIMD sort takes ~40% less time than on int64.
        code = np.sort(code.astype(np.int32)).astype(np.int64) if space < 2**31 else np.sort(code)
        first = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
        pair_seg, pair_key = np.divmod(code[first], span)
        pair_key += kmin
    else:  # codes would overflow: a two-key sort
        order = np.lexsort((keys, seg))
        s, k = seg[order], keys[order]
        first = np.flatnonzero(np.r_[True, (s[1:] != s[:-1]) | (k[1:] != k[:-1])])
        pair_seg, pair_key = s[first], k[first]
    return pair_seg, pair_key, np.diff(np.r_[first, keys.shape[0]])


class StoreColumns(NamedTuple):
    """One sign's histogram stores of every group, as a version-2 record's ``pos``/``neg``
    columns hold them: group ``j``'s non-empty buckets are pairs ``bounds[j]`` up to
    ``bounds[j + 1]`` of ``keys`` and ``counts`` (``nnz[j]`` of them)."""

    bounds: np.ndarray  # int64, one more than there are groups
    nnz: np.ndarray
    keys: np.ndarray
    counts: np.ndarray


class Columns(NamedTuple):
    """Every group's summary in columns (numpy arrays, one entry per group): what a version-2
    summary record's rows hold for its groups (:mod:`armguard.daemon.summary_record`).
    ``pos``/``neg`` are ``None`` when no value has that sign."""

    count: np.ndarray
    sum: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray
    zero: np.ndarray
    pos: StoreColumns | None
    neg: StoreColumns | None


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
        Give the histogram bucket keys and counts as int64 array views instead of lists (no
        per-bucket Python objects); serialise with ``orjson.OPT_SERIALIZE_NUMPY`` (the JSON is
        the same). ``Summary.from_state`` accepts either.

    Examples
    --------
    >>> import numpy as np
    >>> g = GroupSummaries(np.array([1.0, 2.0, 4.0, 8.0]), np.array([7, 3, 7, 3]))
    >>> g.labels.tolist(), [g.state(j)["n"] for j in range(len(g))], g.index(7)
    ([3, 7], [2, 2], 1)
    >>> g.state(1)["sum"], g.state(1)["h"]["p"]  # keys 0 and 70 of 1.0 and 4.0: sparse
    (5.0, [[0, 70], [1, 1]])
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
        # Each value's group position, in input order: no sort of the values (the one sort
        # left is of the distinct histogram keys). Non-negative labels, as ingest's are, are
        # counted directly; others go through np.unique.
        if not groups.shape[0]:
            self.labels: np.ndarray = groups[:0]
            seg = groups[:0]
        elif int(groups.min()) >= 0 and int(groups.max()) < 4 * groups.shape[0] + (1 << 20):
            present = np.bincount(groups)
            self.labels = np.flatnonzero(present)
            position = np.zeros(present.shape[0], dtype=np.int64)
            position[self.labels] = np.arange(self.labels.shape[0])
            seg = position[groups]
        else:
            self.labels, seg = np.unique(groups, return_inverse=True)
        n_groups = self.labels.shape[0]
        self._index: dict[int, int] | None = None
        self._numpy_counts = numpy_counts
        self._state_cols: tuple[Any, ...] | None = None
        self._wide: dict[int, dict[str, Any]] = {}
        self._cols: tuple[list[Any], ...] | None = None
        if not n_groups:
            self._arrays: tuple[np.ndarray, ...] = ()
            self._stores: tuple[_Stores | None, _Stores | None] = (None, None)
            return
        v = values
        counts = np.bincount(seg, minlength=n_groups)
        # Sums in input order, each group's values added one after another (as a Summary
        # fed the same values would, up to summation order).
        sums = np.bincount(seg, weights=v, minlength=n_groups)
        means = sums / counts
        dev = v - means[seg]
        m2 = np.bincount(seg, weights=dev * dev, minlength=n_groups)
        mins = np.full(n_groups, np.inf)
        maxs = np.full(n_groups, -np.inf)
        np.minimum.at(mins, seg, v)
        np.maximum.at(maxs, seg, v)
        pos = v >= _TINY
        neg = v <= -_TINY
        zeros = np.bincount(seg[~(pos | neg)], minlength=n_groups)
        # None: no value of that sign (negatives are rare), so every group's store is empty.
        p = _Stores(hist._keys(v[pos]), seg[pos], n_groups, max_bins) if pos.any() else None
        n = _Stores(hist._keys(-v[neg]), seg[neg], n_groups, max_bins) if neg.any() else None
        self._arrays = (counts, sums, m2, mins, maxs, zeros)
        self._stores = (p, n)
        wide = [s.wide for s in (p, n) if s is not None]
        for j in np.flatnonzero(np.logical_or.reduce(wide)).tolist() if wide else ():
            # Keys span more than max_bins: the collapsing store decides which buckets merge.
            ref = Summary(relative_accuracy=relative_accuracy, max_bins=max_bins)
            ref.update_many(v[seg == j])
            self._wide[j] = ref.to_state()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def max_bins(self) -> int:
        """The histograms' bound on buckets per store."""
        return self._mb

    @property
    def collapsed(self) -> list[int]:
        """Positions of the groups whose histogram spans more than ``max_bins`` keys (their
        collapsed store is only in :meth:`state`), ascending."""
        return sorted(self._wide)

    def columns(self) -> Columns:
        """Every group's row columns as numpy arrays, in :attr:`labels` order (the flush cuts
        each experiment's rows out of them, without a Python object per value)."""
        stores = tuple(
            None
            if st is None
            else StoreColumns(
                np.r_[st.starts, st.pair_keys.shape[0]], st.nnz, st.pair_keys, st.pair_counts
            )
            for st in self._stores
        )
        if not self._arrays:
            empty_i = np.zeros(0, dtype=np.int64)
            empty_f = np.zeros(0, dtype=np.float64)
            return Columns(empty_i, empty_f, empty_f, empty_f, empty_f, empty_i, None, None)
        return Columns(*self._arrays, *stores)

    def _lists(self) -> tuple[list[Any], ...]:
        """The per-group columns as lists (one conversion each; then plain indexing)."""
        if self._cols is None:
            self._cols = tuple(a.tolist() for a in self._arrays) if self._arrays else ([],) * 6
        return self._cols

    def index(self, label: int) -> int:
        """Position of a group label in :attr:`labels` (``KeyError`` if it has no values)."""
        if self._index is None:
            self._index = {g: j for j, g in enumerate(self.labels.tolist())}
        return self._index[label]

    def state(self, j: int) -> dict[str, Any]:
        """The ``Summary.to_state()`` dict of the group at position ``j``."""
        if self._wide and j in self._wide:
            return self._wide[j]
        counts, sums, m2s, mins, maxs, zeros = self._lists()
        if self._state_cols is None:
            self._state_cols = tuple(
                None if st is None else st.columns(self._numpy_counts) for st in self._stores
            )
        pos_cols, neg_cols = self._state_cols
        return {
            "v": 1,
            "n": counts[j],
            "sum": sums[j],
            "mean": sums[j] / counts[j],  # as ``means`` above: one correctly rounded division
            "m2": m2s[j],
            "min": mins[j],
            "max": maxs[j],
            "h": {
                "ra": self._ra,
                "mb": self._mb,
                "p": _store_state(pos_cols, j),
                "n": _store_state(neg_cols, j),
                "z": zeros[j],
            },
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
