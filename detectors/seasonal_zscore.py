"""Robust seasonal z-score: spikes and level shifts in per-interval metric series."""

from __future__ import annotations

import math
from functools import lru_cache

from ._calibration import check_run_length, cusum_threshold, normal_isf
from ._edge import _EdgeAlarm

_MAX_PHI = 0.95
_isfinite = math.isfinite
_floor = math.floor
_sqrt = math.sqrt
_copysign = math.copysign
_log = math.log
_TAIL_RATE = 0.001  # exceedance rate of |z| > clip: about 1,000 updates of memory
_BAND = 2.0  # moderate exceedances: clip < |z| <= _BAND * clip
_HILL_RATE = 0.02  # log-excess mean: about 50 exceedances of memory
# Robust Hill mean (see the class docstring): the normal log excess counts as _HILL_PRIOR
# exceedances, and log excesses are winsorised at _HILL_WINSOR Hill means (the 99% point of an
# exponential law), E[min(Y, L g)] = g (1 - e^-L) for Y exponential with mean g.
_HILL_PRIOR = 3.0
_HILL_WINSOR = math.log(100.0)
_HILL_CONSISTENCY = 1.0 / (1.0 - math.exp(-_HILL_WINSOR))


@lru_cache(maxsize=16)
def _normal_log_excess(c: float) -> float:
    """E[log(|Z| / c) | |Z| > c] for standard normal Z (Hill statistic of a normal tail)."""
    step = 1e-3
    num = den = 0.0
    x = c + 0.5 * step
    while x < c + 12.0:
        dens = math.exp(-0.5 * x * x)
        num += math.log(x / c) * dens
        den += dens
        x += step
    return num / den


def _clipped_second_moment(c: float) -> float:
    """E[min(Z^2, c^2)] for standard normal Z (consistency factor of the clipped scale)."""
    pdf = math.exp(-0.5 * c * c) / math.sqrt(2.0 * math.pi)
    tail = 0.5 * math.erfc(c / math.sqrt(2.0))
    return (1.0 - 2.0 * tail) - 2.0 * c * pdf + 2.0 * c * c * tail


class SeasonalZScore(_EdgeAlarm):
    """Calibrated anomaly detector for a per-interval series (request rate, error rate, p99).

    The series is modelled as ``x_t = level_t + season(t) + r_t`` where ``season`` is a daily (or
    any ``period_s``) profile on ``season_bins`` knots, linearly interpolated in event time ``t``,
    and ``r_t`` is AR(1) noise. Each update forms the one-step innovation
    ``e_t = r_t - phi * r_{t-1}`` and its robust z-score ``z_t = e_t / sigma``. All estimates are
    robust (Huber-type): an observation enters the level, the season, ``phi`` and ``sigma`` only
    through its residual clipped at ``clip`` sigmas, so a spike barely moves them, and ``sigma``
    is a clipped root-mean-square made consistent for normal noise (a smooth MAD-like scale that
    costs O(1) per update, unlike a rolling median).

    Two conditions raise an alarm:

    * a **spike**: ``|z_t|`` above ``threshold``;
    * a **level shift**: a two-sided CUSUM of the clipped ``z_t`` (reference ``k = shift / 2``)
      above ``cusum_threshold``. On detection the level jumps to the new value so the detector
      follows the new regime instead of alarming forever.

    Calibration: the false-alarm budget ``1 / expected_run_length`` per update is split half to
    the spike test and half to the two one-sided CUSUMs (Siegmund's run-length approximation).
    The spike threshold is the two-sided normal quantile, unless the innovations turn out
    heavier-tailed than normal: then it extrapolates a Pareto tail fitted beyond ``clip`` to
    the spike budget, ``clip * (q / budget) ** gamma`` (Weissman 1978), so heavy-tailed noise
    does not spend the budget. ``q`` is the rate of ``|z| > clip`` and ``gamma`` a Hill mean of
    the log excesses ``log(|z| / clip)``, both over non-spike updates from the second half of
    the warmup on. Both are made robust to a few outliers, which would otherwise pass for a
    heavy tail (the Hill estimator is a mean: one 15-sigma value among three exceedances
    doubles it, and the threshold, exponential in ``gamma``, then blinds the detector for days;
    Brazauskas and Serfling 2000, Bhattacharya et al. 2019):

    * the tail counts as heavy only if ``q`` is over twice the normal rate *and* so is the rate
      of moderate exceedances, ``clip < |z| <= 2 clip``. A Pareto tail raises both; outliers,
      however many and however far out, only the first (normal noise passes ``2 clip`` about
      once in 500 million updates at ``clip = 3``);
    * each log excess is winsorised at ``log(100)`` times the current Hill mean (the 99% point
      of the fitted exponential law of log excesses; the mean is divided by 0.99 to stay
      consistent for a Pareto tail), so one exceedance, however large, moves it by a bounded
      factor;
    * the normal log excess enters the Hill mean as 3 prior exceedances, so the first few
      exceedances cannot set it alone; a real heavy tail, which brings many, soon outweighs it;
    * during the warmup, where nothing is flagged, an innovation beyond the current spike
      threshold is treated as an additive outlier (Fox 1972): it does not echo into the next
      AR prediction, where its echo would count as a second exceedance.

    A sustained heavy tail still lifts the threshold (Student t(3) noise keeps its false alarms
    near the budget); a couple of warmup spikes leave it at the normal quantile. No alarm is
    raised before ``warmup_s`` seconds of event time, while the seasonal profile is learned. An
    incident (spike or shift) is one alarm; ``in_alarm`` clears after ``clear_after``
    consecutive normal updates.

    Parameters
    ----------
    expected_run_length
        Expected number of updates between false alarms on a series with no anomaly.
    period_s
        Length of the seasonal cycle in seconds of event time (86400 for daily).
    season_bins
        Number of knots of the seasonal profile (0 disables seasonality).
    level_rate
        Smoothing rate of the level per update (an exponential moving average of clipped
        residuals).
    season_rate
        Smoothing rate of a seasonal knot per visit (after a running mean over its first visits).
    scale_rate
        Smoothing rate of the robust scale and of the AR(1) coefficient.
    shift
        Level shift, in innovation standard deviations, the CUSUM is tuned to.
    clip
        Residuals are clipped at ``clip`` sigmas before they update any estimate.
    warmup_s
        Event time (seconds since the first update) before alarms are allowed.
    clear_after
        Consecutive normal updates that end an incident.
    min_scale
        Floor on ``sigma`` in the units of ``x`` (0 = none). Sparse counts (mostly 0, now and
        then 1) have a robust scale near 0 and every event looks like a spike; set it to the
        smallest change worth a z of 1 (e.g. 1.0 for counts), or watch such series with
        :class:`RankCUSUM`, which handles ties.

    Examples
    --------
    >>> import numpy as np
    >>> from armguard.detectors import SeasonalZScore
    >>> rng = np.random.default_rng(42)
    >>> t = np.arange(4 * 288) * 300.0                 # 4 days of 5-minute intervals
    >>> x = 100 + 20 * np.sin(2 * np.pi * t / 86400) + rng.normal(0, 2, t.size)
    >>> x[700] += 30                                   # a spike on day 3
    >>> x[900:] += 6                                   # a 3 sd level shift on day 4
    >>> det = SeasonalZScore(expected_run_length=10_000, warmup_s=2 * 86400)
    >>> for xi, ti in zip(x.tolist(), t.tolist()):
    ...     det.update(xi, ti)
    ...     if det.alarm:
    ...         print(int(ti // 300), det.kind, round(det.score, 1))
    700 spike 13.5
    903 level_shift 2.9

    References
    ----------
    Huber, P. J. (1964). Robust estimation of a location parameter. Annals of Mathematical
    Statistics 35(1), 73-101.
    Rousseeuw, P. J. and Croux, C. (1993). Alternatives to the median absolute deviation. JASA 88,
    1273-1283.
    Page, E. S. (1954). Continuous inspection schemes. Biometrika 41(1/2), 100-115.
    Cleveland, R. B. et al. (1990). STL: a seasonal-trend decomposition procedure based on loess.
    Journal of Official Statistics 6(1), 3-73.
    Hill, B. M. (1975). A simple general approach to inference about the tail of a distribution.
    Annals of Statistics 3(5), 1163-1174.
    Weissman, I. (1978). Estimation of parameters and large quantiles based on the k largest
    observations. JASA 73(364), 812-815.
    Brazauskas, V. and Serfling, R. (2000). Robust and efficient estimation of the tail index of a
    single-parameter Pareto distribution. North American Actuarial Journal 4(4), 12-27.
    Bhattacharya, S., Kallitsis, M. and Stoev, S. (2019). Data-adaptive trimming of the Hill
    estimator and detection of outliers in the extremes of heavy-tailed data. Electronic Journal
    of Statistics 13(1), 1872-1925.
    Fox, A. J. (1972). Outliers in time series. JRSS B 34(3), 350-363.
    """

    def __init__(
        self,
        *,
        expected_run_length: float = 10_000.0,
        period_s: float = 86_400.0,
        season_bins: int = 24,
        level_rate: float = 0.02,
        season_rate: float = 0.1,
        scale_rate: float = 0.01,
        shift: float = 2.0,
        clip: float = 3.0,
        warmup_s: float = 2 * 86_400.0,
        clear_after: int = 2,
        min_scale: float = 0.0,
    ):
        self.expected_run_length = check_run_length(expected_run_length)
        for name, value, lo, hi in (
            ("period_s", period_s, 0.0, math.inf),
            ("level_rate", level_rate, 0.0, 1.0),
            ("season_rate", season_rate, 0.0, 1.0),
            ("scale_rate", scale_rate, 0.0, 1.0),
            ("shift", shift, 0.0, 20.0),
            ("clip", clip, 1.0, 20.0),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not lo < value <= hi
                or not math.isfinite(value)
            ):
                raise ValueError(f"{name} must be a finite number in ({lo}, {hi}], got {value!r}")
        if (
            isinstance(warmup_s, bool)
            or not isinstance(warmup_s, int | float)
            or not 0 <= warmup_s < math.inf
        ):
            raise ValueError(f"warmup_s must be a finite number >= 0, got {warmup_s!r}")
        for name, value, lo in (("season_bins", season_bins, 0), ("clear_after", clear_after, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if season_bins == 1:
            raise ValueError("season_bins must be 0 (no seasonality) or >= 2, got 1")
        self.period_s = float(period_s)
        self.season_bins = season_bins
        self.level_rate = float(level_rate)
        self.season_rate = float(season_rate)
        self.scale_rate = float(scale_rate)
        self.shift = float(shift)
        self.clip = float(clip)
        self.warmup_s = float(warmup_s)
        self.clear_after = clear_after
        if (
            isinstance(min_scale, bool)
            or not isinstance(min_scale, int | float)
            or not 0 <= min_scale < math.inf
        ):
            raise ValueError(f"min_scale must be a finite number >= 0, got {min_scale!r}")
        self.min_scale = float(min_scale)

        alpha = 1.0 / self.expected_run_length
        self._alpha_spike = alpha / 2.0  # half the budget, two-sided
        self._z_normal = normal_isf(alpha / 4.0)
        self._p0 = math.erfc(self.clip / math.sqrt(2.0))  # P(|Z| > clip) for normal noise
        self._hill0 = _normal_log_excess(self.clip)
        self._k = self.shift / 2.0
        self._h = cusum_threshold(4.0 * self.expected_run_length, self._k)
        self._kappa = _clipped_second_moment(self.clip)
        # Products `update` would otherwise form on every call (the same floats).
        self._tail_trigger = 2.0 * self._p0
        self._band_trigger = 2.0 * (self._p0 - math.erfc(_BAND * self.clip / math.sqrt(2.0)))
        self._half_h = 0.5 * self._h
        self._half_warmup_s = 0.5 * self.warmup_s
        self._clip2 = self.clip * self.clip
        self._min_var = self.min_scale * self.min_scale

        self._n = 0
        self._t0: float | None = None
        self._level = 0.0
        self._season = [0.0] * season_bins
        self._visits = [0.0] * season_bins
        self._var = 0.0  # robust variance of the innovations
        self._c0 = 0.0  # running E[r_t^2] and E[r_t r_{t-1}] of clean residuals
        self._c1 = 0.0
        self._phi = 0.0
        self._prev = 0.0  # previous clean residual
        self._up = 0.0
        self._down = 0.0
        self._calm = 0  # consecutive normal updates during an incident
        self._z = 0.0
        self._kind: str | None = None
        self._n_spikes = 0
        self._n_level_shifts = 0
        # Tail of |z| beyond `clip`: exceedance rate and Hill (log-excess) mean, from normal priors.
        self._q = self._p0
        self._q_band = self._band_trigger / 2.0
        self._hill = self._hill0
        self._n_tail = 0
        self._n_exceed = 0

    def update(self, x: float, t: float) -> None:
        """Feed one interval's value ``x`` observed at event time ``t`` (seconds)."""
        # One flat function with the state in locals: on this O(1) update Python's call and
        # attribute overheads were half the cost. min/max are written as comparisons that pick
        # the same operand the builtins would, so every number is as before, bit for bit.
        x = float(x)
        t = float(t)
        if not (_isfinite(x) and _isfinite(t)):
            raise ValueError(f"x and t must be finite, got x={x!r}, t={t!r}")
        t0 = self._t0
        if t0 is None:
            t0 = self._t0 = t
            self._level = x
        n = self._n = self._n + 1
        level = self._level
        nb = self.season_bins
        if nb:
            period = self.period_s
            pos = (t % period) / period * nb - 0.5
            fl = _floor(pos)
            w = pos - fl
            b0 = fl % nb
            b1 = (b0 + 1) % nb
            season = self._season
            seas = (1.0 - w) * season[b0] + w * season[b1]
            r = x - level - seas
        else:
            r = x - level - 0.0
        prev = self._prev
        pred = self._phi * prev
        e = r - pred
        var = self._var
        sigma = _sqrt(var)
        min_scale = self.min_scale
        if sigma < min_scale and n > 10:
            sigma = min_scale
        clip = self.clip
        if sigma > 0.0:
            z = e / sigma
            zc = z if -clip <= z <= clip else _copysign(clip, z)
        else:
            z = zc = 0.0
        self._z = z
        armed = t - t0 >= self.warmup_s and sigma > 0.0
        spike = shifted = suspicious = outlier = False
        if armed:
            q = self._q
            if q <= self._tail_trigger or self._q_band <= self._band_trigger:
                threshold = self._z_normal  # the spike threshold (`_z_threshold`)
            else:
                threshold = self.clip * (q / self._alpha_spike) ** self._hill
                if not threshold > self._z_normal:
                    threshold = self._z_normal
            spike = abs(z) > threshold
            k = self._k
            h = self._h
            up = self._up + zc - k
            up = up if up > 0.0 else 0.0
            down = self._down - zc - k
            down = down if down > 0.0 else 0.0
            if up > h or down > h:
                shifted = True
                # Follow the new regime: the level takes the current residual.
                self._level = level + r
                self._prev = 0.0
                up = down = 0.0
            self._up = up
            self._down = down
            # While a shift is suspected the estimates stay put, or they would absorb the very
            # shift the CUSUM is accumulating evidence for.
            suspicious = up > self._half_h or down > self._half_h
        elif (z > clip or z < -clip) and sigma > 0.0:
            # Nothing is flagged during the warmup, but an innovation beyond the threshold is an
            # additive outlier all the same: it must not echo into the next prediction, where
            # its echo would feed the tail estimate a second exceedance.
            outlier = abs(z) > self._z_threshold
        if not (shifted or suspicious):
            # Move the robust estimates with the clipped innovation (the raw one while
            # starting).
            started = sigma > 0.0 and n > 10
            e_clean = zc * sigma if started else e
            r_clean = pred + e_clean
            inv_n = 1.0 / n
            rate = self.scale_rate
            if inv_n > rate:
                rate = inv_n
            if started:
                floor = self._min_var
                if not floor > var:
                    floor = var
                e2 = e * e
                cap = self._clip2 * floor
                self._var = var + rate * ((cap if cap < e2 else e2) / self._kappa - var)
            else:
                self._var = var + rate * (e * e - var)
            c0 = self._c0 = self._c0 + rate * (r_clean * r_clean - self._c0)
            c1 = self._c1 = self._c1 + rate * (r_clean * prev - self._c1)
            if c0 > 0.0:
                phi = c1 / c0
                phi = phi if phi > 0.0 else 0.0
                self._phi = phi if phi < _MAX_PHI else _MAX_PHI
            level_step = self.level_rate
            if inv_n > level_step:
                level_step = inv_n
            self._level = level + level_step * r_clean
            if nb:
                # What the level did not absorb goes to the two knots around t (a weighted
                # running mean over a knot's first visits, an exponential average afterwards).
                rest = (1.0 - level_step) * r_clean
                visits = self._visits
                season_rate = self.season_rate
                wb = 1.0 - w
                if wb > 0.0:
                    seen = visits[b0] = visits[b0] + wb
                    g = season_rate * wb
                    gv = wb / seen
                    season[b0] += (gv if gv > g else g) * rest
                if w > 0.0:
                    seen = visits[b1] = visits[b1] + w
                    g = season_rate * w
                    gv = w / seen
                    season[b1] += (gv if gv > g else g) * rest
            # A large innovation that is not a spike is part of the noise: an AR(1) series
            # echoes it, so the next prediction uses it unclipped (a spike is an additive
            # outlier and does not echo: its clipped value stays).
            self._prev = r_clean if (spike or outlier) else r
            if sigma > 0.0 and not spike and t - t0 >= self._half_warmup_s:
                # Learn how heavy the tail of the innovations is (spikes excluded), from the
                # second half of the warmup on: running means first (the Hill mean after its
                # prior exceedances), then exponential ones. The rate of moderate exceedances
                # (up to _BAND clips) ignores outliers however far out; the Hill mean winsorises
                # them: a few outliers cannot pass for a heavy tail.
                az = abs(z)
                exceed = az > clip
                n_tail = self._n_tail = self._n_tail + 1
                step = 1.0 / n_tail
                if not step > _TAIL_RATE:
                    step = _TAIL_RATE
                self._q += step * (exceed - self._q)
                self._q_band += step * ((exceed and az <= _BAND * clip) - self._q_band)
                if exceed:
                    n_exceed = self._n_exceed = self._n_exceed + 1
                    step = 1.0 / (n_exceed + _HILL_PRIOR)
                    if not step > _HILL_RATE:
                        step = _HILL_RATE
                    hill = self._hill
                    y = _log(az / clip)
                    cap = _HILL_WINSOR * hill
                    if y > cap:
                        y = cap
                    self._hill = hill + step * (y * _HILL_CONSISTENCY - hill)
        elif suspicious:
            self._prev = pred + (zc * sigma)
        if spike or shifted:
            if spike:
                self._n_spikes += 1
            if shifted:
                self._n_level_shifts += 1
            if not self._in_alarm:
                self._kind = "level_shift" if shifted else "spike"
            elif shifted:
                self._kind = "level_shift"
            self._calm = 0
            self._set_level(True)
        elif self._in_alarm:
            self._calm += 1
            self._set_level(self._calm < self.clear_after)
        else:
            self._set_level(False)

    @property
    def score(self) -> float:
        """Absolute robust z-score of this update's innovation."""
        return abs(self._z)

    @property
    def _z_threshold(self) -> float:
        # Normal quantile unless the innovations show a heavier tail than normal noise would
        # (exceedance rates beyond `clip`, and between `clip` and _BAND clips, over twice the
        # normal ones): then extrapolate the tail with a Pareto fit (Hill 1975, Weissman 1978)
        # to the per-update spike budget, never below normal.
        if self._q <= self._tail_trigger or self._q_band <= self._band_trigger:
            return self._z_normal
        return max(self._z_normal, self.clip * (self._q / self._alpha_spike) ** self._hill)

    @property
    def threshold(self) -> float:
        """Spike threshold on ``score`` derived from ``expected_run_length``."""
        return self._z_threshold

    @property
    def cusum_score(self) -> float:
        """Larger of the two level-shift CUSUM statistics."""
        return max(self._up, self._down)

    @property
    def cusum_threshold(self) -> float:
        """Level-shift threshold on ``cusum_score`` derived from ``expected_run_length``."""
        return self._h

    @property
    def kind(self) -> str | None:
        """``"spike"`` or ``"level_shift"``: what the current (or last) incident is."""
        return self._kind

    @property
    def n_spikes(self) -> int:
        """Updates flagged as spikes so far."""
        return self._n_spikes

    @property
    def n_level_shifts(self) -> int:
        """Level shifts detected so far."""
        return self._n_level_shifts

    def to_dict(self) -> dict:
        """Current result as a JSON-safe dict (for metrics and decision records)."""
        return {
            "alarm": self._alarm,
            "in_alarm": self._in_alarm,
            "kind": self._kind,
            "score": self.score,
            "threshold": self._z_threshold,
            "cusum_score": self.cusum_score,
            "cusum_threshold": self._h,
            "n_alarms": self._n_alarms,
        }

    def to_state(self) -> dict:
        """JSON-serialisable state; ``from_state`` rebuilds an identical detector."""
        return {
            "params": {
                "expected_run_length": self.expected_run_length,
                "period_s": self.period_s,
                "season_bins": self.season_bins,
                "level_rate": self.level_rate,
                "season_rate": self.season_rate,
                "scale_rate": self.scale_rate,
                "shift": self.shift,
                "clip": self.clip,
                "warmup_s": self.warmup_s,
                "clear_after": self.clear_after,
                "min_scale": self.min_scale,
            },
            "n": self._n,
            "t0": self._t0,
            "level": self._level,
            "season": list(self._season),
            "visits": list(self._visits),
            "var": self._var,
            "c0": self._c0,
            "c1": self._c1,
            "phi": self._phi,
            "prev": self._prev,
            "up": self._up,
            "down": self._down,
            "calm": self._calm,
            "z": self._z,
            "kind": self._kind,
            "n_spikes": self._n_spikes,
            "n_level_shifts": self._n_level_shifts,
            "q": self._q,
            "q_band": self._q_band,
            "hill": self._hill,
            "n_tail": self._n_tail,
            "n_exceed": self._n_exceed,
            **self._edge_state(),
        }

    @classmethod
    def from_state(cls, state: dict) -> SeasonalZScore:
        """Rebuild a detector from ``to_state()``."""
        det = cls(**state["params"])
        for name in ("level", "var", "c0", "c1", "phi", "prev", "up", "down", "z", "q", "hill"):
            setattr(det, "_" + name, float(state[name]))
        det._t0 = None if state["t0"] is None else float(state["t0"])
        det._n = int(state["n"])
        det._season = [float(v) for v in state["season"]]
        det._visits = [float(v) for v in state["visits"]]
        det._calm = int(state["calm"])
        det._n_tail = int(state["n_tail"])
        det._n_exceed = int(state["n_exceed"])
        # States written before the moderate-exceedance rate: beyond `clip`, normal noise
        # exceeds _BAND clips almost never (2e-9 at clip 3), so the rate beyond clip stands in.
        det._q_band = float(state.get("q_band", state["q"]))
        det._kind = state["kind"]
        det._n_spikes = int(state["n_spikes"])
        det._n_level_shifts = int(state["n_level_shifts"])
        det._load_edge_state(state)
        return det
