"""Metrics on an injected registry: names, values, bounded cardinality, scrape-time guardrails."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from armguard.daemon.metrics import (
    EXPERIMENT_STATES,
    GUARDRAIL_STATES,
    GuardrailSample,
    Metrics,
)

# The names COMMON.md fixes for every stage (attribute -> exported sample name).
CONTRACT = {
    "records_consumed": "armguard_records_consumed_total",
    "records_summarised": "armguard_records_summarised_total",
    "records_deadlettered": "armguard_records_deadlettered_total",
    "records_skipped": "armguard_records_skipped_total",
    "consumer_lag": "armguard_consumer_lag_records",
    "batch_duration": "armguard_batch_duration_seconds",
    "transaction_duration": "armguard_transaction_duration_seconds",
    "transactions": "armguard_transactions_total",
    "summaries_written": "armguard_summaries_written_total",
    "killswitch_events": "armguard_killswitch_events_total",
    "commands": "armguard_operator_commands_total",
    "decisions": "armguard_decisions_total",
    "state_restore_duration": "armguard_state_restore_duration_seconds",
    "label_sets_dropped": "armguard_label_sets_dropped_total",
    "build_info": "armguard_build_info",
}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels)


def sample(**kw) -> GuardrailSample:
    base = dict(
        experiment="ranker-v2",
        arm="treatment",
        guardrail="error-proportion",
        test="proportion",
        state="ok",
    )
    base.update(kw)
    return GuardrailSample(**base)


def test_every_contract_attribute_exists(registry):
    m = Metrics(registry)
    for attr in CONTRACT:
        assert hasattr(m, attr), attr


def test_counters_and_gauges_export_contract_names(registry):
    m = Metrics(registry)
    m.records_consumed.labels(topic="t").inc(5)
    m.records_summarised.labels(topic="t").inc(4)
    m.records_deadlettered.labels(topic="t", reason="bad_json").inc()
    m.records_skipped.labels(topic="t", reason="stale").inc(2)
    m.consumer_lag.labels(group="g", topic="t", partition="0").set(17)
    m.transactions.labels(stage="ingest", outcome="committed").inc()
    m.summaries_written.inc(3)
    m.killswitch_events.labels(experiment="e", action="kill").inc()
    m.commands.labels(command="resume", outcome="accepted").inc()
    m.decisions.labels(experiment="e", outcome="breach").inc()
    assert value(registry, "armguard_records_consumed_total", topic="t") == 5
    assert value(registry, "armguard_records_summarised_total", topic="t") == 4
    assert value(registry, "armguard_records_deadlettered_total", topic="t", reason="bad_json") == 1
    assert value(registry, "armguard_records_skipped_total", topic="t", reason="stale") == 2
    assert (
        value(registry, "armguard_consumer_lag_records", group="g", topic="t", partition="0") == 17
    )
    assert value(registry, "armguard_transactions_total", stage="ingest", outcome="committed") == 1
    assert value(registry, "armguard_summaries_written_total") == 3
    assert value(registry, "armguard_killswitch_events_total", experiment="e", action="kill") == 1
    assert (
        value(registry, "armguard_operator_commands_total", command="resume", outcome="accepted")
        == 1
    )
    assert value(registry, "armguard_decisions_total", experiment="e", outcome="breach") == 1


def test_histograms_in_seconds(registry):
    m = Metrics(registry)
    m.batch_duration.labels(stage="ingest").observe(0.02)
    m.transaction_duration.labels(stage="evaluate").observe(0.3)
    m.state_restore_duration.observe(4.0)
    assert value(registry, "armguard_batch_duration_seconds_count", stage="ingest") == 1
    assert value(registry, "armguard_batch_duration_seconds_sum", stage="ingest") == 0.02
    assert (
        value(registry, "armguard_transaction_duration_seconds_bucket", stage="evaluate", le="0.5")
        == 1
    )
    assert value(registry, "armguard_state_restore_duration_seconds_count") == 1


def test_build_info(registry):
    Metrics(registry, version="9.9.9")
    text = generate_latest(registry).decode()
    assert re.search(r'armguard_build_info\{.*version="9\.9\.9".*\} 1\.0', text)


def test_never_touches_the_global_registry():
    from prometheus_client import REGISTRY

    before = set(REGISTRY._names_to_collectors)
    Metrics(CollectorRegistry())
    Metrics(CollectorRegistry())  # a second instance must not clash either
    assert set(REGISTRY._names_to_collectors) == before


def test_cap_drops_new_label_sets_and_counts_each_once(registry):
    m = Metrics(registry, max_label_sets=3)
    for i in range(5):
        m.records_consumed.labels(topic=f"t{i}").inc()
        m.records_consumed.labels(topic=f"t{i}").inc()  # again: not counted twice as dropped
    assert [
        value(registry, "armguard_records_consumed_total", topic=f"t{i}") for i in range(5)
    ] == [
        2.0,
        2.0,
        2.0,
        None,
        None,
    ]
    assert (
        value(
            registry, "armguard_label_sets_dropped_total", metric="armguard_records_consumed_total"
        )
        == 2
    )
    assert m.records_consumed.label_sets == 3


def test_remove_frees_a_label_set(registry):
    m = Metrics(registry, max_label_sets=1)
    m.consumer_lag.labels(group="g", topic="t", partition="0").set(1)
    m.consumer_lag.remove(group="g", topic="t", partition="0")
    assert (
        value(registry, "armguard_consumer_lag_records", group="g", topic="t", partition="0")
        is None
    )
    m.consumer_lag.labels(group="g", topic="t", partition="1").set(2)
    assert (
        value(registry, "armguard_consumer_lag_records", group="g", topic="t", partition="1") == 2
    )


def test_unknown_experiments_are_dropped(registry):
    m = Metrics(registry, experiments=["a"])
    m.decisions.labels(experiment="a", outcome="ok").inc()
    m.decisions.labels(experiment="zz", outcome="ok").inc()
    m.records_consumed.labels(topic="t").inc()  # no experiment label: unaffected
    assert value(registry, "armguard_decisions_total", experiment="a", outcome="ok") == 1
    assert value(registry, "armguard_decisions_total", experiment="zz", outcome="ok") is None
    assert (
        value(registry, "armguard_label_sets_dropped_total", metric="armguard_decisions_total") == 1
    )
    m.set_experiments(["a", "zz"])
    m.decisions.labels(experiment="zz", outcome="ok").inc()
    assert value(registry, "armguard_decisions_total", experiment="zz", outcome="ok") == 1


def test_wrong_labels_name_the_valid_ones(registry):
    m = Metrics(registry)
    with pytest.raises(ValueError, match="topic, reason"):
        m.records_deadlettered.labels(topic="t")
    with pytest.raises(ValueError, match="topic"):
        m.records_consumed.labels("a", "b")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_max_label_sets_validated(registry, bad):
    with pytest.raises(ValueError, match="max_label_sets"):
        Metrics(registry, max_label_sets=bad)


def test_guardrail_state_read_at_scrape_time(registry):
    m = Metrics(registry)
    state = {"s": "ok"}
    m.set_guardrail_provider(
        lambda: [sample(state=state["s"], estimate=0.01, lower=-0.002, upper=0.02, p_value=0.2)]
    )
    labels = dict(
        experiment="ranker-v2",
        arm="treatment",
        guardrail="error-proportion",
        test="proportion",
        shadow="false",
    )
    assert value(registry, "armguard_guardrail_state", **labels, state="ok") == 1
    assert value(registry, "armguard_guardrail_state", **labels, state="breach") == 0
    state["s"] = "breach"
    assert value(registry, "armguard_guardrail_state", **labels, state="breach") == 1
    for st in GUARDRAIL_STATES:
        assert value(registry, "armguard_guardrail_state", **labels, state=st) == (st == "breach")
    g = dict(experiment="ranker-v2", arm="treatment", guardrail="error-proportion")
    assert value(registry, "armguard_guardrail_estimate", **g) == 0.01
    assert value(registry, "armguard_guardrail_lower", **g) == -0.002
    assert value(registry, "armguard_guardrail_upper", **g) == 0.02
    assert value(registry, "armguard_guardrail_p_value", **g) == 0.2
    for st in EXPERIMENT_STATES:
        assert value(registry, "armguard_experiment_state", experiment="ranker-v2", state=st) == (
            st == "running"
        )


def test_srm_drift_anomaly_and_missing_numbers(registry):
    m = Metrics(registry)
    m.set_guardrail_provider(
        lambda: [
            sample(arm="*", guardrail="allocation-srm", test="srm", p_value=0.0004, state="breach"),
            sample(guardrail="query_length-drift", test="drift", score=0.3, threshold=0.2),
            sample(guardrail="latency_ms-anomaly", test="anomaly", score=4.0, threshold=None),
            sample(guardrail="latency_ms-mean", test="mean", estimate=float("nan")),
        ]
    )
    assert value(registry, "armguard_srm_p_value", experiment="ranker-v2") == 0.0004
    g = dict(experiment="ranker-v2", arm="treatment")
    assert value(registry, "armguard_drift_score", **g, guardrail="query_length-drift") == 0.3
    assert value(registry, "armguard_drift_threshold", **g, guardrail="query_length-drift") == 0.2
    assert value(registry, "armguard_anomaly_score", **g, guardrail="latency_ms-anomaly") == 4.0
    # None and NaN are not exported (a gauge of NaN breaks comparisons in alert rules).
    assert (
        value(registry, "armguard_anomaly_threshold", **g, guardrail="latency_ms-anomaly") is None
    )
    assert value(registry, "armguard_guardrail_estimate", **g, guardrail="latency_ms-mean") is None


def test_guardrail_series_capped(registry):
    m = Metrics(registry, max_label_sets=2)
    m.set_guardrail_provider(lambda: [sample(arm=f"arm{i}") for i in range(4)])
    text = generate_latest(registry).decode()
    arms = set(re.findall(r'armguard_guardrail_state\{[^}]*arm="(arm\d)"', text))
    assert arms == {"arm0", "arm1"}
    generate_latest(registry)  # a second scrape does not count the same drops again
    assert (
        value(registry, "armguard_label_sets_dropped_total", metric="armguard_guardrail_state") == 2
    )


def test_guardrail_unknown_experiment_dropped(registry):
    m = Metrics(registry, experiments=["ranker-v2"])
    m.set_guardrail_provider(lambda: [sample(), sample(experiment="other")])
    assert (
        value(
            registry,
            "armguard_guardrail_state",
            experiment="other",
            arm="treatment",
            guardrail="error-proportion",
            test="proportion",
            shadow="false",
            state="ok",
        )
        is None
    )


def test_failing_provider_does_not_break_the_scrape(registry, caplog):
    m = Metrics(registry)
    m.records_consumed.labels(topic="t").inc()

    def broken():
        raise RuntimeError("boom")

    m.set_guardrail_provider(broken)
    text = generate_latest(registry).decode()
    assert "armguard_records_consumed_total" in text
    assert value(registry, "armguard_collector_errors_total") >= 1
    assert "guardrail state provider failed" in caplog.text
    m.set_guardrail_provider(None)
    generate_latest(registry)


def test_provider_must_be_callable(registry):
    with pytest.raises(TypeError, match="callable"):
        Metrics(registry).set_guardrail_provider(42)  # type: ignore[arg-type]


def test_exposition_has_help_and_types(registry):
    m = Metrics(registry)
    m.set_guardrail_provider(lambda: [sample()])
    text = generate_latest(registry).decode()
    for family in (
        "armguard_guardrail_state",
        "armguard_records_consumed_total",
        "armguard_batch_duration_seconds",
    ):
        base = family.removesuffix("_total")
        assert f"# HELP {base}" in text
        assert f"# TYPE {base}" in text
