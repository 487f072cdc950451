"""Anytime-valid test of a difference in means between a treatment and the control arm."""

from __future__ import annotations

import numpy as np

from ._two_arm import _TwoArmMixtureTest
from .alpha import AlphaSplit
from .summary import Summary

__all__ = ["MeanDifferenceTest"]


class MeanDifferenceTest(_TwoArmMixtureTest):
    """Always-valid guardrail test on the mean of a continuous metric (latency, revenue).

    Looks at the cumulative summaries of the control and one treatment arm as often as wanted
    (after every flush, forever); the probability that it ever reports ``breached`` for an arm
    whose effect is not harmful beyond the margin is at most ``alpha`` (asymptotically, as for
    every CLT-based method, see below).

    The statistic is Welch's ``z = (d - d0) / se`` with ``d`` the difference of the arm means and
    ``se = sqrt(s_t^2 / n_t + s_c^2 / n_c)`` from the arms' sample variances. Its evidence is a
    normal-mixture likelihood ratio (mSPRT, Robbins 1970; Johari et al. 2017) in the time scale
    ``t = n_eff / tuning_n`` (``n_eff = 2 / (1/n_t + 1/n_c)``): with a half-normal mixture for a
    one-sided test (``harmful="increase"`` or ``"decrease"``) and the average of the two
    one-sided mixtures for ``harmful="any"`` (with no margin, the two-sided normal mixture).
    Given ``effect``, the smallest harm the guardrail must catch, the mixing distribution is
    instead a normal centred on that effect with standard deviation ``effect / 2``, truncated to
    harmful effects: it detects an effect of that size about 15% sooner than the tuned
    half-normal and is as fast for effects half or twice as large (``bench/sequential.py``). ``p_value = min(1, 1 / max_looks e)`` is an always-valid p-value by Ville's
    inequality; the confidence sequence inverts the same boundary (the asymptotic confidence
    sequences of Waudby-Smith et al. 2023, normal-mixture boundary of Howard et al. 2021). The
    validity is asymptotic in the arms' sample sizes (plug-in variances): use ``min_samples`` to
    ignore looks before the CLT is trustworthy for very skewed metrics.

    Hypotheses (``margin`` is the tolerated harm, >= 0, ``delta = mean_t - mean_c``):

    * ``harmful="increase"``: null ``delta <= margin`` (or ``mean_t <= (1 + margin) mean_c``
      with ``relative_margin=True``); breach = the metric went up by more than the margin.
    * ``harmful="decrease"``: null ``delta >= -margin`` (or ``mean_t >= (1 - margin) mean_c``).
    * ``harmful="any"``: breach when either side is established (two-sided mixture).

    A relative margin is tested exactly on the linear contrast ``mean_t - (1 + margin) mean_c``
    (no delta method); it assumes a positive metric.

    Parameters
    ----------
    alpha
        Level of the test, or an :class:`AlphaSplit` whose per-test alpha is used (the split
        is then shown in every result).
    harmful
        Direction of harm: ``"increase"``, ``"decrease"`` or ``"any"``.
    margin
        Tolerated harm (non-inferiority margin), >= 0; in metric units, or a fraction of the
        control mean when ``relative_margin`` is True (then in [0, 1)).
    relative_margin
        Read ``margin`` as a fraction of the control mean.
    effect
        Smallest harmful effect beyond the margin that must be caught quickly, in the margin's
        units (metric units, or a fraction of the control mean with ``relative_margin``); None
        (the default) uses the half-normal mixture tuned by ``tuning_n``.
    tuning_n
        Per-arm sample size at which the confidence sequence is tightest (the mixture's
        variance) when no ``effect`` is given. :meth:`tuning_n_for` derives it from an effect
        size; the default 10,000 suits typical web guardrails, and the boundary widens only
        slowly (logarithmically) away from it.
    min_samples
        Looks before both arms have this many values are reported but never breach and do not
        count toward the p-value.

    Examples
    --------
    >>> import numpy as np
    >>> from armguard.detectors import MeanDifferenceTest, Summary
    >>> rng = np.random.default_rng(42)
    >>> test = MeanDifferenceTest(alpha=0.05, harmful="increase", tuning_n=2_000)
    >>> control, treatment = Summary(), Summary()
    >>> for look in range(100):  # latency, +3% in the treatment
    ...     control.update_many(rng.normal(200.0, 60.0, size=100))
    ...     treatment.update_many(rng.normal(206.0, 60.0, size=100))
    ...     result = test.update(control, treatment)
    ...     if result.breached:
    ...         break
    >>> look, result.n_treatment, round(result.p_value, 4)
    (4, 500, 0.0198)
    >>> [round(x, 2) for x in result.confidence_interval]
    [1.72, 24.16]
    >>> round(result.relative_estimate, 4), [round(x, 4) for x in result.relative_interval]
    (0.0664, [0.0086, 0.1277])

    Centring the mixture on the smallest harm to catch (+6 ms), with the experiment's alpha
    split over two guardrails:

    >>> from armguard.detectors import split_alpha
    >>> test = MeanDifferenceTest(alpha=split_alpha(0.05, guardrails=2), effect=6.0)
    >>> rng = np.random.default_rng(42)
    >>> control, treatment = Summary(), Summary()
    >>> for look in range(100):
    ...     control.update_many(rng.normal(200.0, 60.0, size=100))
    ...     treatment.update_many(rng.normal(206.0, 60.0, size=100))
    ...     result = test.update(control, treatment)
    ...     if result.breached:
    ...         break
    >>> look, result.alpha, result.method
    (4, 0.025, 'mean-difference/mixture-one-sided-effect')

    References
    ----------
    Robbins, H. (1970). Statistical methods related to the law of the iterated logarithm.
    Annals of Mathematical Statistics 41(5), 1397-1409.

    Johari, R., Koomen, P., Pekelis, L. and Walsh, D. (2017). Peeking at A/B tests: why it
    matters, and what to do about it. KDD 2017, 1517-1525.

    Howard, S. R., Ramdas, A., McAuliffe, J. and Sekhon, J. (2021). Time-uniform, nonparametric,
    nonasymptotic confidence sequences. Annals of Statistics 49(2), 1055-1080.

    Waudby-Smith, I., Arbour, D., Sinha, R., Kennedy, E. H. and Ramdas, A. (2023). Time-uniform
    central limit theory and asymptotic confidence sequences. arXiv:2103.06476.

    Fieller, E. C. (1954). Some problems in interval estimation. Journal of the Royal
    Statistical Society B 16(2), 175-185 (the relative interval).
    """

    _method = "mean-difference"

    @classmethod
    def tuning_n_for(
        cls,
        *,
        effect: float,
        sd: float,
        sd_treatment: float | None = None,
        alpha: float | AlphaSplit = 0.05,
        harmful: str = "increase",
    ) -> int:
        """``tuning_n`` that detects a true effect of this size (beyond any margin) fastest.

        ``effect`` is the difference in means to catch (minus the margin when there is one),
        ``sd`` the standard deviation of one value (of the control; ``sd_treatment`` defaults to
        it). Returns about half the per-arm sample size at which the effect's expected z reaches
        the tightest boundary; the median delay is flat within a factor of 2 around it.

        >>> MeanDifferenceTest.tuning_n_for(effect=2.0, sd=30.0, sd_treatment=30.6)
        1756
        """
        sd_t = sd if sd_treatment is None else sd_treatment
        return cls._tuning_n_for(
            effect=effect, pair_variance=sd * sd + sd_t * sd_t, alpha=alpha, harmful=harmful
        )

    def _arm(self, summary: Summary) -> tuple[int, float, float]:
        return summary.count, summary.mean, summary.variance

    def _arm_arrays(self, n, total, m2):
        with np.errstate(divide="ignore", invalid="ignore"):
            return n, total / n, np.where(n >= 2, m2 / (n - 1), 0.0)
