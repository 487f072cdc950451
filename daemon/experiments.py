"""Experiment definitions: what armguard guards, validated before anything runs.

A file holds ``experiments:``, a list of experiments, each with its arms and designed allocation,
its family-wise ``alpha`` and its guardrails. Every problem is reported at once, naming the file,
the experiment, the field and what is allowed, so ``armguard check-config`` is useful in CI.

Examples
--------
>>> cfg = parse_experiments('''
... experiments:
...   - id: ranker-v2
...     control: control
...     arms: {control: 0.5, treatment: 0.5}
...     guardrails:
...       - {metric: error, test: proportion, harmful: increase, margin: "2%", action: kill}
... ''', where="inline.yaml")
>>> g = cfg.experiments[0].guardrails[0]
>>> g.name, g.margin, g.relative_margin, g.min_samples
('error-proportion', 0.02, True, 100)
>>> parse_experiments("experiments: []", where="empty.yaml")
Traceback (most recent call last):
...
armguard.daemon.errors.ConfigError: empty.yaml: experiments: no experiments defined; add at least one under `experiments:`
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, ConfigProblem
from .settings import problems_from_validation

__all__ = [
    "ExperimentConfig",
    "ExperimentsFile",
    "GuardrailConfig",
    "MetricContract",
    "SrmConfig",
    "load_experiments",
    "parse_experiments",
]

TESTS = ("proportion", "mean", "srm", "drift", "change", "anomaly")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_MARGIN = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*%\s*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricContract(_Model):
    """Accepted range of one metric or feature; values outside it are dead-lettered."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> MetricContract:
        for name in ("min", "max"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number")
            if v is not None and abs(v) > 1e100:
                # Summaries hold sums of squared deviations: values beyond ~1e154 overflow them,
                # and a summary with an infinite m2 is refused whole by the evaluate stage.
                raise ValueError(
                    f"{name} must be within [-1e100, 1e100] (the default range), got {v:g}: "
                    "rescale the metric (e.g. another unit)"
                )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class GuardrailConfig(_Model):
    """One guardrail: a metric, a test, what counts as harm, and what to do about it."""

    name: str = ""
    metric: str | None = None
    source: Literal["metric", "feature"] = "metric"
    test: Literal["proportion", "mean", "srm", "drift", "change", "anomaly"]
    mode: Literal["control", "reference"] = "control"
    harmful: Literal["increase", "decrease", "any"] = "increase"
    margin: float = 0.0
    relative_margin: bool = False
    min_samples: int = Field(100, ge=0)
    action: Literal["alert", "pause", "kill"] = "alert"
    shadow: bool = False
    consecutive: int = Field(3, ge=1)
    expected_run_length: float = Field(10_000.0, gt=1)
    tuning_n: int | None = Field(None, gt=0)
    effect: float | None = Field(None, gt=0)

    @field_validator("test", mode="before")
    @classmethod
    def _known_test(cls, v: Any) -> Any:
        if v not in TESTS:
            raise ValueError(f"unknown test {v!r}; allowed: {', '.join(TESTS)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _parse_margin(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "margin" not in data:
            return data
        data = dict(data)
        m = data["margin"]
        if isinstance(m, bool):
            raise ValueError("margin: must be a number (absolute) or a percentage like '2%'")
        if isinstance(m, str):
            match = _MARGIN.match(m)
            if match:
                if data.get("relative_margin") is False:
                    raise ValueError(
                        "margin: a percentage is relative; drop relative_margin: false"
                    )
                data["margin"] = float(match.group(1)) / 100.0
                data["relative_margin"] = True
            else:
                try:
                    data["margin"] = float(m)
                except ValueError:
                    raise ValueError(
                        f"margin: {m!r} is not a number; use an absolute value like 0.002 "
                        "or a relative one like '2%'"
                    ) from None
        return data

    @model_validator(mode="after")
    def _consistent(self) -> GuardrailConfig:
        if self.test != "srm" and not self.metric:
            raise ValueError(f"metric: required for test {self.test!r}")
        if self.metric is not None and not self.metric.strip():
            raise ValueError("metric: must not be empty")
        if not math.isfinite(self.margin) or self.margin < 0:
            raise ValueError(
                "margin: must be >= 0; it is the harm tolerated before the guardrail breaches "
                "(the harmful direction is set by `harmful`)"
            )
        if (self.effect is not None or self.tuning_n is not None) and self.test not in (
            "mean",
            "proportion",
        ):
            raise ValueError("effect: only mean and proportion guardrails take effect or tuning_n")
        if self.mode == "reference" and self.test != "drift":
            raise ValueError("mode: only drift guardrails have a mode (control or reference)")
        if self.test == "srm" and self.metric:
            raise ValueError("metric: an srm guardrail counts units per arm and takes no metric")
        if not self.name:
            object.__setattr__(self, "name", f"{self.metric or 'allocation'}-{self.test}")
        return self


class SrmConfig(_Model):
    """The sample-ratio-mismatch check, on by default at the industry's alpha of 0.001."""

    enabled: bool = True
    alpha: float = Field(0.001, gt=0, lt=1)
    action: Literal["alert", "pause", "kill"] = "alert"
    min_samples: int = Field(1000, ge=0)
    shadow: bool = False


class ExperimentConfig(_Model):
    """One experiment: its arms, designed allocation, alpha and guardrails."""

    id: str
    control: str
    arms: dict[str, float]
    alpha: float = Field(0.05, gt=0, le=0.5)
    metrics: dict[str, MetricContract] = Field(default_factory=dict)
    features: dict[str, MetricContract] = Field(default_factory=dict)
    srm: SrmConfig = SrmConfig()
    guardrails: list[GuardrailConfig] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str) -> str:
        if not _ID.fullmatch(v):
            raise ValueError(
                f"{v!r} is not a valid id: use 1-100 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return v

    @field_validator("arms")
    @classmethod
    def _allocation(cls, arms: dict[str, float]) -> dict[str, float]:
        if len(arms) < 2:
            raise ValueError("at least two arms are needed (a control and a treatment)")
        for name, share in arms.items():
            if not _ID.fullmatch(name):
                raise ValueError(f"arm name {name!r} is not valid: letters, digits, '.', '_', '-'")
            if not (math.isfinite(share) and 0 < share < 1):
                raise ValueError(f"arm {name!r}: allocation {share} must be between 0 and 1")
        total = sum(arms.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"allocations must sum to 1, they sum to {total:g}")
        return arms

    @model_validator(mode="after")
    def _control_and_names(self) -> ExperimentConfig:
        if self.control not in self.arms:
            raise ValueError(
                f"control: {self.control!r} is not among the arms ({', '.join(self.arms)})"
            )
        seen: set[str] = set()
        for i, g in enumerate(self.guardrails):
            if g.name in seen:
                raise ValueError(f"guardrails[{i}].name: duplicate guardrail name {g.name!r}")
            seen.add(g.name)
            if g.test == "srm":
                raise ValueError(
                    f"guardrails[{i}].test: the SRM check is configured under `srm:`, "
                    "not as a guardrail"
                )
        return self

    @property
    def treatments(self) -> list[str]:
        return [a for a in self.arms if a != self.control]

    def summarised(self) -> tuple[set[str], set[str]]:
        """Metric and feature names ingest summarises for this experiment."""
        metrics = set(self.metrics)
        features = set(self.features)
        for g in self.guardrails:
            if g.metric:
                (features if g.source == "feature" else metrics).add(g.metric)
        return metrics, features


class ExperimentsFile(_Model):
    """A validated set of experiments and the hash that names this configuration version."""

    experiments: list[ExperimentConfig]

    @field_validator("experiments")
    @classmethod
    def _unique(cls, exps: list[ExperimentConfig]) -> list[ExperimentConfig]:
        if not exps:
            raise ValueError("no experiments defined; add at least one under `experiments:`")
        seen: set[str] = set()
        for e in exps:
            if e.id in seen:
                raise ValueError(f"duplicate experiment id {e.id!r}; ids must be unique")
            seen.add(e.id)
        return exps

    @property
    def version(self) -> str:
        """A short content hash of the validated config; decisions record it."""
        blob = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(blob).hexdigest()[:16]

    def by_id(self) -> dict[str, ExperimentConfig]:
        return {e.id: e for e in self.experiments}


def parse_experiments(text: str, *, where: str) -> ExperimentsFile:
    """Validate YAML text; raise :class:`ConfigError` listing every problem."""
    import yaml

    # libyaml's C loader when PyYAML has it: 2x faster on big files (10,000 experiments).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(where, "", f"not valid YAML: {exc}")]) from exc
    if data is None:
        raise ConfigError(
            [ConfigProblem(where, "", "the file is empty; it needs an `experiments:` list")]
        )
    if not isinstance(data, dict):
        raise ConfigError(
            [
                ConfigProblem(
                    where, "", "the top level must be a mapping with an `experiments:` list"
                )
            ]
        )

    def experiment_of(loc: list[Any]) -> str | None:
        if len(loc) >= 2 and loc[0] == "experiments" and isinstance(loc[1], int):
            exps = data.get("experiments")
            if isinstance(exps, list) and loc[1] < len(exps) and isinstance(exps[loc[1]], dict):
                eid = exps[loc[1]].get("id")
                return str(eid) if eid is not None else f"#{loc[1] + 1}"
        return None

    try:
        return ExperimentsFile.model_validate(data)
    except ValidationError as exc:
        problems = problems_from_validation(exc, where, experiment_of)
        # "experiments[0].guardrails[1].margin" reads better without the experiment prefix
        # once the experiment is named.
        cleaned = []
        for p in problems:
            field = re.sub(r"^experiments\[\d+\]\.?", "", p.field) if p.experiment else p.field
            msg = p.message
            if field.endswith("]") or not field:
                # A model-level error: its message starts with the field it is about.
                m = re.match(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)?): (.*)$", msg)
                if m:
                    field = f"{field}.{m.group(1)}" if field else m.group(1)
                    msg = m.group(2)
            cleaned.append(ConfigProblem(p.where, field, msg, p.experiment))
        raise ConfigError(cleaned) from exc


def load_experiments(path: str | Path) -> ExperimentsFile:
    """Read and validate an experiments YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([ConfigProblem(str(path), "", "file not found")])
    return parse_experiments(p.read_text(), where=str(path))
