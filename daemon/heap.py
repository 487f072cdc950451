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

__all__ = ["freeze_startup_heap", "refreeze_heap"]


def freeze_startup_heap() -> None:
    """Take the objects built at start-up out of the cyclic garbage collector's reach.

    The configuration, the compiled data contract and the imported modules live as long as the
    process, yet every full collection traverses them again; the hot loop allocates enough
    (a record object and a decoded dict per event) that full collections run every few
    thousand events. With 10,000 configured experiments that traversal was ~45% of ingest's
    consume time (``getmany`` 0.8 -> 0.35 s CPU per 200,000 events, bench/ingest.py). One
    collection first, so no cyclic garbage of the start-up is kept; ``gc.freeze`` then moves
    every live object to the permanent generation (objects freed by reference counting still
    are; only cycles among them would no longer be found, and these never become garbage).
    """
    gc.collect()
    gc.freeze()


def refreeze_heap() -> None:
    """Freeze again, after a stage built long-lived state (the evaluate stage's restored
    experiments: ~5x cheaper full collections at 5,000 experiments, bench/drift.py --only
    batched). Unfreezing first lets one full collection find whatever died in reference cycles
    since the last freeze (a revoked partition's Kafka clients, say), so repeated rebalances
    do not pile frozen garbage up."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
