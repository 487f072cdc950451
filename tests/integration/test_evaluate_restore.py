"""EvaluateStage._restore on the real broker: snapshots in, same states out, the GC left as found.

The restore pauses the cyclic garbage collector while it loads snapshots (full collections over
the growing heap dominated the restore of 10,000 experiments, bench/decision_latency.py); these
tests pin that it restores every committed snapshot and always gives the collector back.
"""

from __future__ import annotations

import gc

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from armguard.daemon.engine import Engine
from armguard.daemon.evaluate import EvaluateStage
from armguard.daemon.experiments import parse_experiments
from armguard.daemon.health import Health
from armguard.daemon.metrics import Metrics
from armguard.daemon.settings import Settings
from tests.support.summaries import regression_stream

pytestmark = pytest.mark.integration

CONFIG = """
experiments:
""" + "".join(
    f"""
  - id: exp-{i}
    control: control
    arms: {{control: 0.5, t1: 0.5}}
    guardrails:
      - {{metric: error, test: proportion, harmful: increase, min_samples: 500, action: kill}}
      - {{metric: latency_ms, test: mean, harmful: increase, min_samples: 500, action: kill}}
"""
    for i in range(4)
)


async def _stage_with_state(kafka_bootstrap, make_topic, group: str | None = None, **topics):
    experiments = parse_experiments(CONFIG, where="test.yaml")
    source = Engine(experiments)
    for i in range(4):
        recs = regression_stream(i, experiment=f"exp-{i}", arms=("control", "t1"), n_batches=3)
        for off, value in enumerate(recs):
            source.apply_summary(value, topic="summaries", partition=0, offset=off)
    snaps = {e: source.states[e].snapshot(source.version) for e in source.states}
    state = await make_topic("state", partitions=1, compact=True)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for e, snap in snaps.items():
            await producer.send_and_wait(state, orjson.dumps(snap), key=e.encode())
    finally:
        await producer.stop()
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap},
        topics={"state": state, "partitions": 1, **topics},
        evaluate={"group_id": group} if group else {},
    )
    stage = EvaluateStage(settings, experiments, Metrics(CollectorRegistry()), Health())
    return stage, snaps


async def test_restore_loads_every_snapshot_and_reenables_the_gc(kafka_bootstrap, make_topic):
    stage, snaps = await _stage_with_state(kafka_bootstrap, make_topic)
    assert gc.isenabled()
    await stage._restore(0)
    assert gc.isenabled()
    # Read and stashed: ready at once; decoded on first use or in idle time.
    assert sorted(stage.engine.pending) == sorted(snaps) and not stage.engine.states
    assert stage.engine.restore_pending(10**9) == 0
    assert sorted(stage.engine.states) == sorted(snaps)
    for e, snap in snaps.items():
        assert stage.engine.states[e].snapshot(stage.engine.version) == snap
        assert stage._owner[e] == 0


async def test_restore_leaves_a_disabled_gc_disabled(kafka_bootstrap, make_topic):
    stage, snaps = await _stage_with_state(kafka_bootstrap, make_topic)
    gc.disable()
    try:
        await stage._restore(0)
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert sorted(stage.engine.experiment_ids()) == sorted(snaps)


async def test_the_running_stage_freezes_the_heap_once_the_restored_state_is_decoded(
    kafka_bootstrap, make_topic, unique, monkeypatch
):
    """Restored experiments live as long as their partition: once the idle loop has decoded
    every stashed snapshot the stage freezes the heap again (daemon/heap.py), once."""
    import asyncio

    from armguard.daemon import evaluate

    calls: list[int] = []
    monkeypatch.setattr(evaluate, "refreeze_heap", lambda: calls.append(len(stage.engine.pending)))
    stage, snaps = await _stage_with_state(
        kafka_bootstrap,
        make_topic,
        group=f"evaluate-{unique}",
        summaries=await make_topic("summaries", partitions=1),
        commands=await make_topic("commands", partitions=1),
        killswitch=await make_topic("killswitch", partitions=1, compact=True),
        decisions=await make_topic("decisions", partitions=1),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(stage.run(stop))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not calls:
            if task.done():
                task.result()
            assert loop.time() < deadline, "the heap was never frozen after the restore"
            await asyncio.sleep(0.05)  # polling the stage's progress, not synchronisation
        assert sorted(stage.engine.states) == sorted(snaps)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert calls == [0]  # once, with nothing left stashed
