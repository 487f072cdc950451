"""Distribution-free CUSUM on sequential ranks: mean, variance and shape changes of a stream."""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort

from ._calibration import check_run_length, cusum_threshold
from ._edge import _EdgeAlarm

COMPONENTS = ("location", "scale", "skewness", "kurtosis")
_SQRT3 = math.sqrt(3.0)
_SQRT5 = math.sqrt(5.0)
_SQRT7 = math.sqrt(7.0)
_MAX_RHO = 0.95
_MASK64 = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, float]:
    """One step of SplitMix64 (Steele, Lea and Flood 2014): new state, uniform in [0, 1)."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return state, (z >> 11) / 9007199254740992.0


class RankCUSUM(_EdgeAlarm):
    """Calibrated change detector for a per-interval metric stream (mean, variance, shape).

    Each value ``x`` is turned into its *sequential rank* among the in-control values seen so far,
    ``u = (#{ref < x} + 1/2) / (n_ref + 1)``, with a seeded random position inside a block of
    tied values. Under no change (exchangeable values) sequential ranks are independent and
    uniform whatever the distribution of ``x`` (Barndorff-Nielsen 1963), so heavy tails, skew
    and discrete values cannot inflate false alarms. The first four
    orthonormal Legendre polynomials of ``u`` (Neyman's smooth-test components) measure a change
    of location (mean shift), scale (variance change), skewness and kurtosis (shape change with
    the same mean and variance, e.g. normal to bimodal). Each component feeds a two-sided CUSUM
    (Page 1954) with reference value ``k = shift / 2``.

    Autocorrelation: the lag-1 autocorrelation ``rho`` of each component is estimated on the
    in-control reference, and the component is pre-whitened, ``(s_t - rho s_{t-1}) /
    sqrt(1 - rho^2)``, so AR(1) noise does not look like drift (set ``autocorrelation=False`` to
    skip this on streams known to be independent).

    Calibration: the ``2 * len(components)`` one-sided CUSUMs share the false-alarm budget equally,
    each getting the run length ``expected_run_length * 2 * len(components)``; the common
    threshold ``h`` solves Siegmund's (1985) run-length approximation for that run length.

    The reference grows with every in-control value up to ``reference_size`` values, then stays
    fixed. Nothing accumulates during the first ``warmup`` values. After an alarm the detector
    restarts on the new regime: ``in_alarm`` stays True while it learns the new regime (``warmup``
    values) and clears afterwards, so one change gives one alarm.

    Parameters
    ----------
    expected_run_length
        Expected number of updates between false alarms on a stream with no change.
    shift
        Size of change, in standard deviations of a rank component, the CUSUMs are tuned to
        (``k = shift / 2``). A 1 sd normal mean shift moves the location component by 0.90, a
        0.5 sd shift by 0.48, a variance doubling moves the scale component by 0.44.
    components
        Which rank components to monitor, any of ``"location"``, ``"scale"``, ``"skewness"``,
        ``"kurtosis"``.
    reference_size
        Maximum number of in-control values kept as the reference.
    warmup
        Values collected (after the start and after each alarm) before the CUSUMs accumulate.
    autocorrelation
        Pre-whiten each component with its lag-1 autocorrelation estimated on the reference.
    seed
        Seed of the generator that breaks ties among equal values (randomised ranks keep the
        calibration on discrete data); the same seed and data give the same alarms.

    Examples
    --------
    >>> import numpy as np
    >>> from armguard.detectors import RankCUSUM
    >>> rng = np.random.default_rng(42)
    >>> x = np.concatenate([rng.normal(0, 1, 300), rng.normal(1, 1, 100)])  # +1 sd from 300
    >>> det = RankCUSUM(expected_run_length=10_000)
    >>> for i, xi in enumerate(x):
    ...     det.update(float(xi))
    ...     if det.alarm:
    ...         print(i, det.component, round(det.score, 2), round(det.threshold, 2))
    321 location+ 17.37 17.26
    >>> det.n_alarms, det.in_alarm
    (1, False)

    References
    ----------
    Page, E. S. (1954). Continuous inspection schemes. Biometrika 41(1/2), 100-115.
    Neyman, J. (1937). "Smooth" test for goodness of fit. Skandinavisk Aktuarietidskrift 20, 149-199.
    Barndorff-Nielsen, O. (1963). On the limit behaviour of extreme order statistics. Annals of
    Mathematical Statistics 34, 992-1002 (independence of sequential ranks).
    McDonald, D. (1990). A CUSUM procedure based on sequential ranks. Naval Research Logistics 37,
    627-646.
    Siegmund, D. (1985). Sequential Analysis: Tests and Confidence Intervals. Springer, p. 27.
    Brockwell, A. E. (2007). Universal residuals: a multivariate transformation. Statistics &
    Probability Letters 77(14), 1473-1478 (randomised probability integral transform).
    """

    def __init__(
        self,
        *,
        expected_run_length: float = 10_000.0,
        shift: float = 0.5,
        components: tuple[str, ...] | list[str] = COMPONENTS,
        reference_size: int = 1000,
        warmup: int = 30,
        autocorrelation: bool = True,
        seed: int = 0,
    ):
        self.expected_run_length = check_run_length(expected_run_length)
        if isinstance(shift, bool) or not isinstance(shift, int | float) or not 0 < shift < 4:
            raise ValueError(f"shift must be a number in (0, 4), got {shift!r}")
        self.shift = float(shift)
        components = tuple(components)
        bad = [c for c in components if c not in COMPONENTS]
        if not components or bad or len(set(components)) != len(components):
            raise ValueError(
                f"components must be distinct names among {COMPONENTS}, got {components!r}"
            )
        self.components = components
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 10:
            raise ValueError(f"warmup must be an int >= 10, got {warmup!r}")
        self.warmup = warmup
        if (
            isinstance(reference_size, bool)
            or not isinstance(reference_size, int)
            or reference_size < warmup
        ):
            raise ValueError(
                f"reference_size must be an int >= warmup ({warmup}), got {reference_size!r}"
            )
        self.reference_size = reference_size
        if not isinstance(autocorrelation, bool):
            raise ValueError(f"autocorrelation must be True or False, got {autocorrelation!r}")
        self.autocorrelation = autocorrelation
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        self.seed = seed
        self._rng_state = seed

        self._index = tuple(COMPONENTS.index(c) for c in components)
        self._k = self.shift / 2.0
        self._h = cusum_threshold(self.expected_run_length * 2 * len(components), self._k)
        self._component: str | None = None
        self._restart()

    def _restart(self) -> None:
        m = len(self.components)
        self._ref: list[float] = []
        self._n = 0  # values seen since the (re)start
        self._prev = [0.0] * m  # previous raw component scores
        self._sxx = [0.0] * m  # sums of s_t^2 and s_t * s_{t-1} over the reference
        self._sxy = [0.0] * m
        self._rho = [0.0] * m
        self._up = [0.0] * m
        self._down = [0.0] * m

    def update(self, x: float) -> None:
        """Feed one value of the stream (e.g. one interval's mean, rate or quantile)."""
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"x must be finite, got {x!r}")
        ref = self._ref
        n_ref = len(ref)
        lo = bisect_left(ref, x)
        hi = bisect_right(ref, x, lo)
        if hi == lo:
            u = (lo + 0.5) / (n_ref + 1)
        else:
            # Ties (discrete data: counts, rates that are often 0): a mid-rank is not uniform,
            # a randomised rank within the tied block is (randomised probability integral
            # transform), so a stream of repeated values cannot fake a scale or shape change.
            self._rng_state, w = _splitmix64(self._rng_state)
            u = (lo + (hi - lo + 1) * w) / (n_ref + 1)
        v = 2.0 * u - 1.0
        v2 = v * v
        scores = (
            _SQRT3 * v,
            _SQRT5 * (1.5 * v2 - 0.5),
            _SQRT7 * v * (2.5 * v2 - 1.5),
            3.0 * ((35.0 * v2 - 30.0) * v2 + 3.0) / 8.0,
        )
        learning = n_ref < self.reference_size
        if learning:
            insort(ref, x)
        self._n += 1
        k = self._k
        h = self._h
        worst = 0.0
        which = None
        for j, idx in enumerate(self._index):
            s = scores[idx]
            prev = self._prev[j]
            if learning and self._n > 1:
                self._sxx[j] += prev * prev
                self._sxy[j] += s * prev
                if self.autocorrelation:
                    rho = self._sxy[j] / self._sxx[j] if self._sxx[j] > 0.0 else 0.0
                    self._rho[j] = min(_MAX_RHO, max(-_MAX_RHO, rho))
            self._prev[j] = s
            if self._n <= self.warmup:
                continue
            rho = self._rho[j]
            e = (s - rho * prev) / math.sqrt(1.0 - rho * rho)
            up = self._up[j] + e - k
            up = up if up > 0.0 else 0.0
            down = self._down[j] - e - k
            down = down if down > 0.0 else 0.0
            self._up[j] = up
            self._down[j] = down
            if up > worst:
                worst, which = up, self.components[j] + "+"
            if down > worst:
                worst, which = down, self.components[j] + "-"
        self._score = worst
        if worst > h:
            self._component = which
            self._set_level(True)
            self._restart()
        else:
            # After an alarm the level holds while the restarted detector learns the new regime.
            self._set_level(self._in_alarm and self._n <= self.warmup)

    _score: float = 0.0

    @property
    def score(self) -> float:
        """Largest of the CUSUM statistics at this update (alarm when it exceeds ``threshold``)."""
        return self._score

    @property
    def threshold(self) -> float:
        """CUSUM threshold ``h`` derived from ``expected_run_length``."""
        return self._h

    @property
    def component(self) -> str | None:
        """Component and direction of the last alarm, e.g. ``"location+"`` or ``"scale-"``."""
        return self._component

    def to_dict(self) -> dict:
        """Current result as a JSON-safe dict (for metrics and decision records)."""
        return {
            "alarm": self._alarm,
            "in_alarm": self._in_alarm,
            "score": self._score,
            "threshold": self._h,
            "component": self._component,
            "n_alarms": self._n_alarms,
        }

    def to_state(self) -> dict:
        """JSON-serialisable state; ``from_state`` rebuilds an identical detector."""
        return {
            "params": {
                "expected_run_length": self.expected_run_length,
                "shift": self.shift,
                "components": list(self.components),
                "reference_size": self.reference_size,
                "warmup": self.warmup,
                "autocorrelation": self.autocorrelation,
                "seed": self.seed,
            },
            "ref": list(self._ref),
            "n": self._n,
            "prev": list(self._prev),
            "sxx": list(self._sxx),
            "sxy": list(self._sxy),
            "rho": list(self._rho),
            "up": list(self._up),
            "down": list(self._down),
            "score": self._score,
            "component": self._component,
            "rng_state": format(self._rng_state, "016x"),
            **self._edge_state(),
        }

    @classmethod
    def from_state(cls, state: dict) -> RankCUSUM:
        """Rebuild a detector from ``to_state()``."""
        det = cls(**state["params"])
        det._ref = [float(v) for v in state["ref"]]
        det._n = int(state["n"])
        m = len(det.components)
        for name in ("prev", "sxx", "sxy", "rho", "up", "down"):
            values = [float(v) for v in state[name]]
            if len(values) != m:  # else the next update raised IndexError
                raise ValueError(f"{name} must hold one number per component ({m})")
            setattr(det, "_" + name, values)
        det._score = float(state["score"])
        det._component = state["component"]
        det._rng_state = int(state["rng_state"], 16)
        det._load_edge_state(state)
        return det
