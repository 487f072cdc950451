"""Adapters from a configured guardrail to the pure detectors, and their status rows.

Each runner owns the detector for one (guardrail, arm) pair and turns its output into a *level*:
``inconclusive`` (thin or missing data: never a pass, never a kill), ``ok``, ``warn`` or
``breach``, plus the numbers that explain it. Policy (overrides, onsets, actions) lives in
:mod:`armguard.daemon.engine`; statistics live in ``detectors/``.

Sequential tests are valid at every look, so their level follows the test directly. Drift and
anomaly detectors raise alarms; ``consecutive`` alarmed evaluations turn a warn into a breach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from armguard.detectors.summary import Summary

from .experiments import ExperimentConfig, GuardrailConfig

__all__ = ["ArmData", "GuardrailRunner", "SrmRunner", "Status", "make_runners"]

# A sequential test whose always-valid p-value is below WARN_FACTOR x alpha (but not below alpha)
# is reported as "warn": the evidence is building up, the guardrail has not crossed.
WARN_FACTOR = 10.0


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _merged_moments_finite(a: Summary, b: Summary) -> bool:
    """Whether ``a.merge_in(b)`` leaves sum, mean and m2 finite (the same arithmetic as
    Summary's pairwise update, for two non-empty summaries)."""
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + (b.m2 + delta * delta * (a.count * b.count / n))
    return math.isfinite(a.sum + b.sum) and math.isfinite(mean) and math.isfinite(m2)


@dataclass
class ArmData:
    """Cumulative (or per-interval) data of one arm: record count and a Summary per name."""

    count: int = 0
    metrics: dict[str, Summary] = field(default_factory=dict)
    features: dict[str, Summary] = field(default_factory=dict)

    def merge_state(self, arm: dict[str, Any]) -> None:
        count = arm.get("count", 0)
        if type(count) is not int or not 0 <= count < 1 << 53:
            raise ValueError(f"an arm's count must be an integer in [0, 2**53), got {count!r:.40}")
        self.count += count
        for kind in ("metrics", "features"):
            target: dict[str, Summary] = getattr(self, kind)
            for name, st in (arm.get(kind) or {}).items():
                s = Summary.from_state(st)
                if name in target:
                    target[name].merge_in(s)
                else:
                    target[name] = s

    def merge_in(self, other: ArmData) -> None:
        self._merge(other, take=False)

    def absorb(self, other: ArmData) -> None:
        """:meth:`merge_in` for an ``other`` that is discarded afterwards: its Summaries are
        taken as they are where this has none of that name, instead of copied."""
        self._merge(other, take=True)

    def _merge(self, other: ArmData, *, take: bool) -> None:
        self.count += other.count
        for kind in ("metrics", "features"):
            target: dict[str, Summary] = getattr(self, kind)
            for name, s in getattr(other, kind).items():
                if name in target:
                    target[name].merge_in(s)
                else:
                    target[name] = s if take else s.copy()

    def check_mergeable(self, other: ArmData) -> None:
        """Raise ValueError, naming the summary, if :meth:`merge_in` of ``other`` would fail
        or leave a moment that is not finite: a summary of the same name with another relative
        accuracy (a record from a producer or version with other settings), or moments whose
        merge overflows (finite on their own; merged, an inf m2 held null in the snapshot,
        which was then unreadable). Checked before anything is merged."""
        for kind in ("metrics", "features"):
            mine: dict[str, Summary] = getattr(self, kind)
            for name, s in getattr(other, kind).items():
                have = mine.get(name)
                if have is None:
                    continue
                if have.relative_accuracy != s.relative_accuracy:
                    raise ValueError(
                        f"{kind}.{name}: relative_accuracy {s.relative_accuracy} cannot merge "
                        f"into the experiment's {have.relative_accuracy}"
                    )
                if have.count and s.count and not _merged_moments_finite(have, s):
                    raise ValueError(
                        f"{kind}.{name}: merged into the data so far, its moments overflow"
                    )

    def get(self, source: str, name: str) -> Summary | None:
        return (self.features if source == "feature" else self.metrics).get(name)

    def to_state(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "metrics": {k: v.to_state() for k, v in sorted(self.metrics.items())},
            "features": {k: v.to_state() for k, v in sorted(self.features.items())},
        }

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> ArmData:
        count = st["count"]
        # A negative or non-integer count raised out of the SRM test at the next record.
        if type(count) is not int or not 0 <= count < 1 << 63:
            raise ValueError(f"an arm's count must be an integer in [0, 2**63), got {count!r:.40}")
        return cls(
            count=count,
            metrics={k: Summary.from_state(v) for k, v in st["metrics"].items()},
            features={k: Summary.from_state(v) for k, v in st["features"].items()},
        )


@dataclass
class Status:
    """What a guardrail says now about one arm; exported as metrics and in events."""

    guardrail: str
    arm: str
    metric: str | None
    test: str
    level: str = "inconclusive"  # inconclusive | ok | warn | breach
    method: str = ""
    estimate: float | None = None
    lower: float | None = None
    upper: float | None = None
    relative_estimate: float | None = None
    relative_lower: float | None = None
    relative_upper: float | None = None
    p_value: float | None = None
    e_value: float | None = None
    alpha: float | None = None
    n_control: int = 0
    n_treatment: int = 0
    score: float | None = None
    threshold: float | None = None
    min_samples_reached: bool = False
    streak: int = 0

    def row(self, state: str) -> dict[str, Any]:
        """The JSON row used in events, snapshots and the status API."""
        return {
            "guardrail": self.guardrail,
            "arm": self.arm,
            "metric": self.metric,
            "test": self.test,
            "state": state,
            "method": self.method,
            "estimate": _finite(self.estimate),
            "lower": _finite(self.lower),
            "upper": _finite(self.upper),
            "relative_estimate": _finite(self.relative_estimate),
            "relative_lower": _finite(self.relative_lower),
            "relative_upper": _finite(self.relative_upper),
            "p_value": _finite(self.p_value),
            "e_value": _finite(self.e_value),
            "alpha": _finite(self.alpha),
            "n_control": self.n_control,
            "n_treatment": self.n_treatment,
            "score": _finite(self.score),
            "threshold": _finite(self.threshold),
        }


class GuardrailRunner:
    """One guardrail applied to one arm: owns the detector and the onset bookkeeping."""

    def __init__(self, exp: ExperimentConfig, g: GuardrailConfig, arm: str, alpha: Any):
        self.exp = exp
        self.g = g
        self.arm = arm
        self.alpha = alpha  # an AlphaSplit: the family split shows in every result
        self.key = f"{g.name}/{arm}"
        self.firing = False  # a breach onset has been acted on and not cleared since
        self.streak = 0
        self.status = Status(g.name, arm, g.metric, g.test, alpha=alpha.alpha)
        self.detector: Any = self._build()

    # -- construction -------------------------------------------------------------------------
    def _build(self) -> Any:
        g = self.g
        if g.test in ("mean", "proportion"):
            if g.test == "mean":
                from armguard.detectors.mean_difference import MeanDifferenceTest as cls
            else:
                from armguard.detectors.proportion_difference import (
                    ProportionDifferenceTest as cls,
                )
            # The mixture is tuned to the smallest harm the guardrail must catch (`effect`, in the
            # margin's units) or to the sample size where it should be tightest (`tuning_n`).
            extra: dict[str, Any] = {}
            if g.effect is not None:
                extra["effect"] = g.effect
            elif g.tuning_n is not None:
                extra["tuning_n"] = g.tuning_n
            return cls(
                alpha=self.alpha,
                harmful=g.harmful,
                margin=g.margin,
                relative_margin=g.relative_margin,
                min_samples=g.min_samples,
                **extra,
            )
        if g.test == "drift":
            if g.mode == "reference":
                from armguard.detectors.window_drift import WindowDrift

                return WindowDrift(expected_run_length=g.expected_run_length)
            from armguard.detectors.two_sample_drift import TwoSampleDrift

            return TwoSampleDrift(expected_run_length=g.expected_run_length)
        if g.test == "change":
            from armguard.detectors.rank_cusum import RankCUSUM

            return RankCUSUM(expected_run_length=g.expected_run_length)
        if g.test == "anomaly":
            from armguard.detectors.seasonal_zscore import SeasonalZScore

            return SeasonalZScore(expected_run_length=g.expected_run_length)
        raise ValueError(f"unknown test {g.test!r}")  # pragma: no cover - config validates

    @property
    def sequential(self) -> bool:
        return self.g.test in ("mean", "proportion")

    # -- evaluation ---------------------------------------------------------------------------
    def fits(self, arms: dict[str, ArmData], seen: dict[str, Any]) -> bool:
        """Whether a sequential test whose state is ``seen`` has seen no more values a side
        than ``arms`` hold of its metric: restored with other data (the guardrail, same name,
        now reads another metric), its next update raised "counts went down" at every record."""
        for arm, n in ((self.exp.control, seen["n_control"]), (self.arm, seen["n_treatment"])):
            data = arms.get(arm)
            s = data.get(self.g.source, self.g.metric) if data else None  # type: ignore[arg-type]
            if n > (s.count if s else 0):
                return False
        return True

    def evaluate_cumulative(self, arms: dict[str, ArmData]) -> None:
        """Sequential tests: run on the cumulative control and treatment data."""
        g, st = self.g, self.status
        control = arms.get(self.exp.control)
        treat = arms.get(self.arm)
        c = control.get(g.source, g.metric) if control else None  # type: ignore[arg-type]
        t = treat.get(g.source, g.metric) if treat else None  # type: ignore[arg-type]
        st.n_control = c.count if c else 0
        st.n_treatment = t.count if t else 0
        if c is None or t is None or c.count < 2 or t.count < 2:
            st.level = "inconclusive"
            st.min_samples_reached = False
            return
        r = self.detector.update(c, t)
        st.method = r.method
        st.estimate = r.estimate
        st.lower, st.upper = r.confidence_interval or (None, None)
        st.relative_estimate = r.relative_estimate
        st.relative_lower, st.relative_upper = r.relative_interval or (None, None)
        st.p_value, st.e_value = r.p_value, r.e_value
        st.alpha = r.alpha
        st.min_samples_reached = bool(r.min_samples_reached)
        if not st.min_samples_reached:
            st.level = "inconclusive"
        elif r.breached:
            st.level = "breach"
        elif r.p_value is not None and r.p_value < WARN_FACTOR * r.alpha:
            st.level = "warn"
        else:
            st.level = "ok"

    def start_interval(
        self, interval: dict[str, ArmData], cumulative: dict[str, ArmData], t: float
    ) -> tuple[Summary, Summary] | Summary | None:
        """Drift and anomaly, once per evaluation interval (event time ``t``), up to the
        detector's update.

        A drift guardrail with data returns what its detector is to be updated with: the
        ``(treatment, control)`` pair against control, the arm's interval Summary against its
        own reference. The caller updates the detector (many of them at once,
        ``TwoSampleDrift.update_many`` and ``WindowDrift.update_many``, which give the same
        result whatever the batch) and then calls :meth:`finish_interval`. Every other
        guardrail is evaluated here (None returned).
        """
        g, st = self.g, self.status
        treat_cum = cumulative.get(self.arm)
        n_t = (
            treat_cum.get(g.source, g.metric).count
            if treat_cum and treat_cum.get(g.source, g.metric)
            else 0
        )  # type: ignore[arg-type]
        ctrl_cum = cumulative.get(self.exp.control)
        n_c = (
            ctrl_cum.get(g.source, g.metric).count
            if ctrl_cum and ctrl_cum.get(g.source, g.metric)
            else 0
        )  # type: ignore[arg-type]
        st.n_control, st.n_treatment = n_c, n_t
        if g.test == "drift" and g.mode == "control":
            c_int = interval.get(self.exp.control)
            t_int = interval.get(self.arm)
            c = c_int.get(g.source, g.metric) if c_int else None  # type: ignore[arg-type]
            x = t_int.get(g.source, g.metric) if t_int else None  # type: ignore[arg-type]
            if c is None or x is None or c.count == 0 or x.count == 0:
                st.level = "inconclusive" if self.streak == 0 else st.level
                return None
            return x, c
        if g.test == "drift":
            arm_int = interval.get(self.arm)
            s = arm_int.get(g.source, g.metric) if arm_int else None  # type: ignore[arg-type]
            if s is None or s.count == 0:
                return None
            return s
        if g.test == "change":
            arm_int = interval.get(self.arm)
            s = arm_int.get(g.source, g.metric) if arm_int else None  # type: ignore[arg-type]
            if s is None or s.count == 0:
                return None
            self.detector.update(s.mean)
        else:
            arm_int = interval.get(self.arm)
            s = arm_int.get(g.source, g.metric) if arm_int else None  # type: ignore[arg-type]
            if s is None or s.count == 0:
                return None
            self.detector.update(s.mean, t)
        self.finish_interval()
        return None

    def finish_interval(self) -> None:
        """The level from the detector's alarm, after its update for this interval."""
        g, st, det = self.g, self.status, self.detector
        st.method = type(det).__name__
        st.score, st.threshold = det.score, det.threshold
        alarmed = bool(det.in_alarm)
        self.streak = self.streak + 1 if alarmed else 0
        st.streak = self.streak
        if st.n_treatment < g.min_samples or (
            g.test == "drift" and g.mode == "control" and st.n_control < g.min_samples
        ):
            st.level = "inconclusive"
        elif self.streak >= g.consecutive:
            st.level = "breach"
        elif self.streak > 0:
            st.level = "warn"
        else:
            st.level = "ok"

    # -- state --------------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "firing": self.firing,
            "streak": self.streak,
            "level": self.status.level,
            "detector": self.detector.to_state(),
            "status": self.status.row(self.status.level),
        }

    def restore(self, st: dict[str, Any]) -> None:
        self.firing = bool(st["firing"])
        self.streak = int(st["streak"])
        self.detector = type(self.detector).from_state(st["detector"])
        row = st.get("status") or {}
        s = self.status
        s.level = st.get("level", "inconclusive")
        for name in (
            "method",
            "estimate",
            "lower",
            "upper",
            "relative_estimate",
            "relative_lower",
            "relative_upper",
            "p_value",
            "e_value",
            "alpha",
            "score",
            "threshold",
        ):
            if name in row:
                setattr(s, name, row[name])
        s.n_control = int(row.get("n_control", 0))
        s.n_treatment = int(row.get("n_treatment", 0))
        s.streak = self.streak


class SrmRunner:
    """The sample-ratio-mismatch check on cumulative record counts per arm."""

    def __init__(self, exp: ExperimentConfig):
        from armguard.detectors.srm import SampleRatioMismatch

        self.exp = exp
        self.cfg = exp.srm
        self.firing = False
        self.level = "inconclusive"
        self.p_value: float | None = None
        self.detector = SampleRatioMismatch(
            allocation=dict(exp.arms), alpha=self.cfg.alpha, min_samples=self.cfg.min_samples
        )

    def fits(self, arms: dict[str, ArmData], seen: dict[str, Any]) -> bool:
        """Whether a test whose state is ``seen`` has this experiment's arms, split and
        settings (those of this runner's detector, before it is restored), and has counted
        no more units of an arm than ``arms`` hold."""
        if seen["params"] != self.detector.to_state()["params"]:
            return False
        counts = seen["counts"]
        if not isinstance(counts, list) or len(counts) != len(self.exp.arms):
            return False
        return all(
            n <= (arms[a].count if a in arms else 0)
            for a, n in zip(self.exp.arms, counts, strict=True)
        )

    def evaluate(self, arms: dict[str, ArmData]) -> None:
        counts = {a: (arms[a].count if a in arms else 0) for a in self.exp.arms}
        r = self.detector.update(counts)
        self.p_value = r.p_value
        if sum(counts.values()) < self.cfg.min_samples:
            self.level = "inconclusive"
        elif r.breached:
            self.level = "breach"
        elif r.p_value is not None and r.p_value < WARN_FACTOR * self.cfg.alpha:
            self.level = "warn"
        else:
            self.level = "ok"

    def to_state(self) -> dict[str, Any]:
        return {
            "firing": self.firing,
            "level": self.level,
            "p_value": _finite(self.p_value),
            "detector": self.detector.to_state(),
        }

    def restore(self, st: dict[str, Any]) -> None:
        self.firing = bool(st["firing"])
        self.level = st["level"]
        self.p_value = st["p_value"]
        self.detector = type(self.detector).from_state(st["detector"])


def make_runners(exp: ExperimentConfig) -> dict[str, GuardrailRunner]:
    """Runners for every guardrail and treatment arm, with the experiment's alpha split.

    The family is every (sequential guardrail, treatment arm) pair; Bonferroni over always-valid
    p-values keeps the chance that any healthy arm is ever killed by a sequential test at or below
    the experiment's alpha.
    """
    from armguard.detectors.alpha import split_alpha

    n_seq = sum(1 for g in exp.guardrails if g.test in ("mean", "proportion"))
    split = split_alpha(exp.alpha, treatments=len(exp.treatments), guardrails=max(1, n_seq))
    runners: dict[str, GuardrailRunner] = {}
    for g in exp.guardrails:
        # Comparisons with control run per treatment; an arm against its own past (reference
        # drift, anomaly) runs on every arm, control included: there it can only alert.
        own_past = g.test in ("anomaly", "change") or (g.test == "drift" and g.mode == "reference")
        for arm in exp.arms if own_past else exp.treatments:
            r = GuardrailRunner(exp, g, arm, split)
            runners[r.key] = r
    return runners
