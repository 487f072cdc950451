"""Distribution drift of one arm: its recent window against its own reference window."""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._histogram_batch import _CHUNK, _EXACT, _SMALL, batch_window_distances, detector_distances
from .histogram_distance import (
    DISTANCES,
    _decide_many,
    _histogram_of,
    _HistogramDrift,
    _KeyPair,
    _Pair,
    as_bins,
    merge_bins,
)
from .summary import LogHistogram, Summary, _key_limit

# What one keyed step left to do (_step_keys).
_WIDE, _HELD, _READY = 0, 1, 2


# A histogram of the state is packed once and kept immutable, which the cyclic GC does not
# track: kept as lists (28 per detector, thousands of numbers), every full collection walked
# them (an engine snapshotting 5,000 experiments with a reference drift guardrail on 2 arms:
# 527,000 tracked objects and 423 ms per full collection with lists, 247,000 and 177 ms with
# tuples). By bucket key, a histogram's counts are packed into one string (_encode_counts):
# turning ~2,000 counts into lists and JSON at every snapshot cost more than the update
# (snapshot of such an experiment 123 -> 66 us, 16 -> 12 KiB). to_state() hands out lists
# of the offsets and those strings; on edges, lists of the numbers.
_Packed = tuple[tuple, Any, Any]

# Counts of a keyed histogram in a state: "" when there are none, else the width in bytes
# (1, 2, 4 or 8, the narrowest that holds the largest count) and the counts as little-endian
# unsigned integers of that width, base64-encoded. States written before it hold lists.
_WIDTHS = {"1": np.dtype("<u1"), "2": np.dtype("<u2"), "4": np.dtype("<u4"), "8": np.dtype("<u8")}


def _encode_counts(counts: np.ndarray) -> str:
    if not counts.shape[0]:
        return ""
    top = int(counts.max())
    width = "1" if top < 1 << 8 else "2" if top < 1 << 16 else "4" if top < 1 << 32 else "8"
    return width + base64.b64encode(counts.astype(_WIDTHS[width]).tobytes()).decode("ascii")


def _decode_counts(packed: Any) -> np.ndarray:
    """Counts packed by ``_encode_counts`` (or a list of them, from an older state)."""
    if not isinstance(packed, str):
        counts = np.asarray(packed, dtype=np.int64)
        # A negative count (no packed string can hold one) was restored, and a snapshot of
        # the detector afterwards held null for NaN and was unreadable (seeded state fuzz).
        if counts.ndim != 1 or (counts.shape[0] and int(counts.min()) < 0):
            raise ValueError(
                f"histogram counts must be a list of integers >= 0, got {packed!r:.80}"
            )
        return counts
    if not packed:
        return np.zeros(0, dtype=np.int64)
    dtype = _WIDTHS.get(packed[0])
    try:
        raw = base64.b64decode(packed[1:], validate=True)
    except ValueError as exc:
        raise ValueError(f"histogram counts are not valid base64: {exc}") from None
    if dtype is None or not raw or len(raw) % dtype.itemsize:
        raise ValueError(
            f"histogram counts must be a width digit (1, 2, 4, 8) and base64 of that many "
            f"bytes per count, got {packed!r:.80}"
        )
    counts = np.frombuffer(raw, dtype=dtype)
    if dtype.itemsize == 8 and int(counts.max()) >= 1 << 63:
        raise ValueError("a histogram count does not fit in int64")
    return counts.astype(np.int64)


def _pack(bins: tuple[np.ndarray, np.ndarray, np.ndarray]) -> _Packed:
    return tuple(bins[0].tolist()), tuple(bins[1].tolist()), tuple(bins[2].tolist())


def _unpack(packed: list[list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.asarray(packed[0], dtype=np.float64),
        np.asarray(packed[1], dtype=np.float64),
        np.asarray(packed[2], dtype=np.int64),
    )


class _Grid:
    """The reference and the recent window's sum on one grid of upper edges (private).

    Derived from the detector's state and rebuilt from it when missing: each update adds the
    new interval and subtracts the one leaving the window (two ``bincount`` calls each) instead
    of merging the whole window and aligning it with the reference again. ``seen`` counts the
    window intervals that list a bucket, so the union of buckets is exactly that of merging
    the window's histograms (a bucket given with a count of 0 still belongs to it).
    """

    __slots__ = ("edges", "ref", "ref_seen", "seen", "win")

    def __init__(self, reference: tuple, window: list[tuple]) -> None:
        edges = np.unique(np.concatenate([reference[1], *(b[1] for b in window)]))
        self._set(edges)
        idx = edges.searchsorted(reference[1])
        self.ref = np.bincount(idx, weights=reference[2], minlength=edges.shape[0])
        self.ref_seen = np.bincount(idx, minlength=edges.shape[0]) > 0
        for bins in window:
            self.add(bins)

    def _set(self, edges: np.ndarray) -> None:
        self.edges = edges
        self.win = np.zeros(edges.shape[0])
        self.seen = np.zeros(edges.shape[0], dtype=np.int64)

    def _locate(self, upper: np.ndarray) -> np.ndarray:
        edges = self.edges
        idx = edges.searchsorted(upper)
        if upper.shape[0] and (
            not edges.shape[0] or not (edges.take(idx, mode="clip") == upper).all()
        ):
            # Buckets the grid has not seen yet: add their edges, move the counts over.
            old = (edges, self.win, self.seen, self.ref, self.ref_seen)
            self._set(np.union1d(edges, upper))
            edges = self.edges
            pos = edges.searchsorted(old[0])
            self.win[pos] = old[1]
            self.seen[pos] = old[2]
            self.ref = np.zeros(edges.shape[0])
            self.ref[pos] = old[3]
            self.ref_seen = np.zeros(edges.shape[0], dtype=bool)
            self.ref_seen[pos] = old[4]
            idx = edges.searchsorted(upper)
        return idx

    def add(self, bins: tuple) -> None:
        idx = self._locate(bins[1])
        size = self.edges.shape[0]
        self.win += np.bincount(idx, weights=bins[2], minlength=size)
        self.seen += np.bincount(idx, minlength=size)

    def remove(self, bins: tuple) -> None:
        idx = self.edges.searchsorted(bins[1])  # it was added, so every edge is on the grid
        size = self.edges.shape[0]
        self.win -= np.bincount(idx, weights=bins[2], minlength=size)
        self.seen -= np.bincount(idx, minlength=size)

    def pair(self) -> _Pair:
        """The recent window against the reference, on the buckets either of them lists."""
        keep = self.ref_seen | (self.seen > 0)
        p = self.win[keep]
        q = self.ref[keep]
        cp = np.zeros(p.shape[0] + 1)
        cq = np.zeros(p.shape[0] + 1)
        np.add.accumulate(p, out=cp[1:])
        np.add.accumulate(q, out=cq[1:])
        return _Pair(self.edges[keep], cp, cq)


# The counts of an empty store, shared (nothing writes into a store once it is kept).
_NO_COUNTS = np.zeros(0, dtype=np.int64)
_NO_COUNTS.flags.writeable = False


def _key_stores(histogram: LogHistogram) -> tuple:
    """A copy of a histogram's ``stores()`` (the detector keeps it; the caller may go on)."""
    n_off, n_counts, zero, p_off, p_counts = histogram.stores()
    return (
        int(n_off),
        n_counts.copy() if n_counts.shape[0] else _NO_COUNTS,
        int(zero),
        int(p_off),
        p_counts.copy() if p_counts.shape[0] else _NO_COUNTS,
    )


def _pack_stores(stores: tuple) -> _Packed:
    n_off, n_counts, zero, p_off, p_counts = stores
    return (n_off, zero, p_off), _encode_counts(n_counts), _encode_counts(p_counts)


def _listed(packed: _Packed) -> list:
    """A packed histogram as the state holds it: fresh lists, counts strings as they are."""
    return [x if type(x) is str else list(x) for x in packed]


def _unpack_stores(packed: list[list], key_limit: int) -> tuple:
    """Stores of a state, checked: integer offsets, keys within ``key_limit`` of 0 (no finite
    value has others, and the layout spans them all: a state's offset of 1e9 allocated
    gigabytes), a zero-bucket count >= 0."""
    (n_off, zero, p_off), n_counts, p_counts = packed
    n_counts, p_counts = _decode_counts(n_counts), _decode_counts(p_counts)
    for off, counts in ((n_off, n_counts), (p_off, p_counts)):
        if type(off) is not int or (
            counts.shape[0] and not -key_limit <= off <= key_limit - counts.shape[0] + 1
        ):
            raise ValueError(f"a histogram's first key must be an integer key, got {off!r:.40}")
    if type(zero) is not int or zero < 0:
        raise ValueError(f"a histogram's zero count must be an integer >= 0, got {zero!r:.40}")
    return n_off, n_counts, zero, p_off, p_counts


def _trimmed(counts: np.ndarray, offset: int) -> tuple[int, np.ndarray]:
    nz = np.flatnonzero(counts)
    if not nz.shape[0]:
        return 0, np.zeros(0, dtype=np.int64)
    a, b = int(nz[0]), int(nz[-1])
    return offset + a, counts[a : b + 1].astype(np.int64)


def _stores_bins(
    stores: tuple, relative_accuracy: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``LogHistogram.bins()`` of the histogram whose counts ``stores`` are (same edges)."""
    n_off, n_counts, zero, p_off, p_counts = stores
    i64 = np.int64
    widest = max(n_counts.shape[0], p_counts.shape[0], 2048)  # dense stores as they are
    histogram = LogHistogram.from_state(
        {
            "ra": relative_accuracy,
            "mb": widest,
            "p": [p_off, p_counts.astype(i64)],
            "n": [n_off, n_counts.astype(i64)],
            "z": zero,
        }
    )
    return histogram.bins()


def _bins_stores(bins: tuple, log_gamma: float) -> tuple | None:
    """The stores whose ``bins()`` are ``bins`` bit for bit, or None if there are none (edges
    of another accuracy, a bucket listed with a count of 0)."""
    lower, upper, counts = bins
    if counts.shape[0] and not np.minimum.reduce(counts) > 0:
        return None
    out: list = []
    for sign in (-1.0, 1.0):
        side = upper * sign > 0.0
        mag_upper, mag_lower = upper[side] * sign, lower[side] * sign
        if sign < 0.0:  # a negative bucket's upper edge is its magnitude's lower edge
            mag_upper, mag_lower = mag_lower[::-1], mag_upper[::-1]
        with np.errstate(all="ignore"):  # an infinite edge gives a key that fails the check
            keys = np.rint(np.log(mag_upper) / log_gamma).astype(np.int64)
        kf = keys.astype(np.float64)
        if not (
            np.array_equal(np.exp(kf * log_gamma), mag_upper)
            and np.array_equal(np.exp((kf - 1.0) * log_gamma), mag_lower)
        ):
            return None
        if not keys.shape[0]:
            out += [0, np.zeros(0, dtype=np.int64)]
            continue
        store = np.zeros(int(keys[-1] - keys[0]) + 1, dtype=np.int64)
        store[keys - keys[0]] = counts[side][:: int(sign)]
        out += [int(keys[0]), store]
    at_zero = upper == 0.0
    zero = counts[at_zero]
    if zero.shape[0] > 1 or not np.array_equal(lower[at_zero], upper[at_zero]):
        return None
    return out[0], out[1], int(zero.sum()), out[2], out[3]


class _Keys:
    """The reference and the recent window's sum as counts by integer bucket key (private).

    Used while every histogram is a LogHistogram of one relative accuracy (the daemon's
    Summaries): an update adds the arriving interval's stores and subtracts the leaving one's
    with slice adds, and the pair is read off the two arrays, with no bucket edges computed.
    Both arrays follow the dense layout of :class:`~.histogram_distance._KeyPair`: negative
    keys ``nhi - 1`` down to ``nhi - ln`` at layout positions ``0 .. ln - 1`` (ascending by
    value), the zero bucket at ``ln``, positive keys from ``plo`` at ``ln + 1`` on, each
    stored one further on: element 0 is always 0, so a cumulative sum is the pair's CDF
    counts as they are. Counts are int64, so the sums are exact (and a batch lays the arrays
    out as they are, see ``_histogram_batch.batch_window_distances``).
    """

    __slots__ = ("_cq", "ln", "log_gamma", "nhi", "phi", "plo", "ref", "win")

    def __init__(self, log_gamma: float) -> None:
        self.log_gamma = log_gamma
        self.ln = self.nhi = self.plo = self.phi = 0  # phi: one past the highest positive key
        self.ref = np.zeros(2, dtype=np.int64)
        self.win = np.zeros(2, dtype=np.int64)
        # The reference's CDF counts, read-only and shared by the pairs: the reference is
        # frozen once complete, so they change only when the layout grows.
        self._cq: np.ndarray | None = None

    @classmethod
    def build(cls, log_gamma: float, reference: tuple | None, window: list[tuple]) -> _Keys:
        keys = cls(log_gamma)
        if reference is not None:
            keys.cover(reference)
            keys.add(reference, keys.ref)
        for stores in window:
            keys.cover(stores)
            keys.add(stores, keys.win)
        return keys

    def cover(self, stores: tuple) -> int:
        """Widen the layout to hold the keys of ``stores``; returns the new width."""
        n_off, n_counts, _, p_off, p_counts = stores
        ln, nhi, plo = self.ln, self.nhi, self.plo
        n_pos = self.ref.shape[0] - ln - 2
        nlo, phi = nhi - ln, plo + n_pos
        k = n_counts.shape[0]
        if k and (not ln or n_off < nlo or n_off + k > nhi):
            nlo, nhi = (n_off, n_off + k) if not ln else (min(nlo, n_off), max(nhi, n_off + k))
        k = p_counts.shape[0]
        if k and (not n_pos or p_off < plo or p_off + k > phi):
            plo, phi = (p_off, p_off + k) if not n_pos else (min(plo, p_off), max(phi, p_off + k))
        new_ln = nhi - nlo
        size = new_ln + 1 + phi - plo
        if size + 1 == self.ref.shape[0]:
            return size  # no new key (a layout only grows)
        shift = 1 + nhi - self.nhi  # old negative element i moves to i + shift - 1
        at = new_ln + 2 + self.plo - plo  # where the old positive keys start
        for name in ("ref", "win"):
            old = getattr(self, name)
            new = np.zeros(size + 1, dtype=np.int64)
            if ln:
                new[shift : shift + ln] = old[1 : ln + 1]
            new[new_ln + 1] = old[ln + 1]
            if n_pos:
                new[at : at + n_pos] = old[ln + 2 :]
            setattr(self, name, new)
        self.ln, self.nhi, self.plo, self.phi = new_ln, nhi, plo, phi
        self._cq = None
        return size

    def add(self, stores: tuple, out: np.ndarray) -> None:
        """Add ``stores`` (keys covered) into ``out`` (``ref`` or ``win``)."""
        if out is self.ref:
            self._cq = None
        n_off, n_counts, zero, p_off, p_counts = stores
        k = n_counts.shape[0]
        if k:
            start = self.nhi - n_off - k + 1
            out[start : start + k] += n_counts[::-1]
        if zero:
            out[self.ln + 1] += zero
        k = p_counts.shape[0]
        if k:
            start = self.ln + 2 + p_off - self.plo
            out[start : start + k] += p_counts

    def shift(self, arriving: tuple, leaving: tuple) -> None:
        """Add ``arriving`` to ``win`` and subtract ``leaving``, both without negative values
        and with keys the layout holds: what add() and remove() do, without their general
        cases (np.add with out= also spares the copy of the slice onto itself that
        ``win[a:b] += x`` makes)."""
        win = self.win
        at = self.ln + 2 - self.plo  # layout position of positive key 0, plus one
        _, _, zero, p_off, counts = arriving
        part = win[at + p_off : at + p_off + counts.shape[0]]
        np.add(part, counts, out=part)
        _, _, zero_out, p_off, counts = leaving
        if counts.shape[0]:
            part = win[at + p_off : at + p_off + counts.shape[0]]
            np.subtract(part, counts, out=part)
        if zero != zero_out:
            win[self.ln + 1] += zero - zero_out

    def remove(self, stores: tuple) -> None:
        """Subtract a window interval's ``stores`` (added before, so covered) from ``win``."""
        n_off, n_counts, zero, p_off, p_counts = stores
        win = self.win
        k = n_counts.shape[0]
        if k:
            start = self.nhi - n_off - k + 1
            win[start : start + k] -= n_counts[::-1]
        if zero:
            win[self.ln + 1] -= zero
        k = p_counts.shape[0]
        if k:
            start = self.ln + 2 + p_off - self.plo
            win[start : start + k] -= p_counts

    def held(self) -> int:
        """Buckets non-empty in the reference or the window."""
        return int(np.count_nonzero(self.ref + self.win))

    def reference(self) -> tuple:
        """The reference as trimmed stores ``(n_off, n_counts, zero, p_off, p_counts)``."""
        ln = self.ln
        n_off, n_counts = _trimmed(self.ref[1 : ln + 1][::-1], self.nhi - ln)
        p_off, p_counts = _trimmed(self.ref[ln + 2 :], self.plo)
        return n_off, n_counts, int(self.ref[ln + 1]), p_off, p_counts

    def pair(self) -> _Pair:
        """The recent window against the reference, aligned as TwoSampleDrift aligns by key."""
        cq = self._cq
        if cq is None:
            cq = self._cq = np.add.accumulate(self.ref)
            cq.flags.writeable = False
        cp = np.add.accumulate(self.win)
        return _KeyPair(cp, cq, (self.ln, self.nhi, self.plo, self.log_gamma))


class WindowDrift(_HistogramDrift):
    """Calibrated drift of one arm's feature or prediction against its own past.

    Feed one histogram per evaluation interval with ``update(histogram)``. The first
    ``reference_intervals`` histograms are added into the reference window (then frozen); the
    last ``window_intervals`` histograms form the recent window. Once both are complete every
    update compares them with the sample-size-corrected distances of
    :func:`~armguard.detectors.histogram_distance.histogram_distances` and alarms on the one named
    by ``distance``. The windows never overlap.

    Calibration is that of :class:`TwoSampleDrift`: per-evaluation false-alarm probability
    ``1 / expected_run_length``, so at most ``N / expected_run_length`` false onsets are expected
    in ``N`` evaluations. It assumes the intervals are exchangeable under no change; a feature
    with a daily cycle needs windows spanning whole days (or a reference of the same hours).
    ``reset_reference()`` starts a new reference (e.g. after an operator accepts a drift).

    While every histogram is a Summary or LogHistogram of one relative accuracy (the daemon's
    case), the windows are kept as counts by integer bucket key, as ``TwoSampleDrift`` aligns
    two such histograms; a bins tuple or another accuracy moves the detector to bucket edges
    until ``reset_reference()``. Both give the same merged bins, distances and alarms.

    Parameters
    ----------
    expected_run_length
        Expected number of evaluations between false alarms when nothing changes.
    reference_intervals
        Number of interval histograms in the reference window.
    window_intervals
        Number of interval histograms in the recent window.
    distance
        The distance that decides: ``"psi"``, ``"js"``, ``"ks"`` or ``"wasserstein"``.
    max_bins
        At most this many merged bins for PSI and JS.
    min_expected
        Each merged bin expects at least this many values in the smaller window.
    clear_fraction
        An alarm clears when ``score <= clear_fraction * threshold``.
    min_effect
        Smallest corrected distance worth an alarm (0 = any statistically significant drift);
        the threshold is the larger of this and the calibrated one. Useful on large windows,
        where a real but negligible difference is significant (e.g. 0.1 for PSI, 0.05 for KS).

    Examples
    --------
    >>> import numpy as np
    >>> from armguard.detectors import Summary, WindowDrift
    >>> rng = np.random.default_rng(42)
    >>> det = WindowDrift(reference_intervals=10, window_intervals=3, distance="ks")
    >>> for i in range(30):
    ...     mu = 0.0 if i < 20 else 0.2                  # the feature moves at interval 20
    ...     det.update(Summary.from_values(rng.lognormal(mu, 1.0, 500)))
    ...     if det.alarm:
    ...         print(i, round(det.score, 3), round(det.threshold, 3))
    21 0.043 0.04

    References
    ----------
    Rabanser, S., Gunnemann, S. and Lipton, Z. (2019). Failing loudly: an empirical study of
    methods for detecting dataset shift. NeurIPS 32.
    Pearson, K. (1900). On the criterion that a given system of deviations ... Philosophical
    Magazine 50(302), 157-175.
    """

    def __init__(
        self,
        *,
        expected_run_length: float = 10_000.0,
        reference_intervals: int = 24,
        window_intervals: int = 6,
        distance: str = "psi",
        max_bins: int = 20,
        min_expected: float = 5.0,
        clear_fraction: float = 0.5,
        min_effect: float = 0.0,
    ):
        self._init_drift(
            expected_run_length, distance, max_bins, min_expected, clear_fraction, min_effect
        )
        for name, value in (
            ("reference_intervals", reference_intervals),
            ("window_intervals", window_intervals),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.reference_intervals = reference_intervals
        self.window_intervals = window_intervals
        self.reset_reference()

    def reset_reference(self) -> None:
        """Forget the reference and the recent window; the next intervals build a new one."""
        empty = (np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64))
        self._reference = empty
        self._n_reference = 0
        # Window intervals: bins tuples on edges, or copies of stores() while keyed.
        self._window: list[tuple] = []
        self._grid: _Grid | None = None
        # While every histogram is a LogHistogram of one relative accuracy (decided by the
        # first, None before it), the reference and the window's sum live in _keys, by bucket
        # key; a bins tuple or another accuracy moves everything to edges (_grid) for good.
        self._keyed: bool | None = None
        self._convertible = False  # on edges from an older state: try keys on the next update
        self._relative_accuracy: float | None = None
        self._keys: _Keys | None = None
        # The state's lists of each histogram, packed on the first to_state() that needs them:
        # a histogram does not change once added, and the daemon snapshots after every
        # update, so packing the whole window each time cost as much as the update itself.
        self._packed_reference: _Packed | None = None
        self._packed_window: list[_Packed | None] = []

    @property
    def ready(self) -> bool:
        """True once both windows are complete (evaluations happen)."""
        return (
            self._n_reference >= self.reference_intervals
            and len(self._window) >= self.window_intervals
        )

    def update(self, histogram: Any) -> None:
        """Add one interval's histogram: a Summary, a LogHistogram or a bins tuple."""
        stores = self._keyed_stores(histogram)
        if stores is not None:
            step = self._step_keys(stores)
            if step == _READY:
                assert self._keys is not None
                pair = self._keys.pair()
                if not pair.n or not pair.m:
                    self._hold()
                else:
                    self._evaluate(pair)
            if step != _WIDE:
                return
        self._to_edges()
        self._update_edges(as_bins(histogram))

    @classmethod
    def update_many(
        cls,
        detectors: Sequence[WindowDrift],
        histograms: Sequence[Any],
        *,
        all_distances: bool = False,
    ) -> None:
        """``detectors[i].update(histograms[i])`` for every ``i``, the evaluations in one
        vectorised pass.

        Each detector adds its interval to its windows in list order (a detector listed twice
        sees its updates in order); then the distances of every detector whose windows are
        complete are computed together, with the arithmetic of
        ``TwoSampleDrift.update_many`` on the recent window against the reference (see
        ``detectors/_histogram_batch.py``). A detector's result does not depend on the rest of
        the batch, bit for bit, and equals that of ``update()`` up to rounding (about 1e-15
        relative: ``np.log`` against ``math.log``, sequential sums against ``np.dot``), with the
        same alarms. A detector on bucket edges (it was given a bins tuple, or histograms of
        another accuracy) is updated singly, exactly as by ``update()``.

        Only the decision distance is computed, so ``distances`` then holds that one (fewer
        than eight PSI or KS detectors are evaluated one by one, and keep their windows to
        compute the other three when read); with ``all_distances=True`` the other three are
        computed too, without thresholds, at several times the cost.

        Parameters
        ----------
        detectors
            The detectors to update.
        histograms
            One interval's histogram per detector: Summaries, LogHistograms or bins tuples.
        all_distances
            Also compute the three diagnostic distances.

        Examples
        --------
        >>> import numpy as np
        >>> from armguard.detectors import Summary, WindowDrift
        >>> rng = np.random.default_rng(42)
        >>> dets = [WindowDrift(reference_intervals=4, window_intervals=2) for _ in range(3)]
        >>> for i in range(8):
        ...     shifts = (0.0, 0.0, 0.3 if i >= 4 else 0.0)   # the third arm moves at 4
        ...     WindowDrift.update_many(
        ...         dets, [Summary.from_values(rng.lognormal(mu, 1.0, 1_000)) for mu in shifts])
        >>> [(d.in_alarm, round(d.score, 4)) for d in dets]
        [(False, 0.0067), (False, 0.0085), (True, 0.0948)]
        """
        if len(detectors) != len(histograms):
            raise ValueError(
                f"got {len(detectors)} detectors and {len(histograms)} histograms; "
                "give one histogram per detector"
            )
        ready: list[WindowDrift] = []
        pending: set[WindowDrift] = set()  # detectors are hashed by identity
        add, subtract = np.add, np.subtract
        for det, histogram in zip(detectors, histograms, strict=True):
            if det in pending:  # listed twice: evaluate its earlier update first
                _evaluate_keyed(ready, all_distances)
                ready, pending = [], set()
            keys = det._keys
            if keys is not None and type(histogram) is Summary:
                # The common step, inlined (thousands of detectors: every line costs): a
                # Summary of the detector's accuracy, positive values (and zeros) whose keys
                # the layout holds, both windows complete, the interval leaving the window
                # without negative values. What _keyed_stores and _step_keys (with
                # _Keys.shift) do then.
                h = histogram.histogram
                n_off, n_counts, zero, p_off, counts = h.stores()
                window = det._window
                size = counts.shape[0]
                if (
                    h.relative_accuracy == det._relative_accuracy
                    and not n_counts.shape[0]
                    and keys.plo <= p_off < p_off + size <= keys.phi
                    and len(window) == det.window_intervals
                ):
                    leaving = window[0]
                    if not leaving[1].shape[0]:
                        win = keys.win
                        at = keys.ln + 2 - keys.plo  # layout position of positive key 0, + 1
                        counts = counts.copy()
                        part = win[at + p_off : at + p_off + size]
                        add(part, counts, part)
                        _, _, zero_out, off, out = leaving
                        if out.shape[0]:
                            part = win[at + off : at + off + out.shape[0]]
                            subtract(part, out, part)
                        zero = int(zero)
                        if zero != zero_out:
                            win[keys.ln + 1] += zero - zero_out
                        del window[0]
                        window.append((int(n_off), _NO_COUNTS, zero, int(p_off), counts))
                        packed = det._packed_window
                        del packed[0]
                        packed.append(None)
                        ready.append(det)
                        pending.add(det)
                        if len(ready) == _CHUNK:  # evaluate while their arrays are in cache
                            _evaluate_keyed(ready, all_distances)
                            ready, pending = [], set()
                        continue
            stores = det._keyed_stores(histogram)
            if stores is not None:
                step = det._step_keys(stores)
                if step == _READY:
                    ready.append(det)
                    pending.add(det)
                    if len(ready) == _CHUNK:  # evaluate while their arrays are in cache
                        _evaluate_keyed(ready, all_distances)
                        ready, pending = [], set()
                if step != _WIDE:
                    continue
            det._to_edges()
            det._update_edges(as_bins(histogram))
            if all_distances:
                det._all()
        _evaluate_keyed(ready, all_distances)

    def _keyed_stores(self, histogram: Any) -> tuple | None:
        """A copy of the stores of ``histogram`` if it goes by key (starting keys on the
        first histogram, or moving an old edge state to keys), else None (edges)."""
        if self._convertible:
            self._convertible = False
            h = _histogram_of(histogram)
            if h is not None:
                self._from_edges(h.relative_accuracy)
        if self._keyed is False:
            return None
        # Summaries are the common input: skip the generic look-up for them.
        h = histogram.histogram if type(histogram) is Summary else _histogram_of(histogram)
        if h is None:
            return None
        if self._keyed is None:
            self._start_keys(h.relative_accuracy)
        if h.relative_accuracy != self._relative_accuracy:
            return None
        return _key_stores(h)

    def _start_keys(self, relative_accuracy: float) -> None:
        self._keyed = True
        self._relative_accuracy = relative_accuracy
        log_gamma = math.log(LogHistogram(relative_accuracy=relative_accuracy).gamma)
        self._keys = _Keys(log_gamma)

    def _from_edges(self, relative_accuracy: float) -> None:
        """Move to keys a detector restored on edges, if its buckets are of this accuracy."""
        self._start_keys(relative_accuracy)
        assert self._keys is not None
        log_gamma = self._keys.log_gamma
        reference = _bins_stores(self._reference, log_gamma) if self._n_reference else None
        window = [_bins_stores(bins, log_gamma) for bins in self._window]
        keys = None
        if (reference is not None or not self._n_reference) and None not in window:
            keys = _Keys.build(log_gamma, reference, window)  # type: ignore[arg-type]
        if keys is None or keys.ref.shape[0] - 1 > 4 * keys.held() + 1024:
            self._keyed = False  # stay on edges
            self._keys = self._relative_accuracy = None
            return
        self._keys = keys
        self._window = window  # type: ignore[assignment]
        self._reference = (np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64))
        self._grid = None
        self._packed_reference = None
        self._packed_window = [None] * len(window)

    def _step_keys(self, stores: tuple) -> int:
        """One update by bucket key, up to the evaluation: ``_READY`` when the windows are
        complete (the caller evaluates ``_keys``), ``_HELD`` when not (held here), ``_WIDE``
        (nothing changed) if the layout would grow too wide."""
        keys = self._keys
        assert keys is not None
        _, n_counts, _, p_off, p_counts = stores
        window = self._window
        if (
            not n_counts.shape[0]
            and keys.plo <= p_off < p_off + p_counts.shape[0] <= keys.phi
            and len(window) == self.window_intervals
            and not window[0][1].shape[0]
        ):
            # The common case, once both windows are complete: positive values (and zeros)
            # whose keys the layout holds, the interval leaving the window without negative
            # values too (update_many makes the same test inline).
            keys.shift(stores, window.pop(0))
            window.append(stores)
            self._packed_window.pop(0)
            self._packed_window.append(None)
            return _READY
        size = keys.cover(stores)
        held = n_counts.shape[0] + p_counts.shape[0]
        if size > 4 * held + 1024 and size > 4 * keys.held() + 1024:
            # Mostly keys neither window holds any more (a feature moving across magnitudes):
            # lay them out afresh; values spread over too many magnitudes go to edges.
            reference = keys.reference() if self._n_reference else None
            keys = _Keys.build(keys.log_gamma, reference, [*self._window, stores])
            if keys.ref.shape[0] - 1 > 4 * keys.held() + 1024:
                return _WIDE
            keys.remove(stores)
            self._keys = keys
        if self._n_reference < self.reference_intervals:
            keys.add(stores, keys.ref)
            self._packed_reference = None
            self._n_reference += 1
            self._hold()
            return _HELD
        keys.add(stores, keys.win)
        window = self._window
        window.append(stores)
        self._packed_window.append(None)
        if len(window) > self.window_intervals:
            keys.remove(window.pop(0))
            self._packed_window.pop(0)
        if len(window) < self.window_intervals:
            self._hold()
            return _HELD
        return _READY

    def _reference_bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The reference as ``(lower, upper, counts)``, keyed or not."""
        if self._keyed and self._n_reference:
            assert self._keys is not None
            return _stores_bins(self._keys.reference(), self._relative_accuracy)
        return self._reference

    def _to_edges(self) -> None:
        """Move a keyed detector to bucket edges (what a keyed one has, as bins() has it)."""
        if self._keyed:
            self._reference = self._reference_bins()
            self._window = [_stores_bins(s, self._relative_accuracy) for s in self._window]
            self._packed_reference = None
            self._packed_window = [None] * len(self._window)
            self._keys = None
            self._relative_accuracy = None
        self._keyed = False

    def _update_edges(self, bins: tuple) -> None:
        if self._n_reference < self.reference_intervals:
            self._reference = merge_bins([self._reference, bins])
            self._packed_reference = None
            self._n_reference += 1
            self._hold()
            return
        window = self._window
        window.append(bins)
        self._packed_window.append(None)
        leaving = None
        if len(window) > self.window_intervals:
            leaving = window.pop(0)
            self._packed_window.pop(0)
        if len(window) < self.window_intervals:
            self._hold()
            return
        grid = self._grid
        if grid is None:  # first evaluation (or first after from_state / reset_reference)
            grid = self._grid = _Grid(self._reference, window)
        else:
            grid.add(bins)
            if leaving is not None:
                grid.remove(leaving)
        pair = grid.pair()
        if grid.edges.shape[0] > 2 * pair.upper.shape[0] + 64:
            self._grid = None  # mostly buckets neither window lists any more: rebuild next time
        if not pair.n or not pair.m:
            self._hold()
            return
        self._evaluate(pair)

    def to_state(self) -> dict:
        """JSON-serialisable state; ``from_state`` rebuilds an identical detector.

        A keyed detector (every histogram a LogHistogram of one relative accuracy) stores its
        histograms by bucket key, ``[[neg_offset, zero, pos_offset], neg_counts, pos_counts]``,
        and names the accuracy under ``"relative_accuracy"``; otherwise they are
        ``[lower, upper, counts]`` lists. Keyed counts are strings: ``""`` for none, else the
        width of each count in bytes (``"1"``, ``"2"``, ``"4"`` or ``"8"``, the narrowest that
        holds the largest) followed by the counts as little-endian unsigned integers of that
        width, base64-encoded (``"1AQID"`` is the counts 1, 2, 3). ``from_state`` also reads
        the lists of integers that states written before that hold.
        """
        state = {
            "params": {
                **self._params(),
                "reference_intervals": self.reference_intervals,
                "window_intervals": self.window_intervals,
            },
            "reference": _listed(self._packed_ref()),
            "n_reference": self._n_reference,
            "window": [_listed(packed) for packed in self._packed_windows()],
            **self._result_state(),
        }
        if self._keyed:
            state["relative_accuracy"] = self._relative_accuracy
        return state

    def _packed_ref(self) -> _Packed:
        if self._packed_reference is None:
            if self._keyed and self._n_reference:
                assert self._keys is not None
                self._packed_reference = _pack_stores(self._keys.reference())
            elif self._keyed:
                self._packed_reference = ((0, 0, 0), "", "")
            else:
                self._packed_reference = _pack(self._reference)
        return self._packed_reference

    def _packed_windows(self) -> list[_Packed]:
        packed = self._packed_window
        pack = _pack_stores if self._keyed else _pack
        for i, item in enumerate(self._window):
            if packed[i] is None:
                packed[i] = pack(item)
        return packed  # type: ignore[return-value]

    @classmethod
    def from_state(cls, state: dict) -> WindowDrift:
        """Rebuild a detector from ``to_state()``, by key or on edges (older states)."""
        det = cls(**state["params"])
        det._n_reference = int(state["n_reference"])
        relative_accuracy = state.get("relative_accuracy")
        if relative_accuracy is not None:
            det._start_keys(float(relative_accuracy))
            assert det._keys is not None
            limit = _key_limit(det._keys.log_gamma)  # as LogHistogram.from_state
            det._window = [_unpack_stores(b, limit) for b in state["window"]]
            reference = _unpack_stores(state["reference"], limit) if det._n_reference else None
            det._keys = _Keys.build(det._keys.log_gamma, reference, det._window)
        else:
            det._reference = _unpack(state["reference"])
            det._window = [_unpack(b) for b in state["window"]]
            if det._n_reference or det._window:
                # On edges (a state from before keys): moved to keys on the first update if
                # its buckets are those of that update's LogHistogram.
                det._keyed = False
                det._convertible = True
        det._packed_window = [None] * len(det._window)
        det._load_result_state(state)
        return det


def _evaluate_keyed(detectors: list[WindowDrift], all_distances: bool) -> None:
    """Evaluate keyed detectors whose windows are complete, together (see ``update_many``)."""
    if len(detectors) < _SMALL and not all_distances:
        # A few detectors: the vectorised pass costs ~100 us of fixed numpy overhead. PSI and
        # KS have single-pair forms bit for bit equal to the batch.
        rest = []
        for det in detectors:
            exact = _EXACT.get(det.distance)
            if exact is None:
                rest.append(det)
                continue
            assert det._keys is not None
            pair = det._keys.pair()
            if not pair.n or not pair.m:
                det._hold()
                continue
            alpha = 1.0 / det.expected_run_length
            raw, null, threshold = exact(pair, alpha, det.min_expected, det.max_bins)
            det._decide(raw - null, threshold)
            det._pair = pair
        detectors = rest
    if not detectors:
        return
    ok, corrected, thresholds = detector_distances(
        batch_window_distances, [det._keys for det in detectors], detectors, all_distances
    )
    if not all_distances:  # the usual batch
        _decide_many(detectors, ok, corrected, thresholds)
        return
    for j, det in enumerate(detectors):  # all_distances: every detector keeps all four
        if not ok[j]:
            det._hold()
            continue
        name = det.distance
        det._decide(corrected[name][j], thresholds[name][j])
        det._distances = {d: corrected[d][j] for d in DISTANCES}
