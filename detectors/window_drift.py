"""Distribution drift of one arm: its recent window against its own reference window."""

from __future__ import annotations

from typing import Any

import numpy as np

from .histogram_distance import _HistogramDrift, _Pair, as_bins, merge_bins


def _pack(bins: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[list]:
    return [bins[0].tolist(), bins[1].tolist(), bins[2].tolist()]


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
        if upper.shape[0] and not (edges.take(idx, mode="clip") == upper).all():
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
        self._window: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._grid: _Grid | None = None
        # The state's lists of each histogram, packed on the first to_state() that needs them:
        # a histogram does not change once added, and the daemon snapshots after every
        # update, so packing the whole window each time cost as much as the update itself.
        self._packed_reference: list[list] | None = None
        self._packed_window: list[list[list] | None] = []

    @property
    def ready(self) -> bool:
        """True once both windows are complete (evaluations happen)."""
        return (
            self._n_reference >= self.reference_intervals
            and len(self._window) >= self.window_intervals
        )

    def update(self, histogram: Any) -> None:
        """Add one interval's histogram: a Summary, a LogHistogram or a bins tuple."""
        bins = as_bins(histogram)
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
        """JSON-serialisable state; ``from_state`` rebuilds an identical detector."""
        return {
            "params": {
                **self._params(),
                "reference_intervals": self.reference_intervals,
                "window_intervals": self.window_intervals,
            },
            "reference": [list(x) for x in self._packed_ref()],
            "n_reference": self._n_reference,
            "window": [[list(x) for x in packed] for packed in self._packed_windows()],
            **self._result_state(),
        }

    def _packed_ref(self) -> list[list]:
        if self._packed_reference is None:
            self._packed_reference = _pack(self._reference)
        return self._packed_reference

    def _packed_windows(self) -> list[list[list]]:
        packed = self._packed_window
        for i, bins in enumerate(self._window):
            if packed[i] is None:
                packed[i] = _pack(bins)
        return packed  # type: ignore[return-value]

    @classmethod
    def from_state(cls, state: dict) -> WindowDrift:
        """Rebuild a detector from ``to_state()``."""
        det = cls(**state["params"])
        det._reference = _unpack(state["reference"])
        det._n_reference = int(state["n_reference"])
        det._window = [_unpack(b) for b in state["window"]]
        det._packed_window = [None] * len(det._window)
        det._load_result_state(state)
        return det
