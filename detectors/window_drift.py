"""Distribution drift of one arm: its recent window against its own reference window."""

from __future__ import annotations

from typing import Any

import numpy as np

from .histogram_distance import _HistogramDrift, as_bins, merge_bins


def _pack(bins: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[list]:
    return [bins[0].tolist(), bins[1].tolist(), bins[2].tolist()]


def _unpack(packed: list[list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.asarray(packed[0], dtype=np.float64),
        np.asarray(packed[1], dtype=np.float64),
        np.asarray(packed[2], dtype=np.int64),
    )


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
            self._n_reference += 1
            self._hold()
            return
        self._window.append(bins)
        if len(self._window) > self.window_intervals:
            self._window.pop(0)
        if len(self._window) < self.window_intervals:
            self._hold()
            return
        recent = merge_bins(self._window)
        if not recent[2].sum() or not self._reference[2].sum():
            self._hold()
            return
        self._evaluate(recent, self._reference)

    def to_state(self) -> dict:
        """JSON-serialisable state; ``from_state`` rebuilds an identical detector."""
        return {
            "params": {
                **self._params(),
                "reference_intervals": self.reference_intervals,
                "window_intervals": self.window_intervals,
            },
            "reference": _pack(self._reference),
            "n_reference": self._n_reference,
            "window": [_pack(b) for b in self._window],
            **self._result_state(),
        }

    @classmethod
    def from_state(cls, state: dict) -> WindowDrift:
        """Rebuild a detector from ``to_state()``."""
        det = cls(**state["params"])
        det._reference = _unpack(state["reference"])
        det._n_reference = int(state["n_reference"])
        det._window = [_unpack(b) for b in state["window"]]
        det._load_result_state(state)
        return det
