"""Mergeable summaries of one stream of numbers: moments and a log-bucket histogram.

A :class:`Summary` holds count, sum, mean and the sum of squared deviations (``m2``), min, max
and a :class:`LogHistogram`. Everything merges associatively and commutatively, so ingest workers
can fold records in any order and the evaluator can add their summaries up: the merged summary
equals (counts exactly, floating moments to rounding) the summary of all values folded one by one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["LogHistogram", "Summary"]

# Magnitudes below this go to the zero bucket (the smallest positive normal double); anything
# at least this large is indexable by a log bucket.
_MIN_INDEXABLE = float(np.finfo(np.float64).tiny)
_STATE_VERSION = 1
# Bounds on a state read from outside (a summary record, a snapshot): what no histogram this
# code builds exceeds, so that a malformed state is refused with a ValueError instead of
# failing later (an overflow, a huge allocation, a negative count dividing by zero). A bucket
# key of a finite double is within 710 / ln(gamma) of 0 (|ln x| <= 709.8 for the indexable
# magnitudes); a bucket holds fewer than 2**46 values, so the sum of a store's counts stays
# exact in int64 however many buckets it has up to _MAX_STATE_BINS.
_MAX_STATE_BINS = 1 << 16
_MAX_STATE_COUNT = 1 << 46


class _Store:
    """Dense counts for integer bucket keys ``offset .. offset + len(counts) - 1``.

    When the range of keys would exceed ``max_bins``, the lowest keys are collapsed into the
    lowest kept bucket ("collapsing lowest" store of DDSketch). The lowest kept key is always
    ``max_key - max_bins + 1`` where ``max_key`` is the largest key ever added, so collapsing
    commutes with merging: any grouping of the same keys gives the same counts.
    """

    __slots__ = ("counts", "max_bins", "offset")

    def __init__(self, max_bins: int) -> None:
        self.max_bins = max_bins
        self.offset = 0
        self.counts = np.zeros(0, dtype=np.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def _resize(self, lo: int, hi: int) -> None:
        """Cover keys lo..hi (hi - lo < max_bins), collapsing existing keys below lo into lo."""
        n_old = self.counts.shape[0]
        if n_old and lo == self.offset and hi == self.offset + n_old - 1:
            return
        new = np.zeros(hi - lo + 1, dtype=np.int64)
        if n_old:
            start = self.offset - lo  # position of the old first key in the new array
            if start >= 0:
                new[start : start + n_old] = self.counts
            else:
                cut = min(-start, n_old)
                new[0] = self.counts[:cut].sum()
                new[: n_old - cut] += self.counts[cut:]
        self.offset = lo
        self.counts = new

    def add_keys(self, keys: np.ndarray) -> None:
        """Add one count for every key in the int64 array ``keys`` (non-empty)."""
        kmin = int(keys.min())
        kmax = int(keys.max())
        n_old = self.counts.shape[0]
        if n_old:
            kmax = max(kmax, self.offset + n_old - 1)
        floor = kmax - self.max_bins + 1
        if kmin < floor:
            keys = np.maximum(keys, floor)
            kmin = floor
        lo = min(kmin, self.offset) if n_old else kmin
        self._resize(max(lo, floor), kmax)
        binned = np.bincount(keys - kmin)
        start = kmin - self.offset
        self.counts[start : start + binned.shape[0]] += binned

    def merge_in(self, other: _Store) -> None:
        m = other.counts.shape[0]
        if not m:
            return
        nz = np.flatnonzero(other.counts)
        if not nz.shape[0]:
            return
        o_lo = other.offset + int(nz[0])
        o_hi = other.offset + int(nz[-1])
        n_old = self.counts.shape[0]
        hi = max(o_hi, self.offset + n_old - 1) if n_old else o_hi
        floor = hi - self.max_bins + 1
        lo = min(o_lo, self.offset) if n_old else o_lo
        self._resize(max(lo, floor), hi)
        src = other.counts[int(nz[0]) : int(nz[-1]) + 1]
        if o_lo < self.offset:  # other reaches below our floor: collapse its low end
            cut = self.offset - o_lo
            self.counts[0] += src[:cut].sum()
            src = src[cut:]
            o_lo = self.offset
        start = o_lo - self.offset
        self.counts[start : start + src.shape[0]] += src

    def copy(self) -> _Store:
        new = _Store(self.max_bins)
        new.offset = self.offset
        new.counts = self.counts.copy()
        return new

    def to_state(self) -> list[Any]:
        """``[offset, counts]`` (dense) or ``[keys, counts]`` (sparse), whichever has fewer
        numbers; see :meth:`LogHistogram.to_state`."""
        counts = self.counts
        nz = np.flatnonzero(counts)
        m = nz.shape[0]
        if not m:
            return [0, []]
        a, b = int(nz[0]), int(nz[-1])
        if _sparse_is_smaller(m, b - a + 1):
            return [(nz + self.offset).tolist(), counts[nz].tolist()]
        return [self.offset + a, counts[a : b + 1].tolist()]

    @classmethod
    def from_state(cls, state: list[Any], max_bins: int, key_limit: int) -> tuple[_Store, int]:
        """The store of ``to_state()``'s ``state`` and the sum of its counts. Raises
        ValueError on anything this code does not write: keys beyond ``key_limit`` (no finite
        double has them), more than ``max_bins`` buckets, counts that are not integers in
        ``[0, 2**46)``."""
        store = cls.__new__(cls)
        store.max_bins = max_bins
        store.offset = 0
        first, counts = state
        if not isinstance(first, list | tuple | np.ndarray):  # dense: the lowest key, then
            values = _state_counts(counts, max_bins)  # the counts of every key from it
            store.counts = values
            if not values.shape[0]:
                return store, 0
            if type(first) is not int or not -key_limit <= first <= key_limit - values.shape[0]:
                raise ValueError(
                    f"a histogram store's first key must be an integer key, got {first!r:.40}"
                )
            store.offset = first
            store.counts = values
            return store, int(values.sum())
        keys = _state_counts(first, max_bins, keys=True)
        values = _state_counts(counts, max_bins)
        if keys.shape != values.shape or not keys.shape[0]:
            raise ValueError("a sparse histogram store needs as many keys as counts (at least 1)")
        if keys.shape[0] > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            raise ValueError("the keys of a sparse histogram store must be strictly ascending")
        if not (-key_limit <= int(keys[0]) and int(keys[-1]) <= key_limit):
            raise ValueError("a sparse histogram store's keys are beyond those of finite values")
        width = int(keys[-1]) - int(keys[0]) + 1
        if width > max_bins:  # a store never spans more (and a bad state must not allocate)
            raise ValueError(f"sparse histogram store spans {width} keys, more than {max_bins}")
        store.offset = int(keys[0])
        store.counts = np.zeros(width, dtype=np.int64)
        store.counts[keys - store.offset] = values
        return store, int(values.sum())


def _key_limit(log_gamma: float) -> int:
    """The largest bucket key, in magnitude, of a finite double at this ``ln(gamma)``."""
    return math.ceil(710.0 / log_gamma) + 1


def _state_counts(values: Any, max_bins: int, *, keys: bool = False) -> np.ndarray:
    """A state's list of bucket counts (or, ``keys``, sparse keys) as int64, checked: at most
    ``max_bins`` numbers numpy converts to int64 (as before these checks, a float is
    truncated), counts in ``[0, 2**46)``."""
    if type(values) is list and not values:  # the empty store of a sign with no values
        return np.zeros(0, dtype=np.int64)
    what = "keys" if keys else "counts"
    try:
        arr = np.asarray(values, dtype=np.int64)
    except (OverflowError, TypeError, ValueError):  # beyond int64, ragged, not numbers
        raise ValueError(f"histogram store {what} must be a list of integers") from None
    if arr.ndim != 1 or arr.shape[0] > max_bins:
        raise ValueError(f"histogram store {what} must be a list of at most {max_bins} integers")
    # One pass: a negative count seen as unsigned is above the bound too.
    if not keys and arr.shape[0] and int(arr.view(np.uint64).max()) >= _MAX_STATE_COUNT:
        raise ValueError("histogram store counts must be integers in [0, 2**46)")
    return arr


def _sparse_is_smaller(nonzero: int, width: int) -> bool:
    """Whether a store with ``nonzero`` non-empty buckets spread over ``width`` keys is stored
    sparse (``2 * nonzero`` numbers) rather than dense (``1 + width``). Ties stay dense, the
    format every reader of version-1 states understands. ``daemon/summarise.py`` applies the
    same rule column-wise, so both produce identical states."""
    return 2 * nonzero < width + 1


class LogHistogram:
    """DDSketch-style log-bucket histogram: mergeable, quantiles with bounded relative error.

    A positive value ``x`` falls in the bucket ``k = ceil(log(x) / log(gamma))`` covering
    ``(gamma**(k-1), gamma**k]`` with ``gamma = (1 + a) / (1 - a)`` for relative accuracy ``a``;
    negative values use the same buckets on ``|x|`` in a separate store, and values with
    ``|x|`` below the smallest normal double are counted in a zero bucket. Every bucket is
    represented by ``2 * gamma**k / (gamma + 1)``, within ``a`` of any value in it. Each store
    keeps at most ``max_bins`` buckets; past that the lowest buckets (the smallest magnitudes)
    are collapsed together, so only quantiles that fall in a collapsed bucket lose the guarantee.

    Parameters
    ----------
    relative_accuracy
        Bound ``a`` on the relative error of quantiles, in (0, 1).
    max_bins
        Maximum number of buckets per store (positive and negative), at least 16.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(42)
    >>> h = LogHistogram(relative_accuracy=0.01)
    >>> h.update_many(rng.lognormal(0.0, 1.0, size=10_000))
    >>> h.count
    10000
    >>> round(h.quantile(0.5), 3)
    0.99
    >>> lower, upper, counts = h.bins()
    >>> bool(np.all(lower < upper)), int(counts.sum())
    (True, 10000)

    References
    ----------
    Masson, C., Rim, J. E. and Lee, H. K. (2019). DDSketch: a fast and fully-mergeable quantile
    sketch with relative-error guarantees. Proceedings of the VLDB Endowment 12(12), 2195-2205.
    """

    __slots__ = ("_log_gamma", "_neg", "_pos", "_zero", "gamma", "max_bins", "relative_accuracy")

    def __init__(self, *, relative_accuracy: float = 0.01, max_bins: int = 2048) -> None:
        if not (isinstance(relative_accuracy, int | float) and 0.0 < relative_accuracy < 1.0):
            raise ValueError(
                f"relative_accuracy must be a float in (0, 1), got {relative_accuracy!r}"
            )
        if not isinstance(max_bins, int) or isinstance(max_bins, bool) or max_bins < 16:
            raise ValueError(f"max_bins must be an int >= 16, got {max_bins!r}")
        self.relative_accuracy = float(relative_accuracy)
        self.max_bins = max_bins
        self.gamma = (1.0 + self.relative_accuracy) / (1.0 - self.relative_accuracy)
        self._log_gamma = math.log(self.gamma)
        self._pos = _Store(max_bins)
        self._neg = _Store(max_bins)
        self._zero = 0

    # -- ingest ----------------------------------------------------------------------------
    def _keys(self, magnitudes: np.ndarray) -> np.ndarray:
        return np.ceil(np.log(magnitudes) / self._log_gamma).astype(np.int64)

    def _add_sorted_out(self, values: np.ndarray, vmin: float, vmax: float) -> None:
        if vmin >= _MIN_INDEXABLE:  # the common case: all positive (latencies, amounts)
            self._pos.add_keys(self._keys(values))
            return
        if vmax <= -_MIN_INDEXABLE:
            self._neg.add_keys(self._keys(-values))
            return
        pos = values >= _MIN_INDEXABLE
        neg = values <= -_MIN_INDEXABLE
        n_pos = int(np.count_nonzero(pos))
        n_neg = int(np.count_nonzero(neg))
        if n_pos:
            self._pos.add_keys(self._keys(values[pos]))
        if n_neg:
            self._neg.add_keys(self._keys(-values[neg]))
        self._zero += values.shape[0] - n_pos - n_neg

    def update_many(self, values: np.ndarray) -> None:
        """Add an array of finite values (vectorised)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if not values.shape[0]:
            return
        vmin = float(values.min())
        vmax = float(values.max())
        if not (math.isfinite(vmin) and math.isfinite(vmax)):
            raise ValueError("values must be finite (no NaN or inf)")
        self._add_sorted_out(values, vmin, vmax)

    def update(self, x: float) -> None:
        """Add one finite value."""
        self.update_many(np.array([x], dtype=np.float64))

    def merge_in(self, other: LogHistogram) -> None:
        """Add ``other``'s counts to this histogram (same ``relative_accuracy`` required)."""
        if other.relative_accuracy != self.relative_accuracy:
            raise ValueError(
                "cannot merge histograms with different relative_accuracy "
                f"({self.relative_accuracy} and {other.relative_accuracy})"
            )
        self._pos.merge_in(other._pos)
        self._neg.merge_in(other._neg)
        self._zero += other._zero

    def merge(self, other: LogHistogram) -> LogHistogram:
        """A new histogram holding both; ``self`` and ``other`` are unchanged."""
        new = self.copy()
        new.merge_in(other)
        return new

    def copy(self) -> LogHistogram:
        new = LogHistogram.__new__(LogHistogram)
        new.relative_accuracy = self.relative_accuracy
        new.max_bins = self.max_bins
        new.gamma = self.gamma
        new._log_gamma = self._log_gamma
        new._pos = self._pos.copy()
        new._neg = self._neg.copy()
        new._zero = self._zero
        return new

    # -- reading ---------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Number of values added."""
        return self._pos.total + self._neg.total + self._zero

    def _edges(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # exp(k * log_gamma) is a pure function of (k, relative_accuracy): identical buckets
        # of two histograms get bit-identical edges, so they can be aligned exactly.
        kf = keys.astype(np.float64)
        return np.exp((kf - 1.0) * self._log_gamma), np.exp(kf * self._log_gamma)

    def bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Non-empty buckets ascending by value: ``(lower_edges, upper_edges, counts)``.

        Positive buckets span ``(lower, upper]``, negative ones ``[lower, upper)``; the zero
        bucket has ``lower == upper == 0.0``.
        """
        lowers, uppers, counts = [], [], []
        neg = self._neg
        nz = np.flatnonzero(neg.counts)[::-1]  # largest magnitude first = ascending value
        if nz.shape[0]:
            lo, hi = self._edges(neg.offset + nz)
            lowers.append(-hi)
            uppers.append(-lo)
            counts.append(neg.counts[nz])
        if self._zero:
            lowers.append(np.zeros(1))
            uppers.append(np.zeros(1))
            counts.append(np.array([self._zero], dtype=np.int64))
        pos = self._pos
        nz = np.flatnonzero(pos.counts)
        if nz.shape[0]:
            lo, hi = self._edges(pos.offset + nz)
            lowers.append(lo)
            uppers.append(hi)
            counts.append(pos.counts[nz])
        if not counts:
            empty = np.zeros(0, dtype=np.float64)
            return empty, empty.copy(), np.zeros(0, dtype=np.int64)
        return np.concatenate(lowers), np.concatenate(uppers), np.concatenate(counts)

    def stores(self) -> tuple[int, np.ndarray, int, int, np.ndarray]:
        """The raw bucket counts: ``(neg_offset, neg_counts, zero_count, pos_offset,
        pos_counts)``.

        ``pos_counts[i]`` counts the positive values of key ``pos_offset + i`` (bucket
        ``(gamma**(k-1), gamma**k]``), ``neg_counts[i]`` the negative values whose magnitude has
        key ``neg_offset + i``; either may hold zeros. The arrays are the live int64 stores:
        treat them as read-only. Two histograms with the same ``relative_accuracy`` share their
        keys, so they can be aligned by integer key without computing :meth:`bins`' edges.

        Examples
        --------
        >>> h = LogHistogram(relative_accuracy=0.01)
        >>> h.update_many(np.array([1.0, 1.01, 1.03, 0.0, -2.0]))
        >>> neg_offset, neg_counts, zero, pos_offset, pos_counts = h.stores()
        >>> neg_offset, neg_counts.tolist(), zero, pos_offset, pos_counts.tolist()
        (35, [1], 1, 0, [1, 1, 1])
        """
        return self._neg.offset, self._neg.counts, self._zero, self._pos.offset, self._pos.counts

    def _representatives(self) -> tuple[np.ndarray, np.ndarray]:
        """(value estimate, count) of every non-empty bucket, ascending by value."""
        lower, upper, counts = self.bins()
        # upper edge gamma**k of a positive bucket -> 2 gamma**k / (gamma + 1); for negative
        # buckets the magnitude's upper edge is -lower, and the estimate keeps the sign.
        scale = 2.0 / (self.gamma + 1.0)
        values = np.where(upper > 0.0, upper * scale, np.where(lower < 0.0, lower * scale, 0.0))
        return values, counts

    def quantile(self, q: float) -> float | None:
        """Estimate of the ``q``-quantile (the value of rank ``floor(q * (count - 1))``).

        Within ``relative_accuracy`` of that value unless it falls in a collapsed bucket.
        ``None`` when the histogram is empty.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        values, counts = self._representatives()
        if not counts.shape[0]:
            return None
        rank = math.floor(q * (int(counts.sum()) - 1))
        idx = int(np.searchsorted(np.cumsum(counts), rank, side="right"))
        return float(values[idx])

    def cdf(self, x: float) -> float:
        """Share of values in buckets at or below the bucket holding ``x`` (0.0 when empty).

        At bucket resolution: for positive ``x`` it lies between the true share of values
        ``<= x`` and the true share of values ``<= x * gamma``.
        """
        lower, upper, counts = self.bins()
        n = int(counts.sum())
        if not n:
            return 0.0
        # A bucket counts when its lower edge is below x (x inside or above it), or it is the
        # zero bucket and x >= 0; for negative buckets [lower, upper), x >= lower suffices.
        include = np.where(upper > 0.0, lower < x, lower <= x)
        return float(counts[include].sum() / n)

    # -- state -----------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Compact JSON-safe state.

        ``{"ra": relative_accuracy, "mb": max_bins, "p": store, "n": store, "z": zero_count}``
        where each store (positive and negative magnitudes) is whichever of two encodings holds
        fewer numbers: dense ``[offset, counts]``, the counts of every key from ``offset`` to
        the largest non-empty key, or sparse ``[keys, counts]``, the strictly ascending keys of
        the non-empty buckets and their counts (a few values spread over many buckets, as in
        the small summaries of one ingest flush). Ties are dense; an empty store is ``[0, []]``.
        :meth:`from_state` reads both, whatever the writer chose.

        Examples
        --------
        >>> h = LogHistogram(relative_accuracy=0.01)
        >>> h.update_many(np.array([1.0, 1.01, 1.01, 1.03, 0.0, -2.0, -50.0, -60.0]))
        >>> h.to_state()  # positive: keys 0..2, dense; negative: 3 keys over 171, sparse
        {'ra': 0.01, 'mb': 2048, 'p': [0, [1, 2, 1]], 'n': [[35, 196, 205], [1, 1, 1]], 'z': 1}
        >>> LogHistogram.from_state({"ra": 0.01, "mb": 2048, "p": [0, [1, 1, 1]], "n": [0, []],
        ...                          "z": 0}).bins()[2].tolist()
        [1, 1, 1]
        """
        return {
            "ra": self.relative_accuracy,
            "mb": self.max_bins,
            "p": self._pos.to_state(),
            "n": self._neg.to_state(),
            "z": self._zero,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LogHistogram:
        """Rebuild a histogram from :meth:`to_state`; ValueError on a state this code does not
        write (counts not integers in [0, 2**46), keys no finite value has, more buckets than
        ``max_bins``, ``max_bins`` above 65536)."""
        return cls._from_state(state)[0]

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> tuple[LogHistogram, int]:
        max_bins = state["mb"]
        if type(max_bins) is int and max_bins > _MAX_STATE_BINS:
            raise ValueError(f"max_bins of a state must be at most {_MAX_STATE_BINS}")
        h = cls(relative_accuracy=state["ra"], max_bins=max_bins)
        key_limit = _key_limit(h._log_gamma)
        h._pos, n_pos = _Store.from_state(state["p"], max_bins, key_limit)
        h._neg, n_neg = _Store.from_state(state["n"], max_bins, key_limit)
        zero = state["z"]
        if type(zero) is not int or not 0 <= zero < _MAX_STATE_COUNT:
            raise ValueError("a histogram's zero count must be an integer in [0, 2**46)")
        h._zero = zero
        return h, n_pos + n_neg + zero

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LogHistogram):
            return NotImplemented
        return self.to_state() == other.to_state()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LogHistogram(relative_accuracy={self.relative_accuracy}, count={self.count})"


class Summary:
    """Mergeable summary of one stream of numbers: count, sum, mean, variance, min, max, quantiles.

    Moments merge with the pairwise update of Chan, Golub and LeVeque (mean and ``m2``, the sum
    of squared deviations from the mean), which stays accurate for values with a large common
    offset (latencies stamped as 1e9 + x) where a raw sum of squares would cancel. Quantiles and
    tail shares come from a :class:`LogHistogram` with bounded relative error.

    Parameters
    ----------
    relative_accuracy
        Relative accuracy of the quantile histogram, in (0, 1).
    max_bins
        Maximum number of histogram buckets per sign, at least 16.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(42)
    >>> a, b = Summary(), Summary()
    >>> a.update_many(rng.normal(100.0, 15.0, size=5_000))
    >>> b.update_many(rng.normal(100.0, 15.0, size=5_000))
    >>> s = a.merge(b)
    >>> s.count, round(s.mean, 4), round(s.variance, 4)
    (10000, 99.8463, 227.8603)
    >>> round(s.quantile(0.99), 2), round(1.0 - s.cdf(130.0), 4)
    (135.65, 0.0168)
    >>> Summary.from_state(s.to_state()).to_state() == s.to_state()
    True

    References
    ----------
    Chan, T. F., Golub, G. H. and LeVeque, R. J. (1979). Updating formulae and a pairwise
    algorithm for computing sample variances. Technical report STAN-CS-79-773, Stanford.

    Masson, C., Rim, J. E. and Lee, H. K. (2019). DDSketch: a fast and fully-mergeable quantile
    sketch with relative-error guarantees. Proceedings of the VLDB Endowment 12(12), 2195-2205.
    """

    __slots__ = ("_count", "_hist", "_m2", "_max", "_mean", "_min", "_sum")

    def __init__(self, *, relative_accuracy: float = 0.01, max_bins: int = 2048) -> None:
        self._hist = LogHistogram(relative_accuracy=relative_accuracy, max_bins=max_bins)
        self._count = 0
        self._sum = 0.0
        self._mean = 0.0
        self._m2 = 0.0
        self._min: float | None = None
        self._max: float | None = None

    # -- ingest ----------------------------------------------------------------------------
    def _fold(self, n_b: int, sum_b: float, mean_b: float, m2_b: float) -> None:
        n_a = self._count
        if n_a == 0:
            self._count, self._sum, self._mean, self._m2 = n_b, sum_b, mean_b, m2_b
            return
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean += delta * (n_b / n)
        self._m2 += m2_b + delta * delta * (n_a * n_b / n)
        self._sum += sum_b
        self._count = n

    def update_many(self, values: np.ndarray) -> None:
        """Add an array of finite values (vectorised; the ingest hot path)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        n_b = values.shape[0]
        if not n_b:
            return
        vmin = float(values.min())
        vmax = float(values.max())
        if not (math.isfinite(vmin) and math.isfinite(vmax)):
            raise ValueError("values must be finite (no NaN or inf)")
        sum_b = float(values.sum())
        mean_b = sum_b / n_b
        dev = values - mean_b
        self._fold(n_b, sum_b, mean_b, float(dev @ dev))
        self._min = vmin if self._min is None else min(self._min, vmin)
        self._max = vmax if self._max is None else max(self._max, vmax)
        self._hist._add_sorted_out(values, vmin, vmax)

    def update(self, x: float) -> None:
        """Add one finite value."""
        self.update_many(np.array([x], dtype=np.float64))

    def merge_in(self, other: Summary) -> None:
        """Add ``other`` into this summary in place (same ``relative_accuracy`` required)."""
        self._hist.merge_in(other._hist)
        if other._count == 0:
            return
        self._fold(other._count, other._sum, other._mean, other._m2)
        self._min = other._min if self._min is None else min(self._min, other._min)
        self._max = other._max if self._max is None else max(self._max, other._max)

    def merge(self, other: Summary) -> Summary:
        """A new summary of both streams; ``self`` and ``other`` are unchanged."""
        new = self.copy()
        new.merge_in(other)
        return new

    def copy(self) -> Summary:
        new = Summary.__new__(Summary)
        new._hist = self._hist.copy()
        new._count, new._sum, new._mean, new._m2 = self._count, self._sum, self._mean, self._m2
        new._min, new._max = self._min, self._max
        return new

    # -- reading ---------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Number of values."""
        return self._count

    @property
    def sum(self) -> float:
        """Sum of the values (exact for integer values such as 0/1 outcomes, up to 2**53)."""
        return self._sum

    @property
    def mean(self) -> float:
        """Mean of the values (0.0 when empty)."""
        return self._mean

    @property
    def m2(self) -> float:
        """Sum of squared deviations from the mean."""
        return self._m2

    @property
    def variance(self) -> float:
        """Sample variance (ddof=1); 0.0 with fewer than two values."""
        if self._count < 2:
            return 0.0
        return max(self._m2, 0.0) / (self._count - 1)

    @property
    def min(self) -> float | None:
        """Smallest value, ``None`` when empty."""
        return self._min

    @property
    def max(self) -> float | None:
        """Largest value, ``None`` when empty."""
        return self._max

    @property
    def relative_accuracy(self) -> float:
        return self._hist.relative_accuracy

    @property
    def histogram(self) -> LogHistogram:
        """The log-bucket histogram (live object; treat as read-only)."""
        return self._hist

    def quantile(self, q: float) -> float | None:
        """Estimate of the ``q``-quantile, within ``relative_accuracy`` of the value of rank
        ``floor(q * (count - 1))`` (numpy's ``method="lower"``); exact at q = 0 and q = 1.
        ``None`` when empty."""
        if self._count == 0:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"q must be in [0, 1], got {q!r}")
            return None
        if q == 0.0:
            return self._min
        if q == 1.0:
            return self._max
        est = self._hist.quantile(q)
        if est is None or self._min is None or self._max is None:
            return est  # a summary built from moments only has no histogram
        # Clamping to the observed range only moves the estimate toward the true value.
        return min(max(est, self._min), self._max)

    def cdf(self, x: float) -> float:
        """Share of values ``<= x`` at bucket resolution (see :meth:`LogHistogram.cdf`);
        exact below the minimum (0.0) and at or above the maximum (1.0)."""
        if self._count == 0:
            return 0.0
        if self._min is not None and x < self._min:
            return 0.0
        if self._max is not None and x >= self._max:
            return 1.0
        return self._hist.cdf(x)

    # -- state -----------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Compact JSON-safe state; ``from_state(to_state())`` is exact (also through orjson)."""
        return {
            "v": _STATE_VERSION,
            "n": self._count,
            "sum": self._sum,
            "mean": self._mean,
            "m2": self._m2,
            "min": self._min,
            "max": self._max,
            "h": self._hist.to_state(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Summary:
        if state.get("v") != _STATE_VERSION:
            raise ValueError(f"unknown Summary state version {state.get('v')!r}, expected 1")
        s = cls.__new__(cls)
        s._hist, total = LogHistogram._from_state(state["h"])
        count = state["n"]
        if type(count) is not int or count != total:
            raise ValueError(
                f"a Summary's count must be the integer its histogram holds ({total}), "
                f"got {count!r:.40}"
            )
        s._count = count
        s._sum = float(state["sum"])
        s._mean = float(state["mean"])
        s._m2 = float(state["m2"])
        lo, hi = state["min"], state["max"]
        s._min = None if lo is None else float(lo)
        s._max = None if hi is None else float(hi)
        # Finite moments, m2 >= 0, and min <= max given exactly when there are values: what
        # every Summary holds (a NaN fails every comparison).
        if not (
            math.isfinite(s._sum)
            and math.isfinite(s._mean)
            and 0.0 <= s._m2 < math.inf
            and (
                (lo is None and hi is None)
                if not count
                else (lo is not None and hi is not None and -math.inf < s._min <= s._max < math.inf)
            )
        ):
            raise ValueError(
                "a Summary's sum, mean and m2 must be finite (m2 >= 0) and its min <= max "
                "given when it has values"
            )
        return s

    @classmethod
    def from_values(
        cls, values: np.ndarray, *, relative_accuracy: float = 0.01, max_bins: int = 2048
    ) -> Summary:
        """Convenience: a summary of ``values``."""
        s = cls(relative_accuracy=relative_accuracy, max_bins=max_bins)
        s.update_many(values)
        return s

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Summary):
            return NotImplemented
        return self.to_state() == other.to_state()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Summary(count={self._count}, mean={self._mean!r}, variance={self.variance!r}, "
            f"min={self._min!r}, max={self._max!r})"
        )
