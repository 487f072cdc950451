"""Shared machinery of the two-arm anytime-valid guardrail tests (private).

Subclasses say how a :class:`Summary` becomes ``(n, mean, variance)`` (`_arm`) and name the
method; everything else (hypotheses, margins, mixture, p-value, confidence sequences, state) is
here so the mean and proportion tests cannot drift apart.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from . import _mixture
from .alpha import AlphaSplit, resolve_alpha
from .result import TestResult
from .summary import Summary

HARMFUL = ("increase", "decrease", "any")


# Prior sd of the effect-centred mixture, as a fraction of the effect: simulations
# (bench/sequential.py) show 0.5 detects the stated effect ~15% sooner than the half-normal
# mixture tuned to it, and is not slower when the true effect is half or twice as large.
EFFECT_PRIOR_SD = 0.5


class _TwoArmMixtureTest:
    _method: ClassVar[str] = ""

    def __init__(
        self,
        *,
        alpha: float | AlphaSplit = 0.05,
        harmful: str = "increase",
        margin: float = 0.0,
        relative_margin: bool = False,
        effect: float | None = None,
        tuning_n: int = 10_000,
        min_samples: int = 0,
    ) -> None:
        self.alpha = alpha
        self._alpha, self._split = resolve_alpha(alpha)
        if harmful not in HARMFUL:
            raise ValueError(f"harmful must be one of {HARMFUL}, got {harmful!r}")
        self.harmful = harmful
        if not isinstance(relative_margin, bool):
            raise ValueError(f"relative_margin must be True or False, got {relative_margin!r}")
        self.relative_margin = relative_margin
        if (
            isinstance(margin, bool)
            or not isinstance(margin, int | float)
            or not math.isfinite(margin)
            or margin < 0
            or (relative_margin and margin >= 1)
        ):
            limit = "[0, 1)" if relative_margin else "[0, inf)"
            raise ValueError(f"margin must be a number in {limit}, got {margin!r}")
        self.margin = float(margin)
        if effect is not None and (
            isinstance(effect, bool)
            or not isinstance(effect, int | float)
            or not 0 < effect < math.inf
        ):
            raise ValueError(f"effect must be None or a positive finite number, got {effect!r}")
        self.effect = None if effect is None else float(effect)
        if isinstance(tuning_n, bool) or not isinstance(tuning_n, int) or tuning_n < 1:
            raise ValueError(f"tuning_n must be an int >= 1, got {tuning_n!r}")
        self.tuning_n = tuning_n
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 0:
            raise ValueError(f"min_samples must be an int >= 0, got {min_samples!r}")
        self.min_samples = min_samples

        self._sides = {"increase": (1,), "decrease": (-1,), "any": (1, -1)}[harmful]
        # the half-normal mixture's variance, tightest at n_eff = tuning_n (for "any" the
        # average of the two sides is the two-sided normal mixture, tuned as such)
        self._c = _mixture.tuning_constant(self._alpha, "two" if harmful == "any" else "one")
        self._log_threshold = -math.log(self._alpha)
        self._max_log_e = 0.0  # running max over looks of log M (p = exp(-max))
        self._n_control = 0
        self._n_treatment = 0
        self._looks = 0
        self._last: TestResult | None = None

    @classmethod
    def _tuning_n_for(
        cls, *, effect: float, pair_variance: float, alpha: float | AlphaSplit, harmful: str
    ) -> int:
        if not (math.isfinite(effect) and effect != 0.0):
            raise ValueError(f"effect must be a non-zero finite number, got {effect!r}")
        if not (math.isfinite(pair_variance) and pair_variance > 0.0):
            raise ValueError(f"variances must be positive and finite, got {pair_variance!r}")
        alpha, _ = resolve_alpha(alpha)
        sided = "two" if harmful == "any" else "one"
        b = _mixture.boundary(_mixture.tuning_constant(alpha, sided), -math.log(alpha), sided)
        # The drift of z reaches the tightest boundary b at n = b^2 var / effect^2; the median
        # first crossing comes earlier, and simulations (bench/sequential.py) put the fastest
        # median detection at about half that.
        return max(1, round(0.5 * b * b * pair_variance / (effect * effect)))

    # -- subclass hook ---------------------------------------------------------------------
    def _arm(self, summary: Summary) -> tuple[int, float, float]:
        """(count, mean, variance of one value) of an arm."""
        raise NotImplementedError

    def _arm_arrays(self, n: np.ndarray, total: np.ndarray, m2: np.ndarray):
        """Vectorised :meth:`_arm` from counts, sums and sums of squared deviations."""
        raise NotImplementedError

    # -- the statistic ---------------------------------------------------------------------
    def _contrast(self, direction: int) -> tuple[float, float]:
        """(k, a) of the null boundary ``mean_t - k mean_c = direction * a`` for one side."""
        if self.relative_margin:
            return 1.0 + direction * self.margin, 0.0
        return 1.0, direction * self.margin

    def _prior(self, se: float, m_c: float, n_eff: float) -> tuple[float, float]:
        """(mu, rho) of the mixture in standard-error units (see log_truncated_mixture)."""
        if self.effect is not None:
            m = self.effect * (abs(m_c) if self.relative_margin else 1.0)
            if m > 0.0:
                mu = m / se
                return mu, 1.0 / (EFFECT_PRIOR_SD * EFFECT_PRIOR_SD * mu * mu)
        return 0.0, self.tuning_n / (self._c * n_eff)

    def _side(self, u: float, se: float, m_c: float, n_eff: float) -> float:
        """log evidence of one side from its standardised statistic ``u`` (harm > 0)."""
        if se <= 0.0 or math.isinf(u):
            if u == 0.0 or math.isnan(u):
                return 0.0
            return _mixture.LOG_E_CAP if u > 0 else -_mixture.LOG_E_CAP
        mu, rho = self._prior(se, m_c, n_eff)
        return _mixture.log_truncated_mixture(u, mu, rho)

    def _log_e(self, n_c: int, m_c: float, v_c: float, n_t: int, m_t: float, v_t: float) -> float:
        n_eff = 2.0 / (1.0 / n_t + 1.0 / n_c)
        logs = []
        for direction in self._sides:
            k, a = self._contrast(direction)
            se = math.sqrt(v_t / n_t + k * k * v_c / n_c)
            num = direction * (m_t - k * m_c - a)  # evidence of harm is a positive num
            if se > 0.0:
                u = num / se
            else:
                u = 0.0 if num == 0.0 else math.copysign(math.inf, num)
            logs.append(self._side(u, se, m_c, n_eff))
        # "any": the average of the two one-sided mixtures; each is a supermartingale whenever
        # the effect is within its side's margin, so their mean is one for any effect in
        # [-margin, margin] (with a zero margin it is the two-sided normal mixture).
        return logs[0] if len(logs) == 1 else _mixture.log_mean_exp(logs[0], logs[1])

    def _width(self, se: float, m_c: float, n_eff: float) -> float:
        """Boundary on ``|d - d0| / se`` of this look's confidence sequence (both ends)."""

        def evidence(z: float) -> float:
            up = self._side(z, se, m_c, n_eff)
            if self.harmful != "any":
                return up
            return _mixture.log_mean_exp(up, self._side(-z, se, m_c, n_eff))

        return _mixture.solve_increasing(evidence, self._log_threshold)

    def _log_e_paths(self, control: tuple, treatment: tuple) -> np.ndarray:
        """Vectorised log evidence of one look for arrays of ``(n, sum, m2)`` per arm.

        Mirrors :meth:`update` (without the running maximum and ``min_samples``); used by the
        simulations that prove the error rate and by the benchmark.
        """
        n_c, m_c, v_c = self._arm_arrays(*control)
        n_t, m_t, v_t = self._arm_arrays(*treatment)
        with np.errstate(divide="ignore", invalid="ignore"):
            n_eff = 2.0 / (1.0 / n_t + 1.0 / n_c)
            logs = []
            for direction in self._sides:
                k, a = self._contrast(direction)
                se = np.sqrt(v_t / n_t + k * k * v_c / n_c)
                num = direction * (m_t - k * m_c - a)
                u = np.where(se > 0, num / se, np.where(num == 0, 0.0, np.copysign(np.inf, num)))
                mu = np.zeros_like(u)
                rho = self.tuning_n / (self._c * n_eff)
                if self.effect is not None:
                    m = self.effect * (np.abs(m_c) if self.relative_margin else 1.0)
                    use = (m > 0) & (se > 0)
                    mu_e = np.where(use, m / se, 0.0)
                    mu = np.where(use, mu_e, 0.0)
                    rho = np.where(use, 1.0 / (EFFECT_PRIOR_SD**2 * mu_e * mu_e), rho)
                log_e = _mixture.log_truncated_mixture_array(u, mu, rho)
                log_e = np.where(np.isnan(u) | ((se <= 0) & (u == 0)), 0.0, log_e)
                logs.append(log_e)
            if len(logs) == 1:
                best = logs[0]
            else:
                hi, lo = np.maximum(logs[0], logs[1]), np.minimum(logs[0], logs[1])
                best = hi + np.log1p(np.exp(lo - hi)) - math.log(2.0)
        return np.where((n_c >= 2) & (n_t >= 2), best, 0.0)

    # -- the test --------------------------------------------------------------------------
    def update(self, control: Summary, treatment: Summary) -> TestResult:
        """Look at the CUMULATIVE summaries of the control and the treatment arm.

        Returns this look's :class:`TestResult`; the test keeps the running maximum of the
        evidence, so ``p_value`` never increases and ``breached`` stays True once set.
        """
        n_c, m_c, v_c = self._arm(control)
        n_t, m_t, v_t = self._arm(treatment)
        if n_c < self._n_control or n_t < self._n_treatment:
            raise ValueError(
                "summaries must be cumulative: counts went down from "
                f"({self._n_control}, {self._n_treatment}) to ({n_c}, {n_t})"
            )
        self._n_control, self._n_treatment = n_c, n_t
        self._looks += 1
        computable = n_c >= 2 and n_t >= 2
        reached = computable and n_c >= self.min_samples and n_t >= self.min_samples

        log_e = 0.0
        ci = rel_ci = None
        if computable:
            log_e = self._log_e(n_c, m_c, v_c, n_t, m_t, v_t)
            se = math.sqrt(v_t / n_t + v_c / n_c)
            d = m_t - m_c
            if se > 0.0:
                b = self._width(se, m_c, 2.0 / (1.0 / n_t + 1.0 / n_c))
                ci = (d - b * se, d + b * se)
                ratio = _mixture.fieller(m_t, m_c, v_t / n_t, v_c / n_c, b)
                if ratio is not None:
                    rel_ci = (ratio[0] - 1.0, ratio[1] - 1.0)
            else:
                ci = (d, d)
                if m_c != 0.0:
                    rel_ci = (m_t / m_c - 1.0, m_t / m_c - 1.0)
        if reached:
            self._max_log_e = max(self._max_log_e, log_e)
        sided = "two-sided" if self.harmful == "any" else "one-sided"
        prior = "effect" if self.effect is not None else "tuned"
        result = TestResult(
            method=f"{self._method}/mixture-{sided}-{prior}",
            breached=reached and self._max_log_e >= self._log_threshold,
            p_value=min(1.0, math.exp(-self._max_log_e)),
            e_value=math.exp(log_e),
            estimate=(m_t - m_c) if n_c and n_t else None,
            confidence_interval=ci,
            relative_estimate=(m_t / m_c - 1.0) if n_c and n_t and m_c != 0.0 else None,
            relative_interval=rel_ci,
            n_control=n_c,
            n_treatment=n_t,
            alpha=self._alpha,
            min_samples_reached=reached,
            harmful=self.harmful,
            margin=self.margin,
            relative_margin=self.relative_margin,
            alpha_split=None if self._split is None else self._split.to_dict(),
        )
        self._last = result
        return result

    # -- read-only results -----------------------------------------------------------------
    @property
    def breached(self) -> bool:
        """True once harm beyond the margin is established at level ``alpha`` (sticky)."""
        return self._last is not None and self._last.breached

    @property
    def p_value(self) -> float:
        """Always-valid p-value after the last look (1.0 before any)."""
        return min(1.0, math.exp(-self._max_log_e))

    @property
    def confidence_interval(self) -> tuple[float, float] | None:
        """Confidence sequence for the absolute effect at the last look."""
        return None if self._last is None else self._last.confidence_interval

    @property
    def result(self) -> TestResult | None:
        """The last look's result (None before the first look)."""
        return self._last

    @property
    def looks(self) -> int:
        """Number of looks so far."""
        return self._looks

    # -- state -----------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {
            "alpha": self._split.to_dict() if self._split is not None else self._alpha,
            "harmful": self.harmful,
            "margin": self.margin,
            "relative_margin": self.relative_margin,
            "effect": self.effect,
            "tuning_n": self.tuning_n,
            "min_samples": self.min_samples,
        }

    def to_state(self) -> dict[str, Any]:
        """JSON-safe state; ``from_state`` rebuilds a test that behaves identically."""
        return {
            "params": self._params(),
            "max_log_e": self._max_log_e,
            "n_control": self._n_control,
            "n_treatment": self._n_treatment,
            "looks": self._looks,
            "last": None if self._last is None else self._last.to_dict(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]):
        params = dict(state["params"])
        if isinstance(params["alpha"], dict):
            params["alpha"] = AlphaSplit.from_dict(params["alpha"])
        test = cls(**params)
        test._max_log_e = float(state["max_log_e"])
        test._n_control = int(state["n_control"])
        test._n_treatment = int(state["n_treatment"])
        test._looks = int(state["looks"])
        test._last = None if state["last"] is None else TestResult.from_dict(state["last"])
        return test

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"
