"""Prometheus metrics of the daemon, on an injected registry.

Every stage records through one :class:`Metrics` object, built on the ``CollectorRegistry`` it is
given (never the global one, so tests and several daemons in one process never share counters).
Names follow Prometheus conventions: base units, ``_total`` counters, ``_seconds`` histograms.

Label cardinality is bounded. Each labelled metric accepts at most ``max_label_sets`` distinct
label sets; a new set beyond the cap is not recorded and counts once in
``armguard_label_sets_dropped_total{metric}``. When the experiment ids are known (``experiments=``
or :meth:`Metrics.set_experiments`), an ``experiment`` label outside them is dropped the same way,
so a flood of unknown ids in telemetry cannot blow up the time series.

The guardrail state is not copied into gauges on every decision: the evaluate stage registers a
provider with :meth:`Metrics.set_guardrail_provider` and a custom collector reads it at scrape time,
so a scrape always shows the state the evaluator holds, and removed experiments disappear.

Examples
--------
>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> m = Metrics(registry, max_label_sets=2)
>>> m.records_consumed.labels(topic="telemetry").inc(3)
>>> registry.get_sample_value("armguard_records_consumed_total", {"topic": "telemetry"})
3.0
>>> for t in ("a", "b"):
...     m.records_consumed.labels(topic=t).inc()
>>> registry.get_sample_value("armguard_records_consumed_total", {"topic": "b"}) is None
True
>>> registry.get_sample_value(
...     "armguard_label_sets_dropped_total", {"metric": "armguard_records_consumed_total"})
1.0
>>> m.set_guardrail_provider(lambda: [GuardrailSample(
...     experiment="ranker-v2", arm="treatment", guardrail="error-proportion", test="proportion",
...     state="breach", estimate=0.012, lower=0.004, upper=0.02, p_value=0.001)])
>>> registry.get_sample_value("armguard_guardrail_state", {"experiment": "ranker-v2",
...     "arm": "treatment", "guardrail": "error-proportion", "test": "proportion",
...     "shadow": "false", "state": "breach"})
1.0
"""

from __future__ import annotations

import logging
import math
import platform
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "EXPERIMENT_STATES",
    "GUARDRAIL_STATES",
    "GuardrailSample",
    "Metrics",
]

log = logging.getLogger("armguard.metrics")

GUARDRAIL_STATES = ("ok", "warn", "breach", "inconclusive", "overridden")
EXPERIMENT_STATES = ("running", "paused", "killed")

# Batches take milliseconds to a few seconds; transactions add a broker round trip; a state
# restore reads a compacted topic and can take minutes on a big cluster.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RESTORE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True, slots=True)
class GuardrailSample:
    """The current state of one guardrail of one arm, as the evaluate stage holds it.

    ``state`` is one of ``ok``, ``warn``, ``breach``, ``inconclusive`` or ``overridden``;
    ``experiment_state`` one of ``running``, ``paused`` or ``killed``. Numbers that do not apply to
    the guardrail's test are ``None`` and are not exported (``score`` and ``threshold`` belong to
    drift and anomaly detectors, ``estimate``/``lower``/``upper`` to effect tests, ``p_value`` to
    tests that have one, including SRM). ``shadow`` marks a guardrail that only records what it
    would have done; its breaches do not page.
    """

    experiment: str
    arm: str
    guardrail: str
    test: str
    state: str
    estimate: float | None = None
    lower: float | None = None
    upper: float | None = None
    p_value: float | None = None
    score: float | None = None
    threshold: float | None = None
    experiment_state: str = "running"
    shadow: bool = False


class _NoopChild:
    """Stands in for a label set beyond the cap: accepts every call, records nothing."""

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass

    def set_to_current_time(self) -> None:
        pass


_NOOP = _NoopChild()


class BoundedMetric:
    """A labelled metric that holds at most ``cap`` label sets.

    ``labels(...)`` returns the usual child, or a child that records nothing (after counting the
    drop once) when the set would exceed the cap or names an unknown experiment. ``remove(...)``
    frees a set, e.g. the lag of a partition this process no longer owns.
    """

    def __init__(
        self,
        metric: Counter | Gauge | Histogram,
        name: str,
        labelnames: tuple[str, ...],
        owner: Metrics,
    ):
        self._metric = metric
        self.name = name
        self.labelnames = labelnames
        self._owner = owner
        self._seen: set[tuple[str, ...]] = set()
        self._dropped: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, ...]:
        if args and kwargs:
            raise ValueError("pass label values positionally or by name, not both")
        if kwargs:
            if set(kwargs) != set(self.labelnames):
                raise ValueError(
                    f"{self.name} takes labels {', '.join(self.labelnames)}; "
                    f"got {', '.join(sorted(kwargs))}"
                )
            return tuple(str(kwargs[n]) for n in self.labelnames)
        if len(args) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {', '.join(self.labelnames)}")
        return tuple(str(a) for a in args)

    def labels(self, *args: Any, **kwargs: Any) -> Any:
        key = self._key(args, kwargs)
        with self._lock:
            if key in self._seen:
                return self._metric.labels(*key)
            allowed = self._owner._allows(dict(zip(self.labelnames, key, strict=True)))
            if allowed and len(self._seen) < self._owner.max_label_sets:
                self._seen.add(key)
                return self._metric.labels(*key)
            first_drop = key not in self._dropped and len(self._dropped) < _MAX_REMEMBERED_DROPS
            if first_drop:
                self._dropped.add(key)
        if first_drop:
            self._owner.label_sets_dropped.labels(metric=self.name).inc()
        return _NOOP

    def remove(self, *args: Any, **kwargs: Any) -> None:
        key = self._key(args, kwargs)
        with self._lock:
            if key in self._seen:
                self._seen.discard(key)
                self._metric.remove(*key)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
            self._dropped.clear()
            self._metric.clear()

    @property
    def label_sets(self) -> int:
        return len(self._seen)


# Distinct dropped label sets remembered so each is counted once; past this many, further drops
# are no longer counted (the counter already says the cap is hit).
_MAX_REMEMBERED_DROPS = 100_000


class Metrics:
    """Every metric armguard exports, registered on ``registry``.

    Parameters
    ----------
    registry
        Where the metrics are registered. Never the global ``REGISTRY`` by default.
    max_label_sets
        Cap on distinct label sets per labelled metric, and on the guardrail series the collector
        exports per metric family.
    experiments
        Known experiment ids; ``experiment`` labels outside them are dropped. ``None`` (default)
        accepts any id, within the cap.
    version
        The version reported in ``armguard_build_info``; defaults to the installed package's.

    Examples
    --------
    >>> from prometheus_client import CollectorRegistry
    >>> registry = CollectorRegistry()
    >>> m = Metrics(registry, experiments=["ranker-v2"])
    >>> m.decisions.labels(experiment="ranker-v2", outcome="kill").inc()
    >>> m.decisions.labels(experiment="typo", outcome="kill").inc()
    >>> registry.get_sample_value("armguard_decisions_total",
    ...                           {"experiment": "ranker-v2", "outcome": "kill"})
    1.0
    >>> registry.get_sample_value("armguard_decisions_total",
    ...                           {"experiment": "typo", "outcome": "kill"}) is None
    True
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_label_sets: int = 2000,
        experiments: Collection[str] | None = None,
        version: str | None = None,
    ):
        if not isinstance(registry, CollectorRegistry):
            raise TypeError("registry must be a prometheus_client CollectorRegistry")
        if isinstance(max_label_sets, bool) or not isinstance(max_label_sets, int):
            raise ValueError(f"max_label_sets must be a positive int, got {max_label_sets!r}")
        if max_label_sets < 1:
            raise ValueError(f"max_label_sets must be >= 1, got {max_label_sets}")
        self.registry = registry
        self.max_label_sets = max_label_sets
        self._experiments: frozenset[str] | None = (
            frozenset(experiments) if experiments is not None else None
        )
        self._provider: Callable[[], Iterable[GuardrailSample]] | None = None
        r = registry

        # Not bounded itself: its only label is a metric name, a fixed set.
        self.label_sets_dropped = Counter(
            "armguard_label_sets_dropped",
            "Label sets not recorded because a metric hit its cardinality cap or named an "
            "unknown experiment (each set counted once).",
            ["metric"],
            registry=r,
        )
        self.collector_errors = Counter(
            "armguard_collector_errors",
            "Scrapes in which the guardrail state provider raised; its series were left out.",
            registry=r,
        )

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> BoundedMetric:
            c = Counter(name, doc, list(labels), registry=r)
            return BoundedMetric(c, f"{name}_total", labels, self)

        def gauge(name: str, doc: str, labels: tuple[str, ...]) -> BoundedMetric:
            return BoundedMetric(Gauge(name, doc, list(labels), registry=r), name, labels, self)

        def histogram(name: str, doc: str, labels: tuple[str, ...]) -> BoundedMetric:
            h = Histogram(name, doc, list(labels), buckets=_DURATION_BUCKETS, registry=r)
            return BoundedMetric(h, name, labels, self)

        self.records_consumed = counter(
            "armguard_records_consumed", "Records read from an input topic.", ("topic",)
        )
        self.records_summarised = counter(
            "armguard_records_summarised",
            "Telemetry records that passed the data contract and were folded into summaries.",
            ("topic",),
        )
        self.records_deadlettered = counter(
            "armguard_records_deadlettered",
            "Records written to the dead-letter topic, by rejection reason.",
            ("topic", "reason"),
        )
        self.records_skipped = counter(
            "armguard_records_skipped",
            "Records skipped without dead-lettering, by reason: telemetry of unconfigured "
            "experiments (unknown_experiment), summary records evaluate cannot use "
            "(invalid_summary, unknown_experiment).",
            ("topic", "reason"),
        )
        self.consumer_lag = gauge(
            "armguard_consumer_lag_records",
            "Records between the committed position and the end of the partition.",
            ("group", "topic", "partition"),
        )
        self.batch_duration = histogram(
            "armguard_batch_duration_seconds", "Time to process one fetched batch.", ("stage",)
        )
        self.transaction_duration = histogram(
            "armguard_transaction_duration_seconds",
            "Time from beginning to committing or aborting one Kafka transaction.",
            ("stage",),
        )
        self.transactions = counter(
            "armguard_transactions",
            "Kafka transactions by outcome: committed, aborted (on purpose) or failed.",
            ("stage", "outcome"),
        )
        self.summaries_written = Counter(
            "armguard_summaries_written",
            "Summary records written to the summaries topic.",
            registry=r,
        )
        self.killswitch_events = counter(
            "armguard_killswitch_events",
            "Kill-switch events written, by experiment and action (alert, pause, kill, resume).",
            ("experiment", "action"),
        )
        self.commands = counter(
            "armguard_operator_commands",
            "Operator commands read from the commands topic, by command and outcome.",
            ("command", "outcome"),
        )
        self.decisions = counter(
            "armguard_decisions",
            "Decisions written to the decisions topic, by experiment and outcome.",
            ("experiment", "outcome"),
        )
        self.state_restore_duration = Histogram(
            "armguard_state_restore_duration_seconds",
            "Time to restore evaluator state from the state topic after an assignment.",
            buckets=_RESTORE_BUCKETS,
            registry=r,
        )
        self.build_info = Info("armguard_build", "Version of the running armguard.", registry=r)
        self.build_info.info(
            {
                "version": version or _package_version(),
                "python": platform.python_version(),
            }
        )
        r.register(_GuardrailCollector(self))

    def _allows(self, labels: dict[str, str]) -> bool:
        exp = labels.get("experiment")
        return exp is None or self._experiments is None or exp in self._experiments

    def set_experiments(self, experiments: Collection[str] | None) -> None:
        """Accept ``experiment`` labels only for these ids (``None``: any id, within the cap)."""
        self._experiments = frozenset(experiments) if experiments is not None else None

    def set_guardrail_provider(
        self, provider: Callable[[], Iterable[GuardrailSample]] | None
    ) -> None:
        """Register the function the scrape calls for the current guardrail state.

        It is called on the event loop thread serving ``/metrics``, so it may read the evaluator's
        state without locks; it must be quick and must not block. ``None`` unregisters it.
        """
        if provider is not None and not callable(provider):
            raise TypeError("provider must be a callable returning GuardrailSample objects")
        self._provider = provider

    def _guardrail_samples(self) -> list[GuardrailSample]:
        provider = self._provider
        if provider is None:
            return []
        try:
            return list(provider())
        except Exception:
            # A scrape must not take the endpoint down; the error is logged and counted, and the
            # guardrail series vanish (the rules' absent() checks notice).
            log.exception("guardrail state provider failed during a scrape")
            self.collector_errors.inc()
            return []


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("armguard")
    except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        return "unknown"


def _finite(x: float | None) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


class _GuardrailCollector(Collector):
    """Reads the evaluator's guardrail state at scrape time into gauge families."""

    def __init__(self, metrics: Metrics):
        self._m = metrics
        self._dropped_seen: set[tuple[str, ...]] = set()

    def describe(self) -> list[Any]:
        # Declared so the registry checks the names for clashes without calling the provider.
        return list(self._families())

    def _drop(self, family: str, key: tuple[str, ...]) -> None:
        k = (family, *key)
        if k not in self._dropped_seen and len(self._dropped_seen) < _MAX_REMEMBERED_DROPS:
            self._dropped_seen.add(k)
            self._m.label_sets_dropped.labels(metric=family).inc()

    def collect(self) -> Iterator[Any]:
        return iter(self._families(self._m._guardrail_samples()))

    def _families(self, samples: Iterable[GuardrailSample] = ()) -> list[Any]:
        g = ("experiment", "arm", "guardrail")
        fam = {
            "state": GaugeMetricFamily(
                "armguard_guardrail_state",
                "1 for the guardrail's current state, 0 for the other states.",
                labels=[*g, "test", "shadow", "state"],
            ),
            "estimate": GaugeMetricFamily(
                "armguard_guardrail_estimate",
                "Estimated effect of the arm against control on the guardrail metric.",
                labels=list(g),
            ),
            "lower": GaugeMetricFamily(
                "armguard_guardrail_lower",
                "Lower bound of the anytime-valid confidence sequence of the effect.",
                labels=list(g),
            ),
            "upper": GaugeMetricFamily(
                "armguard_guardrail_upper",
                "Upper bound of the anytime-valid confidence sequence of the effect.",
                labels=list(g),
            ),
            "p_value": GaugeMetricFamily(
                "armguard_guardrail_p_value",
                "Anytime-valid p-value of the guardrail test (harm hypothesis).",
                labels=list(g),
            ),
            "srm": GaugeMetricFamily(
                "armguard_srm_p_value",
                "p-value of the sample-ratio-mismatch test of the experiment's allocation.",
                labels=["experiment"],
            ),
            "drift_score": GaugeMetricFamily(
                "armguard_drift_score",
                "Drift statistic of a monitored feature or metric of the arm.",
                labels=list(g),
            ),
            "drift_threshold": GaugeMetricFamily(
                "armguard_drift_threshold",
                "Threshold above which the drift statistic alarms.",
                labels=list(g),
            ),
            "anomaly_score": GaugeMetricFamily(
                "armguard_anomaly_score",
                "Anomaly score of the arm's metric stream.",
                labels=list(g),
            ),
            "anomaly_threshold": GaugeMetricFamily(
                "armguard_anomaly_threshold",
                "Threshold above which the anomaly score alarms.",
                labels=list(g),
            ),
            "experiment": GaugeMetricFamily(
                "armguard_experiment_state",
                "1 for the experiment's current state (running, paused, killed), 0 for the others.",
                labels=["experiment", "state"],
            ),
        }
        cap = self._m.max_label_sets
        seen: dict[str, set[tuple[str, ...]]] = {k: set() for k in fam}

        def admit(kind: str, key: tuple[str, ...]) -> bool:
            s = seen[kind]
            if key in s:
                return False  # a duplicate sample: the first one wins
            if len(s) >= cap:
                self._drop(fam[kind].name, key)
                return False
            s.add(key)
            return True

        def add(kind: str, key: tuple[str, ...], value: float | None) -> None:
            if _finite(value) and admit(kind, key):
                fam[kind].add_metric(list(key), float(value))  # type: ignore[arg-type]

        for s in samples:
            if not isinstance(s, GuardrailSample):
                continue
            if not self._m._allows({"experiment": s.experiment}):
                self._drop("armguard_guardrail_state", (s.experiment, s.arm, s.guardrail))
                continue
            key = (s.experiment, s.arm, s.guardrail)
            shadow = "true" if s.shadow else "false"
            if admit("state", key):
                for st in GUARDRAIL_STATES:
                    fam["state"].add_metric(
                        [*key, s.test, shadow, st], 1.0 if s.state == st else 0.0
                    )
            if s.test == "srm":
                add("srm", (s.experiment,), s.p_value)
            elif s.test == "drift":
                add("drift_score", key, s.score)
                add("drift_threshold", key, s.threshold)
            elif s.test == "anomaly":
                add("anomaly_score", key, s.score)
                add("anomaly_threshold", key, s.threshold)
            else:
                add("estimate", key, s.estimate)
                add("lower", key, s.lower)
                add("upper", key, s.upper)
                add("p_value", key, s.p_value)
            if admit("experiment", (s.experiment,)):
                for st in EXPERIMENT_STATES:
                    fam["experiment"].add_metric(
                        [s.experiment, st], 1.0 if s.experiment_state == st else 0.0
                    )
        return list(fam.values())
