"""Liveness and readiness of the daemon, as the HTTP probes report them.

Liveness (``/healthz``): every loop that has beaten has done so within its stall limit. A loop
stuck on a hung broker call or a busy event loop stops beating, the probe fails, and the
orchestrator restarts the process (the committed offsets and the state topic make that safe).

Readiness (``/readyz``): at least one component has reported, and every component is ready:
partitions assigned and, for the evaluator, state restored. A stage reports ``False`` as soon as
it starts (or on a revocation) and ``True`` when it can process input.

Time is injected (``clock``), so tests need no sleeping.

Examples
--------
>>> now = [0.0]
>>> h = Health(stall_after_s=30.0, clock=lambda: now[0])
>>> h.beat("ingest")
>>> h.set_ready("ingest", False)
>>> h.live, h.ready
(True, False)
>>> h.set_ready("ingest", True)
>>> now[0] = 31.0
>>> h.live, h.ready
(False, True)
>>> h.stalled()
['ingest']
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Health"]


class Health:
    """Heartbeats of the daemon's loops and readiness of its components.

    Parameters
    ----------
    stall_after_s
        Default time without a beat after which a loop counts as stuck.
    clock
        Monotonic seconds; ``time.monotonic`` unless a test injects one.
    """

    def __init__(
        self,
        *,
        stall_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not (isinstance(stall_after_s, int | float) and math.isfinite(stall_after_s)) or (
            stall_after_s <= 0
        ):
            raise ValueError(f"stall_after_s must be a positive number, got {stall_after_s!r}")
        self.stall_after_s = float(stall_after_s)
        self._clock = clock
        self._beats: dict[str, float] = {}
        self._limits: dict[str, float] = {}
        self._ready: dict[str, bool] = {}

    def beat(self, loop: str, *, stall_after_s: float | None = None) -> None:
        """Record that ``loop`` made progress; call it once per iteration.

        ``stall_after_s`` sets this loop's own limit (kept for later beats); give loops that
        legitimately block longer (e.g. a poll with a long timeout) a limit above that time.
        """
        if stall_after_s is not None:
            if stall_after_s <= 0:
                raise ValueError(f"stall_after_s must be > 0, got {stall_after_s!r}")
            self._limits[loop] = float(stall_after_s)
        self._beats[loop] = self._clock()

    def done(self, loop: str) -> None:
        """Forget ``loop`` (it finished on purpose), so its silence is not a stall."""
        self._beats.pop(loop, None)
        self._limits.pop(loop, None)

    def set_ready(self, component: str, ready: bool) -> None:
        """Report whether ``component`` can process input (partitions assigned, state restored)."""
        self._ready[component] = bool(ready)

    def stalled(self) -> list[str]:
        """The loops whose last beat is older than their limit, sorted."""
        now = self._clock()
        return sorted(
            name
            for name, at in self._beats.items()
            if now - at > self._limits.get(name, self.stall_after_s)
        )

    @property
    def live(self) -> bool:
        """True while no loop is stuck."""
        return not self.stalled()

    @property
    def ready(self) -> bool:
        """True when some component reported and every component is ready."""
        return bool(self._ready) and all(self._ready.values())

    def report(self) -> dict[str, Any]:
        """A JSON-serialisable view for the probes' response bodies."""
        now = self._clock()
        loops = {
            name: {
                "seconds_since_beat": round(now - at, 3),
                "stall_after_s": self._limits.get(name, self.stall_after_s),
                "ok": now - at <= self._limits.get(name, self.stall_after_s),
            }
            for name, at in sorted(self._beats.items())
        }
        return {
            "live": all(v["ok"] for v in loops.values()),
            "ready": self.ready,
            "loops": loops,
            "components": dict(sorted(self._ready.items())),
        }
