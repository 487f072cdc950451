"""The process's use of the cyclic garbage collector.

armguard's long-lived objects (the configuration, the compiled data contract, the evaluate
stage's restored experiments) make no reference cycles, yet every full collection traverses
them again, and the hot paths allocate enough (a record object and a decoded dict per event)
that full collections run every few thousand events. ``gc.freeze`` moves every live object to
the permanent generation, which collections skip; objects frozen there are still freed by
reference counting, only cycles among them would no longer be found.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["YOUNG_THRESHOLD", "gc_paused", "prepare_heap", "refreeze_heap"]


# Collect the young generation every this many net allocations of tracked objects (Python's
# default is 700). Ingest holds a getmany batch of up to 50,000 record objects while it folds
# them: at 700 they were traversed in young collections, promoted and traversed again in full
# ones before being freed a moment later. At 20,000 ingest spends ~4-5% less CPU per event
# (bench/ingest.py child runs alternated, 6 each: 10,000 experiments 1.755 -> 1.69 s median
# CPU for 400,000 events, 10 experiments 1.32 -> 1.25). Objects freed by reference counting
# (almost all) are unaffected; cyclic garbage waits for at most 20,000 allocations.
YOUNG_THRESHOLD = 20_000


def prepare_heap() -> None:
    """Set the collector up for the daemon, once start-up has built its long-lived objects.

    The configuration, the compiled data contract and the imported modules live as long as the
    process, yet every full collection traverses them again: with 10,000 configured experiments
    that traversal was ~45% of ingest's consume time (``getmany`` 0.8 -> 0.35 s CPU per 200,000
    events, bench/ingest.py). One collection first, so no cyclic garbage of the start-up is
    kept; ``gc.freeze`` then moves every live object to the permanent generation. Then the young
    generation's threshold is raised to :data:`YOUNG_THRESHOLD` (never lowered, and left at 0
    if automatic collection was turned off).
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if young:
        gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)


def refreeze_heap() -> None:
    """Freeze again, after a stage built long-lived state (the evaluate stage's restored
    experiments: ~5x cheaper full collections at 5,000 experiments, bench/drift.py --only
    batched). Unfreezing first lets one full collection find whatever died in reference cycles
    since the last freeze (a revoked partition's Kafka clients, say), so repeated rebalances
    do not pile frozen garbage up."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


# Open gc_paused() regions of the process, and whether the collector was on before the first.
_pause = {"depth": 0, "resume": False}


@contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the cyclic collector off for the block: for work that allocates many tracked
    objects which die by reference counting soon after (a fetched batch, a flush, decoded
    snapshots), so collections would only traverse them, promote them and traverse them again.

    Regions may overlap across ``await``: the stages of one process share the collector, so it
    is switched back on when the last open region ends (and only if it was on when the first
    began), never by a region that ends while another is still open. Objects freed meanwhile
    are freed as usual; only cyclic garbage waits for the end of the regions.

    Examples
    --------
    >>> import gc
    >>> with gc_paused():
    ...     with gc_paused():
    ...         pass
    ...     print(gc.isenabled())
    False
    >>> gc.isenabled()
    True
    """
    if _pause["depth"] == 0:
        _pause["resume"] = gc.isenabled()
        gc.disable()
    _pause["depth"] += 1
    try:
        yield
    finally:
        _pause["depth"] -= 1
        if _pause["depth"] == 0 and _pause["resume"]:
            gc.enable()
