"""Distribution drift of a treatment arm against control over the same period."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._histogram_batch import _SMALL, batch_distances, detector_distances, evaluate_many
from .histogram_distance import _decide_many, _HistogramDrift, align
from .summary import Summary


class TwoSampleDrift(_HistogramDrift):
    """Calibrated drift of a feature or prediction: treatment histogram against control.

    Each ``update(treatment, control)`` compares the two arms' histograms of the same period (the
    daemon chooses the period: the last interval, a rolling window or the experiment so far) with
    the sample-size-corrected distances of
    :func:`~armguard.detectors.histogram_distance.histogram_distances` (PSI, Jensen-Shannon, KS on
    the binned CDFs, Wasserstein-1) and alarms on the one named by ``distance``.

    Calibration: the threshold makes the per-evaluation false-alarm probability
    ``alpha = 1 / expected_run_length`` (chi-square limit for PSI/JS, Kolmogorov limit for KS, a
    Gaussian concentration bound for Wasserstein). Since an onset needs the score above the
    threshold, the expected number of false alarm onsets in ``N`` evaluations is at most
    ``N / expected_run_length`` however the evaluations depend on each other (a union bound, valid
    when looking after every interval forever). The alarm clears when the score falls to
    ``clear_fraction * threshold`` or below (hysteresis), so one drift raises one alarm.

    Parameters
    ----------
    expected_run_length
        Expected number of evaluations between false alarms when the arms do not differ.
    distance
        The distance that decides: ``"psi"``, ``"js"``, ``"ks"`` or ``"wasserstein"``.
    max_bins
        At most this many merged bins for PSI and JS.
    min_expected
        Each merged bin expects at least this many values in the smaller arm.
    clear_fraction
        An alarm clears when ``score <= clear_fraction * threshold``.
    min_effect
        Smallest corrected distance worth an alarm (0 = any statistically significant drift);
        the threshold is the larger of this and the calibrated one. Useful on large windows,
        where a real but negligible difference is significant (e.g. 0.1 for PSI, 0.05 for KS).

    Examples
    --------
    >>> import numpy as np
    >>> from armguard.detectors import Summary, TwoSampleDrift
    >>> rng = np.random.default_rng(42)
    >>> det = TwoSampleDrift(expected_run_length=10_000, distance="psi")
    >>> control = Summary.from_values(rng.lognormal(0.0, 1.0, 4_000))
    >>> det.update(Summary.from_values(rng.lognormal(0.0, 1.0, 4_000)), control)
    >>> det.alarm, round(det.score, 4), round(det.threshold, 4)
    (False, -0.0022, 0.0156)
    >>> det.update(Summary.from_values(rng.lognormal(0.15, 1.0, 4_000)), control)
    >>> det.alarm, round(det.score, 4)
    (True, 0.0193)

    References
    ----------
    Yurdakul, B. (2018). Statistical properties of population stability index. PhD thesis,
    Western Michigan University (PSI is asymptotically a scaled chi-square).
    Lin, J. (1991). Divergence measures based on the Shannon entropy. IEEE Trans. Information
    Theory 37(1), 145-151.
    del Barrio, E., Gine, E. and Matran, C. (1999). Central limit theorems for the Wasserstein
    distance between the empirical and the true distributions. Annals of Probability 27(2),
    1009-1071.
    """

    def __init__(
        self,
        *,
        expected_run_length: float = 10_000.0,
        distance: str = "psi",
        max_bins: int = 20,
        min_expected: float = 5.0,
        clear_fraction: float = 0.5,
        min_effect: float = 0.0,
    ):
        self._init_drift(
            expected_run_length, distance, max_bins, min_expected, clear_fraction, min_effect
        )

    def update(self, treatment: Any, control: Any) -> None:
        """Compare ``treatment`` with ``control``: Summaries, LogHistograms or bins tuples.

        If either is empty nothing is evaluated and the alarm level is kept.
        """
        pair = align(treatment, control)
        if not pair.n or not pair.m:
            self._hold()
            return
        self._evaluate(pair)

    @classmethod
    def update_many(
        cls,
        detectors: Sequence[TwoSampleDrift],
        pairs: Sequence[tuple[Any, Any]],
        *,
        all_distances: bool = False,
    ) -> None:
        """``detectors[i].update(*pairs[i])`` for every ``i``, in one vectorised pass.

        The distances of all pairs are computed together (a fixed number of numpy calls on one
        flat layout of every pair's buckets, see ``detectors/_histogram_batch.py``), then each
        detector moves its alarm in list order, so a detector listed twice sees its updates in
        order. Each detector keeps its own parameters. The result equals updating one by one up
        to rounding (about 1e-15 relative: ``np.log`` against ``math.log``, sequential sums
        against ``np.dot``); a pair's result does not depend on the rest of the batch, bit for
        bit, so any batching of the same updates gives the same scores and alarms.

        Only the decision distance is computed, so ``distances`` then holds that one (fewer
        than eight PSI or KS pairs are evaluated one by one, and keep their pair to compute the
        other three when read); with ``all_distances=True`` the other three are computed too,
        without thresholds, at several times the cost.

        Parameters
        ----------
        detectors
            The detectors to update.
        pairs
            ``(treatment, control)`` per detector: Summaries, LogHistograms or bins tuples.
            Histograms of one relative accuracy are batched; others are evaluated singly.
        all_distances
            Also compute the three diagnostic distances.

        Examples
        --------
        >>> import numpy as np
        >>> from armguard.detectors import Summary, TwoSampleDrift
        >>> rng = np.random.default_rng(42)
        >>> dets = [TwoSampleDrift(distance="psi") for _ in range(3)]
        >>> pairs = [(Summary.from_values(rng.lognormal(mu, 1.0, 4_000)),
        ...           Summary.from_values(rng.lognormal(0.0, 1.0, 4_000)))
        ...          for mu in (0.0, 0.0, 0.2)]
        >>> TwoSampleDrift.update_many(dets, pairs)
        >>> [(d.alarm, round(d.score, 4)) for d in dets]
        [(False, -0.0022), (False, -0.0015), (True, 0.0616)]
        """
        detectors = list(detectors)
        pairs = list(pairs)
        if not all_distances and _SMALL <= len(detectors) == len(pairs):
            hists = _summary_histograms(pairs)
            if hists is not None:
                _decide_batch(detectors, hists)
                return
        results = evaluate_many(detectors, pairs, all_distances)
        for det, res in zip(detectors, results, strict=True):
            if res is None:
                det._hold()
                continue
            score, threshold, distances, pair = res
            det._decide(score, threshold)
            if distances is not None:
                det._distances = distances
            det._pair = pair

    def to_state(self) -> dict:
        """JSON-serialisable state; ``from_state`` rebuilds an identical detector."""
        return {"params": self._params(), **self._result_state()}

    @classmethod
    def from_state(cls, state: dict) -> TwoSampleDrift:
        """Rebuild a detector from ``to_state()``."""
        det = cls(**state["params"])
        det._load_result_state(state)
        return det


def _summary_histograms(pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]] | None:
    """The LogHistograms of pairs of Summaries of one relative accuracy each (the daemon's
    input), or None if any pair is something else (``evaluate_many`` sorts those out)."""
    hists = []
    for t, c in pairs:
        if type(t) is not Summary or type(c) is not Summary:
            return None
        ht = t.histogram
        hc = c.histogram
        if ht.relative_accuracy != hc.relative_accuracy:
            return None
        hists.append((ht, hc))
    return hists


def _decide_batch(detectors: list[TwoSampleDrift], hists: list[tuple[Any, Any]]) -> None:
    """``update_many``'s usual batch: the distances ``evaluate_many`` computes for the same
    pairs (bit for bit: the same call), then each detector decides in list order
    (``_decide_many``)."""
    _decide_many(detectors, *detector_distances(batch_distances, hists, detectors, False))
