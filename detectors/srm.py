"""Anytime-valid sample-ratio-mismatch test (Dirichlet-multinomial Bayes factor)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _mixture
from .alpha import AlphaSplit, resolve_alpha
from .result import SRMResult

__all__ = ["SampleRatioMismatch"]

_lgamma = np.frompyfunc(math.lgamma, 1, 1)


class SampleRatioMismatch:
    """Always-valid check that units reach the arms in the designed ratio (k arms).

    Each unit's arm is a draw from a multinomial with the designed shares ``theta0``. The test
    compares that null with a Dirichlet prior on the shares centred on the design,
    ``Dirichlet(concentration * theta0)``. Because the Dirichlet is conjugate, the Bayes factor
    of the counts ``x`` (``n`` units in all) is closed-form,

    ``BF = B(a + x) / B(a) / prod(theta0_i ** x_i)``, with ``a = concentration * theta0`` and
    ``B`` the multivariate beta function,

    and it is a nonnegative martingale under the null whatever the order and batching of the
    units, so ``p = min(1, 1 / max_looks BF)`` is an always-valid p-value (Ville's inequality)
    and the test may be evaluated after every summary forever (Lindon and Malek 2022).

    The prior concentration sets the sample size at which the test is most sensitive: a
    Dirichlet with concentration ``K`` gives each share a prior variance of
    ``theta (1 - theta) / (K + 1)``, which matches the normal mixture tuned at ``tuning_n`` units
    when ``K + 1 = tuning_n / c(alpha)`` (``c`` the mixture constant of
    :class:`MeanDifferenceTest`, 16.7 at alpha 0.001). ``tuning_n`` defaults to 50,000 units, the
    scale at which a 49/51 split of a 50/50 design becomes detectable at alpha 0.001.

    Parameters
    ----------
    allocation
        Designed share of each arm, ``{arm: share}``; shares are positive and sum to 1.
    alpha
        Level of the test (default 0.001, as is customary for SRM checks), or an
        :class:`AlphaSplit`.
    tuning_n
        Total units at which the test is most sensitive (sets the Dirichlet concentration).
    concentration
        Dirichlet prior concentration; overrides ``tuning_n`` when given (savvi's default is 100).
    min_samples
        Looks with fewer units in total never breach and do not count toward the p-value.

    Examples
    --------
    >>> import numpy as np
    >>> from armguard.detectors import SampleRatioMismatch
    >>> rng = np.random.default_rng(42)
    >>> srm = SampleRatioMismatch(allocation={"control": 0.5, "treatment": 0.5})
    >>> counts = {"control": 0, "treatment": 0}
    >>> for look in range(1000):  # a bug sends 52% of the traffic to the treatment
    ...     treated = int(rng.binomial(1000, 0.52))
    ...     counts = {"control": counts["control"] + 1000 - treated,
    ...               "treatment": counts["treatment"] + treated}
    ...     result = srm.update(counts)
    ...     if result.breached:
    ...         break
    >>> result.n, result.most_deviating_arm, round(result.p_value, 6)
    (10000, 'treatment', 0.00034)
    >>> {arm: round(share, 4) for arm, share in result.observed_shares.items()}
    {'control': 0.4762, 'treatment': 0.5238}

    References
    ----------
    Lindon, M. and Malek, A. (2022). Anytime-valid inference for multinomial count data.
    Advances in Neural Information Processing Systems 35 (NeurIPS 2022).

    Fabijan, A., Gupchup, J., Gupta, S., Omhover, J., Qin, W., Vermeer, L. and Dmitriev, P.
    (2019). Diagnosing sample ratio mismatch in online controlled experiments. KDD 2019.
    """

    _method = "srm/dirichlet-multinomial"

    def __init__(
        self,
        *,
        allocation: dict[str, float],
        alpha: float | AlphaSplit = 0.001,
        tuning_n: int = 50_000,
        concentration: float | None = None,
        min_samples: int = 0,
    ) -> None:
        if (
            not isinstance(allocation, dict)
            or len(allocation) < 2
            or not all(isinstance(k, str) for k in allocation)
            or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                for v in allocation.values()
            )
            or abs(sum(allocation.values()) - 1.0) > 1e-9
        ):
            raise ValueError(
                "allocation must be a dict of at least two arm names to positive shares summing "
                f"to 1, got {allocation!r}"
            )
        self.allocation = {k: float(v) for k, v in allocation.items()}
        self.alpha = alpha
        self._alpha, self._split = resolve_alpha(alpha)
        if isinstance(tuning_n, bool) or not isinstance(tuning_n, int) or tuning_n < 1:
            raise ValueError(f"tuning_n must be an int >= 1, got {tuning_n!r}")
        self.tuning_n = tuning_n
        if concentration is not None and (
            isinstance(concentration, bool)
            or not isinstance(concentration, int | float)
            or not 0 < concentration < math.inf
        ):
            raise ValueError(
                f"concentration must be a positive number or None, got {concentration!r}"
            )
        self.concentration = None if concentration is None else float(concentration)
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 0:
            raise ValueError(f"min_samples must be an int >= 0, got {min_samples!r}")
        self.min_samples = min_samples

        self._arms = tuple(self.allocation)
        self._theta = np.array([self.allocation[a] for a in self._arms])
        if self.concentration is None:
            c = _mixture.tuning_constant(self._alpha, "two")
            self._k = max(tuning_n / c - 1.0, 1.0)
        else:
            self._k = self.concentration
        self._prior = [self._k * t for t in self._theta.tolist()]
        self._log_theta = [math.log(t) for t in self._theta.tolist()]
        self._prior_lgamma = [math.lgamma(a) for a in self._prior]
        self._log_threshold = -math.log(self._alpha)
        self._max_log_e = 0.0
        self._counts = [0] * len(self._arms)
        self._looks = 0
        self._last: SRMResult | None = None

    def _log_bf(self, counts: list[int]) -> float:
        n = sum(counts)
        value = math.lgamma(self._k) - math.lgamma(self._k + n)
        for x, a, la, lt in zip(
            counts, self._prior, self._prior_lgamma, self._log_theta, strict=True
        ):
            value += math.lgamma(a + x) - la - x * lt
        return min(value, _mixture.LOG_E_CAP)

    def _log_bf_paths(self, counts: np.ndarray) -> np.ndarray:
        """Vectorised log Bayes factor for an array of counts with the arms on the last axis."""
        counts = np.asarray(counts, dtype=np.float64)
        n = counts.sum(-1)
        prior = np.asarray(self._prior)
        value = math.lgamma(self._k) - _lgamma(self._k + n).astype(np.float64)
        value = value + (
            _lgamma(prior + counts).astype(np.float64) - np.asarray(self._prior_lgamma)
        ).sum(-1)
        value = value - (counts * np.asarray(self._log_theta)).sum(-1)
        return np.minimum(value, _mixture.LOG_E_CAP)

    def update(self, counts: dict[str, int]) -> SRMResult:
        """Look at the CUMULATIVE units per arm (arms not yet seen may be left out)."""
        unknown = set(counts) - set(self._arms)
        if unknown:
            raise ValueError(f"unknown arms {sorted(unknown)}; known arms are {list(self._arms)}")
        new = []
        for arm, old in zip(self._arms, self._counts, strict=True):
            x = counts.get(arm, 0)
            if isinstance(x, bool) or not isinstance(x, int | np.integer) or x < 0:
                raise ValueError(f"counts must be non-negative ints, got {arm}={x!r}")
            if x < old:
                raise ValueError(f"counts must be cumulative: {arm} went down from {old} to {x}")
            new.append(int(x))
        self._counts = new
        self._looks += 1
        n = sum(new)
        log_e = self._log_bf(new)
        reached = n >= max(self.min_samples, 1)
        if reached:
            self._max_log_e = max(self._max_log_e, log_e)
        observed = most = None
        if n:
            observed = {a: x / n for a, x in zip(self._arms, new, strict=True)}
            most = max(self._arms, key=lambda a: abs(observed[a] / self.allocation[a] - 1.0))
        result = SRMResult(
            method=self._method,
            breached=reached and self._max_log_e >= self._log_threshold,
            p_value=min(1.0, math.exp(-self._max_log_e)),
            e_value=math.exp(log_e),
            n=n,
            counts=dict(zip(self._arms, new, strict=True)),
            expected_shares=dict(self.allocation),
            observed_shares=observed,
            most_deviating_arm=most,
            alpha=self._alpha,
            min_samples_reached=reached,
            alpha_split=None if self._split is None else self._split.to_dict(),
        )
        self._last = result
        return result

    @property
    def breached(self) -> bool:
        """True once a mismatch is established at level ``alpha`` (sticky)."""
        return self._last is not None and self._last.breached

    @property
    def p_value(self) -> float:
        """Always-valid p-value after the last look (1.0 before any)."""
        return min(1.0, math.exp(-self._max_log_e))

    @property
    def result(self) -> SRMResult | None:
        """The last look's result (None before the first look)."""
        return self._last

    @property
    def looks(self) -> int:
        """Number of looks so far."""
        return self._looks

    def to_state(self) -> dict[str, Any]:
        """JSON-safe state; ``from_state`` rebuilds a test that behaves identically."""
        return {
            "params": {
                "allocation": dict(self.allocation),
                "alpha": self._split.to_dict() if self._split is not None else self._alpha,
                "tuning_n": self.tuning_n,
                "concentration": self.concentration,
                "min_samples": self.min_samples,
            },
            "max_log_e": self._max_log_e,
            "counts": list(self._counts),
            "looks": self._looks,
            "last": None if self._last is None else self._last.to_dict(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SampleRatioMismatch:
        params = dict(state["params"])
        if isinstance(params["alpha"], dict):
            params["alpha"] = AlphaSplit.from_dict(params["alpha"])
        test = cls(**params)
        test._max_log_e = float(state["max_log_e"])
        test._counts = [int(x) for x in state["counts"]]
        test._looks = int(state["looks"])
        test._last = None if state["last"] is None else SRMResult.from_dict(state["last"])
        return test

    def __repr__(self) -> str:
        return (
            f"SampleRatioMismatch(allocation={self.allocation!r}, alpha={self._alpha!r}, "
            f"tuning_n={self.tuning_n!r}, concentration={self.concentration!r})"
        )
