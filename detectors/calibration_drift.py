"""Model-quality drift of a probabilistic classifier: calibration error and bias per arm."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, NoReturn

import numpy as np

from ._calibration import _TWO_OVER_SQRT_PI, check_run_length, chi2_sf_int
from ._edge import _EdgeAlarm

_MAX_SCORE = 300.0
_SQRT2 = math.sqrt(2.0)
_sqrt = math.sqrt
_erfc = math.erfc
_exp = math.exp
_log10 = math.log10
_F64 = np.dtype(np.float64)
_np_add = np.add
_less_equal = np.less_equal
_accumulate = np.add.accumulate
_INF = math.inf
_NAMES = ("counts", "prediction_sums", "outcome_sums")
_n_bins_of = attrgetter("n_bins")
# Batches smaller than this go through update() one by one (see `CalibrationDrift.update_many`):
# measured, the vectorised pass costs ~100 us a batch, 8-15 us a row below ~16 rows, ~6 at 32.
_SMALL = 32
_Row = tuple[list[float], list[float], list[float]]  # counts, prediction sums, outcome sums
_Slot = tuple[np.ndarray, ...]  # views of a buffer slot (see `CalibrationDrift._slot`)


def _floats(seq: Sequence[float]) -> list[float]:
    """``seq`` as a new list of Python floats (one numpy call for an array)."""
    if isinstance(seq, np.ndarray):
        return (seq if seq.dtype is _F64 else seq.astype(_F64)).tolist()
    return list(map(float, seq))


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
        self._clear_threshold = self.clear_fraction * self._threshold
        # The window, oldest interval first, each as (counts, prediction sums, outcome sums).
        # One interval: `_window` holds it as lists. More: the window is the rows
        # `_rows[_start:_end]` of a buffer twice its length, kept as two blocks (see `update`).
        self._window: list[_Row] = []
        if window_intervals > 1:
            shape = (3, n_bins)
            # Each buffer slot is (counts again, counts, prediction sums, outcome sums, 0, 0):
            # `_rows` is its middle (counts, prediction sums, outcome sums), and one comparison
            # of its last four rows with its first four checks the interval (see `update`).
            self._buffer = np.zeros((2 * window_intervals, 6, n_bins))
            self._rows = self._buffer[:, 1:4]
            # The views `update` uses of each slot, made on its first use and kept (numpy makes
            # a new view, ~0.1 us, on every buffer[i]; making all at once would multiply the
            # cost of a new or restored detector by five).
            self._slots: list[_Slot | None] = [None] * (2 * window_intervals)
            # the comparison's result, written where it reads as bytes without a copy
            self._checked = bytearray(4 * n_bins)
            self._checked_out = np.frombuffer(self._checked, dtype=bool).reshape(4, n_bins)
            self._all_checked = b"\x01" * (4 * n_bins)
            self._start = self._end = 0
            # The older block (its last `_back` rows): `_suffix[-_back + j]` is the sum of its rows
            # from the j-th to its end; the newer block (the other rows): its running sum `_front`.
            self._suffix = np.zeros((window_intervals, *shape))
            self._suffix_views = list(self._suffix)
            # where a block switch writes: the last window_intervals - 1 sums, last first
            self._suffix_back = self._suffix[1:][::-1]
            self._back = 0
            self._zero = np.zeros(shape)  # read only: an empty block's sum
            self._front = np.zeros(shape)
            self._spare = np.zeros(shape)  # the next `_front`, written before it is committed
            self._total = np.zeros(shape)  # scratch: the window's sums
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
        if self.window_intervals == 1:
            self._update_one(counts, prediction_sums, outcome_sums)
            return
        # The window is two blocks: an older one, of which the sums from each row to the block's
        # end are kept (`_suffix`), and a newer one summed as rows arrive (`_front`), so the
        # window total is ``_suffix[...] + _front``. Every number is then a sum of at most
        # ``window_intervals`` non-negative terms and never a difference: the rounding error of
        # a plain sum, no drift, no cancellation (integer counts stay exact, a bin that empties
        # sums to exactly 0), and a function of the rows in the window and of where the blocks
        # split, which `to_state` records. When the older block is used up the newer one, less
        # the interval leaving, becomes it (one cumulative sum every ``window_intervals``
        # updates). The sums are numpy arrays of (3, n_bins): two numpy additions an update
        # instead of ~60 Python ones, the same IEEE additions in the same order.
        if not len(counts) == len(prediction_sums) == len(outcome_sums) == self.n_bins:
            self._reject(counts, prediction_sums, outcome_sums)
        start = self._start
        end = self._end
        if end == len(self._slots):  # the buffer is used up: move the window to its start
            rows = self._rows
            rows[: end - start] = rows[start:end]
            self._end = end = end - start
            self._start = start = 0
        # The new interval goes to the first free slot (not part of the window until committed
        # below, so refused input leaves the detector as it was), cast to float64 by numpy.
        slot = self._slots[end]
        if slot is None:
            slot = self._slots[end] = self._slot(end)
        _, counts_twice, e, o, low, high, row = slot
        counts_twice[...] = counts  # broadcast to both rows in one assignment
        e[...] = prediction_sums
        o[...] = outcome_sums
        # One comparison checks it: (e, o, 0, 0) <= (n, n, e, o) is 0 <= e <= n and 0 <= o <= n
        # in every bin (a NaN fails every comparison); an inf or an overflow makes the window's
        # count inf below.
        _less_equal(low, high, self._checked_out)
        if self._checked != self._all_checked:
            self._reject(counts, prediction_sums, outcome_sums)
        back = self._back
        front = self._front
        if end - start == self.window_intervals:  # the oldest interval leaves
            start += 1
            if back:
                back -= 1
            else:  # the newer block becomes the older one, less the interval leaving
                back = end - start  # window_intervals - 1
                # sums from each row to the end: a cumulative sum from the last row back, the
                # same additions as ``row[j] + (row[j + 1] + ...)`` (np.cumsum's, with no copy)
                _accumulate(self._rows[start:end][::-1], 0, None, self._suffix_back)
                front = self._zero
        # ufuncs with `out` passed by position (parsing the keyword costs ~30 ns a call)
        new_front = _np_add(front, row, self._spare)
        older = self._suffix_views[-back] if back else self._zero
        tn, te, to = _np_add(older, new_front, self._total).tolist()
        count = sum(tn)
        # An inf total: the interval's own count overflows (`_reject` names it) or the window's
        # does; either way the interval is refused before anything is committed.
        if not count < _INF:
            self._reject(counts, prediction_sums, outcome_sums)
        # Comparing floats with floats (0.0, not 0) takes CPython's fast path; the lengths are
        # checked, so zip needs no strict.
        # k counts the bins with v > 0 down from all of them: the others are few.
        gap = v_total = hl = 0.0
        k = self.n_bins
        for nb, eb, ob in zip(tn, te, to):  # noqa: B905
            if nb > 0.0:
                d = ob - eb
                gap += d if d >= 0.0 else -d  # abs(d) without the call (abs(-0.0) adds alike)
                v = eb * (1.0 - eb / nb)
                if v > 0.0:
                    v_total += v
                    hl += d * d / v
                else:
                    k -= 1
            else:
                k -= 1
        self._start = start
        self._end = end + 1
        self._back = back
        self._spare = self._front  # free again
        self._front = new_front
        self._evaluate(count, sum(te), sum(to), gap, v_total, hl, k)

    @classmethod
    def update_many(
        cls,
        detectors: Sequence[CalibrationDrift],
        counts: Any,
        prediction_sums: Any,
        outcome_sums: Any,
    ) -> None:
        """``detectors[i].update(counts[i], prediction_sums[i], outcome_sums[i])`` for every
        ``i``, with a fixed number of numpy calls per batch.

        Thousands of arms are evaluated at the same interval boundary: here each detector
        only takes its interval into its window, with two small numpy calls of its own (the
        interval into its buffer slot, the newer block's new sum into its array; every
        ``window_intervals`` updates one more for the older block's sums); the window
        totals, the statistics over the bins, the p-values and the scores are computed for
        the whole batch at once. Every detector's results and state are those of ``update()`` bit for
        bit (the same IEEE operations in the same order, the bins added one after the other
        as ``update()`` adds them, ``exp``, ``erfc`` and ``log10`` from ``math``), so a
        detector's results do not depend on the rest of the batch, and single and batched
        updates of one detector may be mixed freely. A detector listed twice sees its updates
        in list order (the batch is cut into runs of distinct detectors, each run before the
        next; a run of fewer than 32 rows is given to ``update()`` one by one, as a small
        batch is, so a batch ordered by detector costs about what ``update()`` does).
        Detectors of different ``expected_run_length``, ``window_intervals`` (1 included)
        and ``clear_fraction`` may be mixed; all must have the same ``n_bins``, the width of
        the arrays (call once per ``n_bins`` otherwise). Batches of fewer than 32 rows are
        checked, then given to ``update()`` one by one: below that the vectorised pass (~100
        us of numpy calls however small the batch) costs more than it saves.

        Refused input changes nothing: every interval is checked before any detector is
        updated, and the first row refused on its own raises the ``ValueError`` ``update()``
        would raise for it, prefixed with its index (``"row 3: ..."``). The one check that
        depends on the window, a window total count that overflows float64 (counts near
        1.8e308), is made when the windows are summed: per run of distinct detectors of 32
        rows or more, or per row in a small batch or a shorter run, so the rows before the
        refused one may then have been applied (and numpy may warn of the overflow, as in
        ``update()``).

        Parameters
        ----------
        detectors
            The detectors to update, all with the same ``n_bins``.
        counts, prediction_sums, outcome_sums
            ``(len(detectors), n_bins)`` array-likes: row ``i`` is the interval of
            ``detectors[i]``, as ``update()`` takes it.

        Examples
        --------
        >>> import numpy as np
        >>> from armguard.detectors import CalibrationDrift
        >>> from armguard.detectors.calibration_drift import bin_predictions
        >>> rng = np.random.default_rng(42)
        >>> dets = [CalibrationDrift(expected_run_length=10_000, window_intervals=4)
        ...         for _ in range(3)]
        >>> for i in range(12):
        ...     rows = []
        ...     for arm in range(3):
        ...         p = rng.uniform(0.05, 0.6, 2_000)
        ...         truth = np.clip(p - 0.05, 0, 1) if arm == 2 and i >= 8 else p
        ...         rows.append(bin_predictions(p, rng.random(p.size) < truth))
        ...     CalibrationDrift.update_many(dets, *zip(*rows))  # K rows of each input
        >>> [(d.in_alarm, round(d.bias, 3), round(d.score, 1)) for d in dets]
        [(False, -0.006, 0.6), (False, 0.006, 0.3), (True, 0.061, 33.8)]
        """
        dets = list(detectors)
        size = len(dets)
        if not size:
            for name, value in zip(_NAMES, (counts, prediction_sums, outcome_sums), strict=True):
                if len(value):
                    raise ValueError(f"{name} must have one row per detector: got 0 detectors")
            return
        if set(map(type, dets)) != {CalibrationDrift}:  # (one set, not a loop: thousands)
            for det in dets:
                if not isinstance(det, CalibrationDrift):
                    raise ValueError(f"detectors must be CalibrationDrift instances, got {det!r}")
        widths = set(map(_n_bins_of, dets))
        if len(widths) > 1:
            raise ValueError(
                f"update_many takes detectors of one n_bins, got {sorted(widths)}: call it "
                "once per n_bins"
            )
        n_bins = dets[0].n_bins
        if size < _SMALL:
            checked = _checked_rows(counts, prediction_sums, outcome_sums, size, n_bins)
            if checked is not None:
                for i, (det, row) in enumerate(zip(dets, checked, strict=True)):
                    try:
                        det.update(*row)
                    except ValueError as exc:  # only a window total that overflows
                        raise ValueError(f"row {i}: {exc}") from None
                return
            # else something is wrong: the checks below name it
        # The intervals as one (K, 3, n_bins) float64 array, cast as update() casts them.
        rows = np.empty((size, 3, n_bins))
        for j, (name, value) in enumerate(
            zip(_NAMES, (counts, prediction_sums, outcome_sums), strict=True)
        ):
            try:
                column = np.asarray(value, dtype=_F64)
            except (TypeError, ValueError):
                column = None  # ragged, or not numbers: named below
            if column is None or column.shape != (size, n_bins):
                shape = (
                    "rows numpy cannot read as one float array" if column is None else column.shape
                )
                raise ValueError(
                    f"{name} must be a (len(detectors), n_bins) = ({size}, {n_bins}) array, "
                    f"got {shape}"
                )
            rows[:, j] = column
        # The checks of update() on every interval at once: 0 <= e <= n and 0 <= o <= n in
        # every bin (a NaN fails every comparison), and the interval's count finite (summed
        # as update() sums it, bin after bin: an inf or an overflow).
        values = rows[:, 1:]
        with np.errstate(all="ignore"):
            ok = (values >= 0.0) & (values <= rows[:, :1])
            own = rows[:, 0, 0] + 0.0
            for b in range(1, n_bins):
                own += rows[:, 0, b]
        bad = ~ok.reshape(size, -1).all(axis=1) | ~(own < _INF)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            _refuse(dets[i], rows[i], i)
        if len(set(map(id, dets))) == size:  # distinct detectors: one run
            _update_run(dets, rows, 0)
            return
        # Runs of distinct detectors, in order: a detector listed twice starts a new run. A run
        # under `_SMALL` rows goes through update() one by one, as a small batch does (a batch
        # ordered by detector would otherwise pay the vectorised pass for every row).
        first = 0
        seen: set[int] = set()
        for i, det in enumerate(dets):
            key = id(det)
            if key in seen:
                _update_rows(dets[first:i], rows[first:i], first)
                first = i
                seen = set()
            seen.add(key)
        _update_rows(dets[first:], rows[first:], first)

    def _slot(self, i: int) -> _Slot:
        """Views of buffer slot ``i``: counts, counts again and counts, prediction sums,
        outcome sums, the two compared halves and the row."""
        s = self._buffer[i]
        return s[1], s[:2], s[2], s[3], s[2:], s[:4], s[1:4]

    def _update_one(
        self,
        counts: Sequence[int],
        prediction_sums: Sequence[float],
        outcome_sums: Sequence[float],
    ) -> None:
        """`update` with a one-interval window: the statistics of the interval itself."""
        n = _floats(counts)
        e = _floats(prediction_sums)
        o = _floats(outcome_sums)
        if not len(n) == len(e) == len(o) == self.n_bins:
            self._reject(counts, prediction_sums, outcome_sums)
        # Checked in the same pass for 0 <= e <= n and 0 <= o <= n (a NaN fails every
        # comparison; an inf or an overflow makes the count inf below, and e and o, bounded by
        # n, are then finite too): the input `_reject` refuses.
        gap = v_total = hl = 0.0
        k = 0
        for nb, eb, ob in zip(n, e, o):  # noqa: B905
            if nb > 0.0:
                if not (0.0 <= eb <= nb and 0.0 <= ob <= nb):
                    self._reject(counts, prediction_sums, outcome_sums)
                d = ob - eb
                gap += d if d >= 0.0 else -d
                v = eb * (1.0 - eb / nb)
                if v > 0.0:
                    v_total += v
                    hl += d * d / v
                    k += 1
            elif not (nb == 0.0 and eb == 0.0 and ob == 0.0):
                self._reject(counts, prediction_sums, outcome_sums)
        count = sum(n)
        if not count < _INF:
            self._reject(counts, prediction_sums, outcome_sums)
        self._window = [(n, e, o)]
        self._evaluate(count, sum(e), sum(o), gap, v_total, hl, k)

    def _evaluate(
        self,
        count: float,
        e_total: float,
        o_total: float,
        gap: float,
        v_total: float,
        hl: float,
        k: int,
    ) -> None:
        """Finish the statistics of the window from its totals and sums over bins.

        ``gap``, ``v_total`` and ``hl`` sum, over the bins with ``n_b > 0``, ``|o_b - e_b|``,
        ``v_b = e_b (1 - e_b / n_b)`` and ``(o_b - e_b)^2 / v_b`` (both where ``v_b > 0``,
        ``k`` such bins). Plain floats: on ~10 bins each numpy call would cost more than the
        arithmetic.
        """
        self._count = round(count)
        if count == 0.0:
            level = self._in_alarm
        else:
            self._ece = gap / count
            self._bias = (e_total - o_total) / count
            if k:
                p_hl = chi2_sf_int(hl, k)
                p_bias = _erfc(abs((o_total - e_total) / _sqrt(v_total)) / _SQRT2)
                p = 2.0 * (p_bias if p_bias < p_hl else p_hl)  # min(1, 2 min(p_hl, p_bias))
                p = self._p_value = p if p < 1.0 else 1.0
            else:
                p = self._p_value = 1.0
            score = _MAX_SCORE if p <= 0.0 else -_log10(p)  # self.score
            if not score < _MAX_SCORE:
                score = _MAX_SCORE
            level = score > self._threshold or (self._in_alarm and score > self._clear_threshold)
        # `_set_level`, inline
        self._alarm = alarm = level and not self._in_alarm
        self._in_alarm = level
        if alarm:
            self._n_alarms += 1

    def _reject(self, *rows: Sequence[float]) -> NoReturn:
        # The slow path, only for input the fast checks refused: it names what is wrong.
        n, e, o = (self._row(name, row) for name, row in zip(_NAMES, rows, strict=True))
        for nb, eb, ob in zip(n, e, o, strict=True):
            if eb > nb or ob > nb:
                raise ValueError("prediction_sums and outcome_sums cannot exceed counts")
        # every check on the interval itself passed: its window's total count is what overflows
        raise ValueError(
            "counts must be finite and >= 0: the window's total count overflows with this interval"
        )

    def _row(self, name: str, seq: Sequence[float]) -> list[float]:
        row = _floats(seq)
        if len(row) != self.n_bins:
            raise ValueError(f"{name} must have n_bins={self.n_bins} entries, got {len(row)}")
        # One comparison and one sum catch a negative, a NaN (the sum is NaN) or an inf.
        if not (min(row) >= 0.0 and math.isfinite(sum(row))):
            raise ValueError(f"{name} must be finite and >= 0")
        return row

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

    def _window_sums(self) -> np.ndarray:
        """The window's (counts, prediction sums, outcome sums) sums, (3, n_bins), as `update`
        adds them: the older block's sum plus the newer block's (``window_intervals > 1``)."""
        older = self._suffix[-self._back] if self._back else self._zero
        return older + self._front

    def _window_rows(self) -> list[list[list[float]]]:
        """The intervals in the window, oldest first, each as [counts, prediction sums,
        outcome sums] lists."""
        if self.window_intervals == 1:
            return [[list(col) for col in row] for row in self._window]
        return self._rows[self._start : self._end].tolist()

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
            "window": self._window_rows(),
            # The newest `front` intervals are the block summed as they arrived (see `update`).
            "front": (
                self._end - self._start - self._back
                if self.window_intervals > 1
                else len(self._window)
            ),
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
        window = [[[float(v) for v in col] for col in row] for row in state["window"]]
        # States written before the two blocks have no "front": their window is one block,
        # summed oldest first, the order their window total was computed in.
        if len(window) > det.window_intervals:
            raise ValueError(
                f"window must hold at most window_intervals={det.window_intervals} intervals, "
                f"got {len(window)}"
            )
        front = int(state.get("front", len(window)))
        if not 0 <= front <= len(window):
            raise ValueError(f"front must be in [0, {len(window)}], got {front}")
        if det.window_intervals == 1:
            det._window = [tuple(row) for row in window]
        elif window:
            rows = det._rows[: len(window)]
            rows[:] = window  # checks the shape: n_bins entries in each column
            # `update` takes the window's rows as it checked them, finite with 0 <= e, o <= n
            checked = np.isfinite(rows) & (rows >= 0.0)
            if not (checked.all() and (rows[:, 1:] <= rows[:, :1]).all()):
                raise ValueError(
                    "window intervals must be finite and >= 0, with prediction_sums and "
                    "outcome_sums at most counts"
                )
            det._end = len(window)
            back = det._back = len(window) - front
            if back:
                det._suffix[-back:] = np.cumsum(rows[:back][::-1], axis=0)[::-1]
            for row in rows[back:]:  # the newer block summed oldest first, as `update` does
                det._front = det._front + row
        det._ece = float(state["ece"])
        det._bias = float(state["bias"])
        det._p_value = float(state["p_value"])
        det._count = int(state["count"])
        det._load_edge_state(state)
        return det

    def __reduce__(self) -> tuple[Callable[[dict], CalibrationDrift], tuple[dict]]:
        # The detector holds numpy views of its own arrays (`_rows`, `_slots`, `_suffix_views`,
        # `_suffix_back`, `_checked_out` over a bytearray): copy.deepcopy and pickle would copy
        # each view as an array of its own, and the copy would write new intervals where its
        # window no longer reads them and take input `update` refuses; copy.copy would share
        # the arrays with the original. Copies and pickles go through the state instead, which
        # rebuilds them (the round trip is exact).
        return type(self).from_state, (self.to_state(),)


# Python's sum() of floats: a plain left-to-right sum up to 3.11, Neumaier's compensated sum
# from 3.12 (gh-100425). `update` sums the window's totals with sum(); the batch replicates
# whichever this interpreter does.
_COMPENSATED_SUM = sum([1.0, 1e100, 1.0, -1e100]) != 0.0


def _sequential_sums(columns: np.ndarray, compensated: int) -> np.ndarray:
    """Sums over axis 1 of ``columns`` (m, n_bins, K), bin after bin as ``update`` adds them:
    ``((0.0 + c[0]) + c[1]) + ...`` (``gap += ...``), the first ``compensated`` rows as
    ``sum()`` adds a list of floats (left to right, or Neumaier's sum, see
    `_COMPENSATED_SUM`). Call inside ``np.errstate(all="ignore")`` (overflows are refused
    later, as ``update`` refuses them)."""
    acc = columns[:, 0] + 0.0  # sum() starts from int 0: 0 + -0.0 is 0.0
    if not (_COMPENSATED_SUM and compensated):
        for b in range(1, columns.shape[1]):
            acc += columns[:, b]
        return acc
    f = acc[:compensated]
    c = np.zeros_like(f)
    for b in range(1, columns.shape[1]):
        acc[compensated:] += columns[compensated:, b]
        x = columns[:compensated, b]
        t = f + x
        # CPython's builtin_sum: c += (f - t) + x if |f| >= |x| else (x - t) + f
        c += np.where(np.abs(f) >= np.abs(x), (f - t) + x, (x - t) + f)
        f[...] = t
    # "if (c && isfinite(c)) f += c": an inf or overflowed sum does not become NaN
    f[...] = np.where((c != 0.0) & np.isfinite(c), f + c, f)
    return acc


def _map(function: Callable[[float], float], values: np.ndarray) -> np.ndarray:
    """``function`` (a ``math`` one) on every value: numpy's exp, erfc and log10 may round
    differently from the C library's that ``update`` calls."""
    return np.fromiter(map(function, values.tolist()), _F64, values.shape[0])


def _chi2_sf_int_many(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``chi2_sf_int(x[i], k[i])`` for every ``i`` (``k >= 1``), bit for bit: the same IEEE
    operations in the same order (the Poisson-sum terms of ``chi2_sf_int``, one step of every
    element at a time, an element's steps ending at its own ``k``), ``exp`` and ``erfc`` from
    ``math``. Call inside ``np.errstate(all="ignore")``."""
    h = 0.5 * x
    exp_h = _map(_exp, -h)
    odd = (k % 2).astype(bool)
    # even k: term = total = exp(-h); odd k: root = sqrt(h), total = erfc(root), and for k > 1
    # total += term with term = exp(-h) * root * 2 / sqrt(pi)
    root = np.sqrt(h)
    erfc_root = _map(_erfc, root)
    odd_term = exp_h * root * _TWO_OVER_SQRT_PI
    term = np.where(odd, odd_term, exp_h)
    total = np.where(odd, np.where(k > 1, erfc_root + odd_term, erfc_root), exp_h)
    # then k // 2 - 1 steps: term *= h / divisor; total += term (divisors 1, 2, ... for an
    # even k, 1.5, 2.5, ... for an odd one)
    steps = k // 2 - 1
    for j in range(int(steps.max(initial=0))):
        active = j < steps
        term = np.where(active, term * (h / np.where(odd, j + 1.5, j + 1.0)), term)
        total = np.where(active, total + term, total)
    total = np.where(total < 1.0, total, 1.0)  # a NaN total gives 1.0, as in chi2_sf_int
    return np.where(x <= 0.0, 1.0, total)


def _checked_rows(
    counts: Any, prediction_sums: Any, outcome_sums: Any, size: int, n_bins: int
) -> list[tuple[Any, Any, Any]] | None:
    """The rows of a small batch, ``(counts[i], prediction_sums[i], outcome_sums[i])``, if
    ``size`` rows of ``n_bins`` numbers that ``update()`` takes on their own (``0 <= e <= n``
    and ``0 <= o <= n`` in every bin, a finite count); else None (``update_many``'s
    vectorised checks then name what is wrong)."""
    try:
        if not len(counts) == len(prediction_sums) == len(outcome_sums) == size:
            return None
        rows = list(zip(counts, prediction_sums, outcome_sums))  # noqa: B905 (lengths checked)
        for row in rows:
            if any(isinstance(seq, str | bytes) for seq in row):
                return None
            n, e, o = (_floats(seq) for seq in row)
            if not len(n) == len(e) == len(o) == n_bins or not sum(n) < _INF:
                return None
            for nb, eb, ob in zip(n, e, o):  # noqa: B905 (lengths checked)
                if not (0.0 <= eb <= nb and 0.0 <= ob <= nb):  # a NaN fails too
                    return None
    except (TypeError, ValueError):
        return None
    return rows


def _stacked(arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """``np.array(arrays)``, of float64 C-contiguous arrays (every array of a detector's
    window sums is one), five times faster: their bytes joined in one call."""
    try:
        return np.frombuffer(b"".join(arrays), dtype=_F64).reshape(shape)
    except (BufferError, TypeError, ValueError):  # not contiguous after all
        return np.array(arrays, dtype=_F64)


def _refuse(det: CalibrationDrift, row: np.ndarray, index: int) -> NoReturn:
    """Raise the error ``update`` raises for the interval ``row`` of batch row ``index``."""
    try:
        det._reject(*row)
    except ValueError as exc:
        raise ValueError(f"row {index}: {exc}") from None


def _update_rows(dets: list[CalibrationDrift], rows: np.ndarray, offset: int) -> None:
    """`_update_run`, or for a run under `_SMALL` rows update() one by one (cheaper there)."""
    if len(dets) >= _SMALL:
        _update_run(dets, rows, offset)
        return
    for i, (det, row) in enumerate(zip(dets, rows, strict=True)):
        try:
            det.update(*row)
        except ValueError as exc:  # only a window total that overflows
            raise ValueError(f"row {offset + i}: {exc}") from None


def _update_run(dets: list[CalibrationDrift], rows: np.ndarray, offset: int) -> None:
    """`CalibrationDrift.update_many` on distinct detectors, their intervals checked; rows
    ``offset`` onwards of the batch (for errors)."""
    size, _, n_bins = rows.shape
    zero = np.zeros((3, n_bins))
    olders: list[np.ndarray] = []
    fronts: list[np.ndarray] = []
    plans: list[tuple[int, int, int] | None] = []
    # Each detector takes its interval into its window as `update` does, up to the window's
    # sums; nothing visible changes before the commit below (the interval goes to a free
    # slot, a buffer move keeps the window's rows, the older block's sums are written only
    # when it is empty).
    for det, row in zip(dets, rows):  # noqa: B905 (one row per detector)
        w = det.window_intervals
        if w == 1:
            olders.append(zero)
            fronts.append(zero)
            plans.append(None)
            continue
        start = det._start
        end = det._end
        buffer = det._rows
        if end == 2 * w:  # the buffer is used up: move the window to its start
            buffer[: end - start] = buffer[start:end]
            det._end = end = end - start
            det._start = start = 0
        buffer[end] = row
        back = det._back
        front = det._front
        if end - start == w:  # the oldest interval leaves
            start += 1
            if back:
                back -= 1
            else:  # the newer block becomes the older one, less the interval leaving
                back = end - start
                _accumulate(buffer[start:end][::-1], 0, None, det._suffix_back)
                front = zero
        olders.append(det._suffix_views[-back] if back else zero)
        fronts.append(front)
        plans.append((start, end + 1, back))
    with np.errstate(all="ignore"):
        # update's ``new_front = front + row`` and ``total = older + new_front`` for all
        new_fronts = _stacked(fronts, rows.shape) + rows
        totals = _stacked(olders, rows.shape) + new_fronts
        # The statistics over bins, bins along axis 1 and detectors along axis 2: the window's
        # counts, prediction and outcome sums, then per bin |o - e|, v = e (1 - e / n) and
        # (o - e)^2 / v where v > 0 (0.0 elsewhere: adding 0.0 to these non-negative sums, as
        # to a bin that update() skips, changes nothing; an empty bin has e = o = 0).
        stats = np.empty((6, n_bins, size))
        stats[:3] = totals.transpose(1, 2, 0)
        tn, te, to = stats[0], stats[1], stats[2]
        d = to - te
        np.abs(d, out=stats[3])
        v = te * (1.0 - te / tn)  # NaN in an empty bin (0 / 0): not > 0
        valid = v > 0.0
        stats[4] = np.where(valid, v, 0.0)
        stats[5] = np.where(valid, d * d / v, 0.0)
        k = np.count_nonzero(valid, axis=0)
        count, e_total, o_total, gap, v_total, hl = _sequential_sums(stats, 3)
        refused = ~(count < _INF)  # the window's total count overflows
        if refused.any():
            j = int(np.flatnonzero(refused)[0])
            _refuse(dets[j], rows[j], offset + j)
        # `_evaluate`, vectorised
        ece = gap / count
        bias = (e_total - o_total) / count
        p_bias = _map(_erfc, np.abs((o_total - e_total) / np.sqrt(v_total)) / _SQRT2)
        p_hl = _chi2_sf_int_many(hl, k)
        p = 2.0 * np.where(p_bias < p_hl, p_bias, p_hl)
        p = np.where(k > 0, np.where(p < 1.0, p, 1.0), 1.0)
        score = np.where(p <= 0.0, _MAX_SCORE, -_map(_log10, np.where(p > 0.0, p, 1.0)))
        score = np.where(score < _MAX_SCORE, score, _MAX_SCORE)
    for i, (det, plan, front, c, ece_i, bias_i, p_i, score_i) in enumerate(
        zip(  # noqa: B905 (one of each per detector)
            dets,
            plans,
            new_fronts,
            count.tolist(),
            ece.tolist(),
            bias.tolist(),
            p.tolist(),
            score.tolist(),
        )
    ):
        if plan is None:
            det._window = [tuple(rows[i].tolist())]
        else:
            det._start, det._end, det._back = plan
            # into the detector's own array, in place now that nothing can be refused (a view
            # of the batch's array would keep all of it alive)
            det._front[...] = front
        det._count = round(c)
        in_alarm = det._in_alarm
        if c == 0.0:
            level = in_alarm
        else:
            det._ece = ece_i
            det._bias = bias_i
            det._p_value = p_i
            level = score_i > det._threshold or (in_alarm and score_i > det._clear_threshold)
        det._alarm = alarm = level and not in_alarm
        det._in_alarm = level
        if alarm:
            det._n_alarms += 1
