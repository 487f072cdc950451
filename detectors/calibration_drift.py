"""Model-quality drift of a probabilistic classifier: calibration error and bias per arm."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ._calibration import check_run_length, chi2_sf
from ._edge import _EdgeAlarm

_MAX_SCORE = 300.0
_SQRT2 = math.sqrt(2.0)


def bin_predictions(
    predictions: np.ndarray, outcomes: np.ndarray, *, n_bins: int = 10
) -> tuple[list[int], list[float], list[float]]:
    """Fold (prediction, 0/1 outcome) pairs into the input of :class:`CalibrationDrift`.

    Bin ``b`` holds predictions in ``[b / n_bins, (b + 1) / n_bins)`` (1.0 goes to the last bin).
    Returns ``(counts, prediction_sums, outcome_sums)``, plain lists, mergeable by addition.
    """
    p = np.asarray(predictions, dtype=np.float64).ravel()
    y = np.asarray(outcomes, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError("predictions and outcomes must have the same length")
    if p.size and (p.min() < 0 or p.max() > 1 or not np.all(np.isin(y, (0.0, 1.0)))):
        raise ValueError("predictions must lie in [0, 1] and outcomes be 0 or 1")
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    psum = np.bincount(idx, weights=p, minlength=n_bins)
    ysum = np.bincount(idx, weights=y, minlength=n_bins)
    return counts.tolist(), psum.tolist(), ysum.tolist()


class CalibrationDrift(_EdgeAlarm):
    """Calibrated alarm on a classifier's calibration error and bias, for one arm.

    Input per evaluation interval, for the predictions whose labels arrived in that interval,
    binned by predicted probability (``bin_predictions`` builds it): ``counts[b]`` predictions,
    their sum ``prediction_sums[b]`` and the sum of their 0/1 outcomes ``outcome_sums[b]``. The
    detector adds up the last ``window_intervals`` updates and reports

    * ``ece``, the expected calibration error ``sum_b n_b / N |mean_pred_b - mean_outcome_b|``;
    * ``bias``, mean prediction minus mean outcome;
    * ``p_value`` of the hypothesis that the model is calibrated, outcome ~ Bernoulli(prediction):
      the Bonferroni combination of a bias z-test and the Hosmer-Lemeshow chi-square over the
      non-empty bins, both with the conservative variance ``E_b (1 - E_b / n_b) >= sum p (1 - p)``.

    Calibration: alarm when ``p_value < 1 / expected_run_length``, so at most
    ``N / expected_run_length`` false onsets are expected in ``N`` evaluations. ``score`` is
    ``-log10(p_value)`` and ``threshold`` is ``log10(expected_run_length)``; an alarm clears when
    the score falls to ``clear_fraction * threshold`` or below.

    Parameters
    ----------
    expected_run_length
        Expected number of evaluations between false alarms for a calibrated model.
    n_bins
        Number of probability bins of the input.
    window_intervals
        Number of most recent updates added up for each evaluation.
    clear_fraction
        An alarm clears when ``score <= clear_fraction * threshold``.

    Examples
    --------
    >>> import numpy as np
    >>> from armguard.detectors import CalibrationDrift
    >>> from armguard.detectors.calibration_drift import bin_predictions
    >>> rng = np.random.default_rng(42)
    >>> det = CalibrationDrift(expected_run_length=10_000, window_intervals=4)
    >>> for i in range(12):
    ...     p = rng.uniform(0.05, 0.6, 2_000)
    ...     truth = p if i < 8 else np.clip(p - 0.05, 0, 1)   # the model over-predicts from 8
    ...     det.update(*bin_predictions(p, rng.random(p.size) < truth))
    ...     if det.alarm:
    ...         print(i, round(det.bias, 3), round(det.ece, 3), round(det.score, 1))
    9 0.03 0.03 8.6

    References
    ----------
    Hosmer, D. W. and Lemeshow, S. (1980). Goodness of fit tests for the multiple logistic
    regression model. Communications in Statistics A 9(10), 1043-1069.
    Naeini, M. P., Cooper, G. F. and Hauskrecht, M. (2015). Obtaining well calibrated
    probabilities using Bayesian binning. AAAI 29 (expected calibration error).
    """

    def __init__(
        self,
        *,
        expected_run_length: float = 10_000.0,
        n_bins: int = 10,
        window_intervals: int = 12,
        clear_fraction: float = 0.5,
    ):
        self.expected_run_length = check_run_length(expected_run_length)
        for name, value, lo in (("n_bins", n_bins, 1), ("window_intervals", window_intervals, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        self.n_bins = n_bins
        self.window_intervals = window_intervals
        if (
            isinstance(clear_fraction, bool)
            or not isinstance(clear_fraction, int | float)
            or not 0 <= clear_fraction <= 1
        ):
            raise ValueError(f"clear_fraction must be a number in [0, 1], got {clear_fraction!r}")
        self.clear_fraction = float(clear_fraction)
        self._threshold = math.log10(self.expected_run_length)
        self._window: list[list[list[float]]] = []
        self._buffer: np.ndarray | None = None  # the window as an array, built on first use
        self._ece = 0.0
        self._bias = 0.0
        self._p_value = 1.0
        self._count = 0

    def update(
        self,
        counts: Sequence[int],
        prediction_sums: Sequence[float],
        outcome_sums: Sequence[float],
    ) -> None:
        """Add one interval's binned predictions and outcomes and evaluate the window."""
        rows = [
            self._row("counts", counts),
            self._row("prediction_sums", prediction_sums),
            self._row("outcome_sums", outcome_sums),
        ]
        for n, p, y in zip(*rows, strict=True):
            if p > n or y > n:
                raise ValueError("prediction_sums and outcome_sums cannot exceed counts")
        window = self._window
        if self.window_intervals == 1:
            window[:] = [rows]
            self._evaluate(*rows)
            return
        # Window totals in numpy: the rows are kept in time order in a (window, 3, bins) buffer,
        # so the sum is the one np.sum(axis=0) over the window list gives, bit for bit (a running
        # add/subtract total would drift by rounding and differ after a state round trip).
        buf = self._buffer
        if buf is None:  # first update, or first after from_state: build it from the window
            window.append(rows)
            del window[: -self.window_intervals]
            buf = self._buffer = np.zeros((self.window_intervals, 3, self.n_bins))
            buf[: len(window)] = window
        elif len(window) == self.window_intervals:
            window.pop(0)
            window.append(rows)
            buf[:-1] = buf[1:]
            buf[-1] = rows
        else:
            buf[len(window)] = rows
            window.append(rows)
        self._evaluate(*buf[: len(window)].sum(axis=0).tolist())

    def _row(self, name: str, seq: Sequence[float]) -> list[float]:
        if isinstance(seq, np.ndarray):
            row = seq.tolist() if seq.dtype == np.float64 else list(map(float, seq.tolist()))
        else:
            row = list(map(float, seq))
        if len(row) != self.n_bins:
            raise ValueError(f"{name} must have n_bins={self.n_bins} entries, got {len(row)}")
        # One comparison and one sum catch a negative, a NaN (the sum is NaN) or an inf.
        if not (min(row) >= 0.0 and math.isfinite(sum(row))):
            raise ValueError(f"{name} must be finite and >= 0")
        return row

    def _evaluate(self, n: list[float], e: list[float], o: list[float]) -> None:
        # Plain floats: on ~10 bins each numpy call would cost more than the arithmetic.
        count = sum(n)
        self._count = round(count)
        if count == 0:
            self._set_level(self._in_alarm)
            return
        gap = e_total = o_total = v_total = hl = 0.0
        k = 0
        for nb, eb, ob in zip(n, e, o, strict=True):
            e_total += eb
            o_total += ob
            if nb > 0:
                d = ob - eb
                gap += abs(d)
                v = eb * (1.0 - eb / nb)
                if v > 0:
                    v_total += v
                    hl += d * d / v
                    k += 1
        self._ece = gap / count
        self._bias = (e_total - o_total) / count
        if k:
            p_hl = chi2_sf(hl, k)
            z = (o_total - e_total) / math.sqrt(v_total)
            p_bias = math.erfc(abs(z) / _SQRT2)
            self._p_value = min(1.0, 2.0 * min(p_hl, p_bias))
        else:
            self._p_value = 1.0
        score = self.score
        if score > self._threshold:
            self._set_level(True)
        elif self._in_alarm:
            self._set_level(score > self.clear_fraction * self._threshold)
        else:
            self._set_level(False)

    @property
    def ece(self) -> float:
        """Expected calibration error over the window."""
        return self._ece

    @property
    def bias(self) -> float:
        """Mean prediction minus mean outcome over the window."""
        return self._bias

    @property
    def p_value(self) -> float:
        """p-value of "the model is calibrated" over the window."""
        return self._p_value

    @property
    def count(self) -> int:
        """Number of labelled predictions in the window."""
        return self._count

    @property
    def score(self) -> float:
        """``-log10(p_value)`` (capped at 300)."""
        if self._p_value <= 0.0:
            return _MAX_SCORE
        return min(_MAX_SCORE, -math.log10(self._p_value))

    @property
    def threshold(self) -> float:
        """``log10(expected_run_length)``: alarm when ``score`` exceeds it."""
        return self._threshold

    def to_dict(self) -> dict:
        """Current result as a JSON-safe dict (for metrics and decision records)."""
        return {
            "alarm": self._alarm,
            "in_alarm": self._in_alarm,
            "score": self.score,
            "threshold": self._threshold,
            "p_value": self._p_value,
            "ece": self._ece,
            "bias": self._bias,
            "count": self._count,
            "n_alarms": self._n_alarms,
        }

    def to_state(self) -> dict:
        """JSON-serialisable state; ``from_state`` rebuilds an identical detector."""
        return {
            "params": {
                "expected_run_length": self.expected_run_length,
                "n_bins": self.n_bins,
                "window_intervals": self.window_intervals,
                "clear_fraction": self.clear_fraction,
            },
            "window": [[list(r) for r in rows] for rows in self._window],
            "ece": self._ece,
            "bias": self._bias,
            "p_value": self._p_value,
            "count": self._count,
            **self._edge_state(),
        }

    @classmethod
    def from_state(cls, state: dict) -> CalibrationDrift:
        """Rebuild a detector from ``to_state()``."""
        det = cls(**state["params"])
        det._window = [[[float(v) for v in r] for r in rows] for rows in state["window"]]
        det._ece = float(state["ece"])
        det._bias = float(state["bias"])
        det._p_value = float(state["p_value"])
        det._count = int(state["count"])
        det._load_edge_state(state)
        return det
