"""The process's collector policy: gc_paused regions that overlap across tasks."""

from __future__ import annotations

import asyncio
import gc

import pytest

from armguard.daemon.heap import gc_paused


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_a_region_switches_the_collector_off_and_back_on(collector_on):
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_region_ended_by_an_exception_switches_it_back_on(collector_on):
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off():
    was = gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


async def test_overlapping_regions_of_two_tasks_resume_only_after_the_last(collector_on):
    # Task a opens first and closes first, while task b's region (opened later) is still
    # open: the collector must stay off until b closes too.
    a_open, b_open, a_closed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen: dict[str, bool] = {}

    async def a() -> None:
        with gc_paused():
            a_open.set()
            await b_open.wait()
        seen["after a closed"] = gc.isenabled()
        a_closed.set()

    async def b() -> None:
        await a_open.wait()
        with gc_paused():
            b_open.set()
            await a_closed.wait()
            seen["inside b after a closed"] = gc.isenabled()
        seen["after b closed"] = gc.isenabled()

    await asyncio.gather(a(), b())
    assert seen == {
        "after a closed": False,
        "inside b after a closed": False,
        "after b closed": True,
    }
