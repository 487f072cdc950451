"""Anytime-valid test of a difference in proportions between a treatment and the control arm."""

from __future__ import annotations

import numpy as np

from ._two_arm import _TwoArmMixtureTest
from .alpha import AlphaSplit
from .summary import Summary

__all__ = ["ProportionDifferenceTest"]


class ProportionDifferenceTest(_TwoArmMixtureTest):
    """Always-valid guardrail test on a binary metric (errors, conversions, slow requests).

    The arms are Summaries of 0/1 outcomes: ``count`` units and ``sum`` successes. The test is
    :class:`MeanDifferenceTest`'s normal-mixture mSPRT and confidence sequence on the difference
    of the proportions ``delta = p_t - p_c``, with one change for rare events: the variance of an
    arm is ``q (1 - q) / n`` with the Agresti-Caffo adjusted ``q = (x + 1) / (n + 2)`` instead of
    the raw ``x / n``, so an arm with no event yet (error rate 0.1% after a few hundred requests)
    does not get a zero variance and an infinite z (Agresti and Caffo 2000). The estimate itself
    is the raw ``x_t / n_t - x_c / n_c``.

    Hypotheses, margins and the mixture are as in :class:`MeanDifferenceTest`: with
    ``harmful="increase"`` the null is ``p_t <= p_c + margin`` (or ``p_t <= (1 + margin) p_c``).

    Parameters
    ----------
    alpha
        Level of the test, or an :class:`AlphaSplit` whose per-test alpha is used.
    harmful
        Direction of harm: ``"increase"`` (errors), ``"decrease"`` (conversions) or ``"any"``.
    margin
        Tolerated harm, >= 0; in proportion points (0.001 = 0.1 pp), or a fraction of the
        control proportion when ``relative_margin`` is True (then in [0, 1)).
    relative_margin
        Read ``margin`` as a fraction of the control proportion.
    effect
        Smallest harmful change beyond the margin that must be caught quickly (proportion
        points, or a fraction of the control proportion with ``relative_margin``): centres the
        mixture on it, as in :class:`MeanDifferenceTest`. None uses ``tuning_n``.
    tuning_n
        Per-arm sample size at which the confidence sequence is tightest when no ``effect`` is
        given (default 10,000; see :meth:`tuning_n_for`).
    min_samples
        Looks before both arms have this many units never breach and do not count.

    Examples
    --------
    >>> import numpy as np
    >>> from armguard.detectors import ProportionDifferenceTest, Summary
    >>> rng = np.random.default_rng(42)
    >>> test = ProportionDifferenceTest(alpha=0.05, harmful="increase", tuning_n=5_000)
    >>> control, treatment = Summary(), Summary()
    >>> for look in range(200):  # error rate 2% -> 3%
    ...     control.update_many((rng.random(500) < 0.02).astype(float))
    ...     treatment.update_many((rng.random(500) < 0.03).astype(float))
    ...     result = test.update(control, treatment)
    ...     if result.breached:
    ...         break
    >>> look, result.n_treatment, round(result.p_value, 4)
    (2, 1500, 0.013)
    >>> round(result.estimate, 4), [round(x, 4) for x in result.confidence_interval]
    (0.0187, [0.0033, 0.0341])

    References
    ----------
    Johari, R., Koomen, P., Pekelis, L. and Walsh, D. (2017). Peeking at A/B tests: why it
    matters, and what to do about it. KDD 2017, 1517-1525.

    Howard, S. R., Ramdas, A., McAuliffe, J. and Sekhon, J. (2021). Time-uniform, nonparametric,
    nonasymptotic confidence sequences. Annals of Statistics 49(2), 1055-1080.

    Waudby-Smith, I., Arbour, D., Sinha, R., Kennedy, E. H. and Ramdas, A. (2023). Time-uniform
    central limit theory and asymptotic confidence sequences. arXiv:2103.06476.

    Agresti, A. and Caffo, B. (2000). Simple and effective confidence intervals for proportions
    and differences of proportions result from adding two successes and two failures. The
    American Statistician 54(4), 280-288.
    """

    _method = "proportion-difference"

    @classmethod
    def tuning_n_for(
        cls,
        *,
        baseline: float,
        effect: float,
        alpha: float | AlphaSplit = 0.05,
        harmful: str = "increase",
    ) -> int:
        """``tuning_n`` that detects a change from ``baseline`` by ``effect`` fastest.

        ``effect`` is in proportion points (0.003 for 1.0% -> 1.3%), beyond any margin.

        >>> ProportionDifferenceTest.tuning_n_for(baseline=0.01, effect=0.003)
        9660
        """
        if not 0.0 < baseline < 1.0 or not 0.0 < baseline + effect < 1.0:
            raise ValueError(
                f"baseline and baseline + effect must be in (0, 1), got {baseline!r}, {effect!r}"
            )
        p_t = baseline + effect
        var = baseline * (1.0 - baseline) + p_t * (1.0 - p_t)
        return cls._tuning_n_for(effect=effect, pair_variance=var, alpha=alpha, harmful=harmful)

    def _arm(self, summary: Summary) -> tuple[int, float, float]:
        n = summary.count
        x = summary.sum
        if not 0.0 <= x <= n:
            raise ValueError(
                f"a binary metric's summary needs 0 <= sum <= count, got sum={x!r}, count={n!r}"
            )
        q = (x + 1.0) / (n + 2.0)
        return n, (x / n if n else 0.0), q * (1.0 - q)

    def _arm_arrays(self, n, total, m2):
        q = (total + 1.0) / (n + 2.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return n, np.where(n > 0, total / np.maximum(n, 1), 0.0), q * (1.0 - q)
