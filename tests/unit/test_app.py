"""The daemon supervisor's start-up: the objects built before the stages run are frozen out of
the cyclic garbage collector's scans (bench/ingest.py measured full collections traversing a
10,000-experiment configuration as ~45% of ingest's consume time)."""

from __future__ import annotations

import asyncio
import gc
import weakref

from armguard.daemon.app import Daemon
from armguard.daemon.experiments import parse_experiments
from armguard.daemon.heap import YOUNG_THRESHOLD, refreeze_heap
from armguard.daemon.settings import Settings

EXPERIMENTS = parse_experiments(
    """
experiments:
  - id: checkout
    control: control
    arms: {control: 0.5, treatment: 0.5}
    metrics:
      latency_ms: {min: 0}
""",
    where="test.yaml",
)


class Probe:
    """A stage that looks at the collector when the supervisor starts it, then stops."""

    name = "probe"

    def __init__(self, watched: object):
        self.watched = watched
        self.seen: dict[str, object] = {}

    async def run(self, stop: asyncio.Event) -> None:
        tracked = {id(o) for o in gc.get_objects()}  # the generations a collection scans
        self.seen["frozen"] = gc.get_freeze_count()
        self.seen["threshold"] = gc.get_threshold()
        self.seen["config_scanned"] = id(self.watched) in tracked
        stop.set()

    def summary(self) -> str:
        return "probe"


async def test_start_up_objects_are_frozen_before_the_stages_run():
    settings = Settings(
        ingest={"enabled": False},
        evaluate={"enabled": False},
        topics={"create": False},
        http={"port": 0},
    )
    daemon = Daemon(settings, EXPERIMENTS)
    watched = daemon.experiments.experiments[0].metrics  # a dict built at start-up
    assert gc.is_tracked(watched)
    gc.unfreeze()
    assert id(watched) in {id(o) for o in gc.get_objects()}
    probe = Probe(watched)
    threshold = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # Python's default
    try:
        await daemon.run(extra=[probe])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
    assert probe.seen["frozen"] > 0
    assert probe.seen["config_scanned"] is False
    assert probe.seen["threshold"] == (YOUNG_THRESHOLD, 10, 10)


class _Node:
    pass


def test_refreeze_collects_the_cycles_that_died_while_frozen():
    node = _Node()
    node.loop = node  # a reference cycle: only the cyclic collector frees it
    alive = weakref.ref(node)
    gc.collect()
    gc.freeze()
    try:
        del node
        gc.collect()
        assert alive() is not None  # frozen: collections skip it
        refreeze_heap()
        assert alive() is None
        assert gc.get_freeze_count() > 0  # and what lives is frozen again
    finally:
        gc.unfreeze()
