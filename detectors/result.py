"""Results of the guardrail tests: frozen, self-explaining, JSON-safe via ``to_dict()``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["SRMResult", "TestResult"]


def _json_safe(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class TestResult:
    """Outcome of one look of a two-arm guardrail test (treatment against control).

    Parameters
    ----------
    method
        Name of the test, e.g. ``"mean-difference/mixture-one-sided-tuned"`` (half-normal
        mixture tuned by ``tuning_n``) or ``".../mixture-two-sided-effect"`` (mixture centred on
        the stated effect).
    breached
        True once the always-valid p-value has reached ``alpha`` with ``min_samples`` per arm
        (sticky: it stays True on later looks). Always False while ``min_samples_reached`` is
        False (the daemon calls that "inconclusive").
    p_value
        Always-valid p-value (non-increasing over looks) for "no harm beyond the margin".
    e_value
        Evidence of this look: the mixture likelihood ratio (or Bayes factor) against the null.
    estimate
        Treatment minus control (absolute effect); None while an arm is empty.
    confidence_interval
        ``(lo, hi)`` confidence sequence for the absolute effect at this look; None with fewer
        than two values in an arm. For one-sided tests each bound is a one-sided ``1 - alpha``
        confidence sequence (the interval is a two-sided ``1 - 2 alpha`` one).
    relative_estimate
        ``treatment / control - 1``; None when the control mean is 0 or an arm is empty.
    relative_interval
        Confidence sequence for the relative effect (Fieller's inversion of the same boundary),
        None when it is unbounded (control mean not distinguishable from 0).
    n_control, n_treatment
        Sample sizes behind this look.
    alpha
        The significance level this test used (after any family split).
    min_samples_reached
        Whether both arms have ``min_samples`` values (and at least 2).
    harmful, margin, relative_margin
        The hypothesis: breach means the effect is harmful beyond the margin.
    alpha_split
        The family split behind ``alpha`` (``AlphaSplit.to_dict()``), or None.
    """

    __test__ = False  # not a pytest test class despite the name

    method: str
    breached: bool
    p_value: float
    e_value: float
    estimate: float | None
    confidence_interval: tuple[float, float] | None
    relative_estimate: float | None
    relative_interval: tuple[float, float] | None
    n_control: int
    n_treatment: int
    alpha: float
    min_samples_reached: bool
    harmful: str
    margin: float
    relative_margin: bool
    alpha_split: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists; no NaN or inf)."""
        return {f.name: _json_safe(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TestResult:
        """Inverse of :meth:`to_dict`."""
        kw = dict(d)
        for name in ("confidence_interval", "relative_interval"):
            if kw[name] is not None:
                kw[name] = (kw[name][0], kw[name][1])
        return cls(**kw)


@dataclass(frozen=True)
class SRMResult:
    """Outcome of one look of the sample-ratio-mismatch test.

    Parameters
    ----------
    method
        ``"srm/dirichlet-multinomial"``.
    breached
        True once the always-valid p-value has reached ``alpha`` (sticky), never before
        ``min_samples`` units in total.
    p_value
        Always-valid p-value for "the arms receive units in the designed ratio".
    e_value
        Bayes factor of this look against the designed ratio.
    n
        Total units.
    counts, expected_shares, observed_shares
        Per arm: units, designed share, observed share (None when ``n == 0``).
    most_deviating_arm
        Arm whose observed share is furthest (relatively) from its design; None when ``n == 0``.
    alpha, min_samples_reached, alpha_split
        As in :class:`TestResult`.
    """

    method: str
    breached: bool
    p_value: float
    e_value: float
    n: int
    counts: dict[str, int]
    expected_shares: dict[str, float]
    observed_shares: dict[str, float] | None
    most_deviating_arm: str | None
    alpha: float
    min_samples_reached: bool
    alpha_split: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {f.name: _json_safe(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SRMResult:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)
