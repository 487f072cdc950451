"""bench/decision_latency.py keeps working: a small restore and one short decision run.

Figures are the bench's business; these tests only check that the measurements complete and
are consistent (every snapshot restored, one kill per regression and none for healthy arms,
latencies positive and split into parts that add up).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "decision_latency.py"


@pytest.fixture
def bench(kafka_bootstrap, monkeypatch):
    spec = importlib.util.spec_from_file_location("armguard_bench_decision_latency", BENCH)
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses resolve their annotations through sys.modules.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "BOOTSTRAP", kafka_bootstrap)
    return module


async def test_restore_measurement_restores_every_experiment(bench):
    variants = bench.snapshot_variants(4, summaries=6, per_summary=400)
    assert all(v["internal"]["interval"] for v in variants)  # mid evaluation interval
    result = await bench.restore_time(120, variants, profile=False)
    assert result["restored"] == 120 and result["decoded"] == 120
    # Both phases were measured; how they compare is the bench's business, not a test's.
    assert result["seconds"] > 0 and result["engine_seconds"] > 0


@pytest.mark.slow
async def test_one_short_decision_run(bench):
    args = argparse.Namespace(
        rate=4000.0,
        runs=1,
        warmup_s=4.0,
        gap_s=8.0,
        partitions=2,
        flush_interval_s=1.0,
        evaluation_interval_s=1.0,
    )
    result = await bench.decision_latency(args)
    assert result["other_events"] == 0
    (row,) = result["rows"]
    assert row["guardrail"] == "error-proportion"
    assert 0 < row["from_last_sent"] <= row["from_first"]
    parts = row["ingest"] + row["evaluate"] + row["readable"]
    assert parts == pytest.approx(row["from_last_sent"], abs=0.01)
