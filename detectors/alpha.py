"""Splitting an experiment's alpha over its family of guardrail tests (Bonferroni)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AlphaSplit", "split_alpha"]


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a float in (0, 1), got {alpha!r}")
    return float(alpha)


@dataclass(frozen=True)
class AlphaSplit:
    """Bonferroni split of a family alpha over ``treatments x guardrails`` tests.

    With always-valid p-values the union bound holds at every look simultaneously, so the
    probability that *any* healthy arm is ever flagged on *any* guardrail stays at most
    ``family_alpha`` however often the tests are looked at.

    Parameters
    ----------
    family_alpha
        Error budget of the whole experiment.
    treatments
        Number of treatment arms each compared with the control.
    guardrails
        Number of guardrail tests per treatment arm.

    Examples
    --------
    >>> split = split_alpha(0.05, treatments=2, guardrails=5)
    >>> split.n_tests, split.alpha
    (10, 0.005)
    >>> split.to_dict()
    {'family_alpha': 0.05, 'treatments': 2, 'guardrails': 5, 'n_tests': 10, 'alpha': 0.005, 'method': 'bonferroni'}

    References
    ----------
    Dunn, O. J. (1961). Multiple comparisons among means. Journal of the American Statistical
    Association 56(293), 52-64.
    """

    family_alpha: float
    treatments: int = 1
    guardrails: int = 1

    def __post_init__(self) -> None:
        check_alpha(self.family_alpha)
        for name in ("treatments", "guardrails"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @property
    def n_tests(self) -> int:
        """Size of the family."""
        return self.treatments * self.guardrails

    @property
    def alpha(self) -> float:
        """Alpha of each test in the family."""
        return self.family_alpha / self.n_tests

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description, copied into every result that used this split."""
        return {
            "family_alpha": self.family_alpha,
            "treatments": self.treatments,
            "guardrails": self.guardrails,
            "n_tests": self.n_tests,
            "alpha": self.alpha,
            "method": "bonferroni",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlphaSplit:
        return cls(
            family_alpha=d["family_alpha"], treatments=d["treatments"], guardrails=d["guardrails"]
        )


def split_alpha(family_alpha: float, *, treatments: int = 1, guardrails: int = 1) -> AlphaSplit:
    """Bonferroni split of ``family_alpha`` over ``treatments * guardrails`` tests.

    Pass the returned :class:`AlphaSplit` as ``alpha=`` to a test so its results show the split.
    """
    return AlphaSplit(family_alpha=family_alpha, treatments=treatments, guardrails=guardrails)


def resolve_alpha(alpha: float | AlphaSplit) -> tuple[float, AlphaSplit | None]:
    """(per-test alpha, split or None) from a test's ``alpha`` argument."""
    if isinstance(alpha, AlphaSplit):
        return alpha.alpha, alpha
    return check_alpha(alpha), None
