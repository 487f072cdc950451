"""Follow armguard's kill switch from any Python service: ``allowed(experiment, arm)`` in O(1).

:class:`KillSwitchFollower` reads the compacted ``armguard.killswitch`` topic (and, optionally, the
``armguard.state`` snapshots for guardrail status) with ``isolation_level=read_committed``. It
bootstraps by reading every partition from the beginning up to its last stable offset as measured
at start, then reports :attr:`~KillSwitchFollower.ready` and keeps streaming changes. It holds the
latest desired state per experiment (the highest revision wins, so a stale or replayed event never
rolls a kill back) and calls your callbacks when an experiment changes after ready.

:class:`ThreadedKillSwitchFollower` runs the same follower on its own event loop in a daemon
thread, for synchronous applications; ``allowed()`` is then a plain dictionary read.

Defaults, exactly
-----------------
``allowed(experiment, arm)`` answers:

* ``True`` / ``False`` from the latest event once ready: an arm may receive traffic iff its own
  state is ``running`` and the experiment's state is ``running``.
* ``default`` (``fail_open=True`` -> ``True``, ``fail_open=False`` -> ``False``) before the
  bootstrap has finished (even for experiments already read: an older revision may still be
  followed by a newer one further on), for an experiment armguard has never published an event
  for, and for an arm that the experiment's latest event does not list.

armguard never writes tombstones, so a killed experiment stays killed in the compacted topic until
an operator resumes it (a new revision with state ``running``). The follower cannot tell
"never published" from "forgotten" (for example a deleted and recreated topic): both answer the
default, so with ``fail_open=True`` such an experiment is allowed. Choose ``fail_open=False`` to
deny everything armguard has not explicitly declared running, including new experiments until
the evaluate stage publishes their first revision.

The partitions are those of the topic when the follower starts (a missing topic is waited for,
not ready meanwhile); partitions added later are read after a restart.

Records that are not a valid kill-switch event (not JSON, not CloudEvents 1.0, wrong type, a data
section that breaks the contract, a key that differs from the experiment, a tombstone) are skipped
and counted by reason in :attr:`~KillSwitchFollower.skipped`; the last good state is kept.

Examples
--------
Parsing and applying events is pure, so it works without a broker:

>>> table = KillSwitchTable()
>>> ev = orjson.dumps({"specversion": "1.0", "id": "1", "source": "armguard",
...     "type": "armguard.killswitch.v1", "subject": "ranker-v2", "time": "2025-11-28T03:20:00Z",
...     "data": {"experiment": "ranker-v2", "revision": 3, "state": "running",
...              "arms": {"control": "running", "treatment": "killed"}, "cause": "guardrail"}})
>>> table.apply(parse_killswitch(b"ranker-v2", ev))
'applied'
>>> table.allowed("ranker-v2", "control"), table.allowed("ranker-v2", "treatment")
(True, False)
>>> table.apply(parse_killswitch(b"ranker-v2", ev))
'duplicate'
>>> try:
...     parse_killswitch(b"ranker-v2", b"{not json")
... except RecordRejected as exc:
...     print(exc.reason)
not_json
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import orjson

from .errors import RecordRejected

__all__ = [
    "ARM_STATES",
    "EXPERIMENT_STATES",
    "ExperimentStatus",
    "ExperimentView",
    "KillSwitchFollower",
    "KillSwitchTable",
    "ThreadedKillSwitchFollower",
    "parse_killswitch",
    "parse_state",
]

log = logging.getLogger("armguard.follower")

KILLSWITCH_TYPE = "armguard.killswitch.v1"
EXPERIMENT_STATES = frozenset({"running", "paused", "killed"})
ARM_STATES = EXPERIMENT_STATES
_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ExperimentView:
    """The latest kill-switch event of one experiment, as the follower holds it.

    ``allowed`` maps every arm of the event to whether it may receive traffic. ``data`` is the
    event's whole ``data`` object (decision, guardrails, config version, offsets).
    """

    experiment: str
    revision: int
    state: str
    arms: Mapping[str, str]
    allowed: Mapping[str, bool]
    cause: str | None = None
    event_id: str | None = None
    time: str | None = None
    data: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class ExperimentStatus:
    """The status part of the latest ``armguard.state`` snapshot of one experiment.

    ``internal`` is dropped: it is opaque to everyone but the evaluate stage.
    """

    experiment: str
    revision: int
    config_version: str | None
    desired: Mapping[str, Any]
    status: Mapping[str, Any]


def _reject(reason: str, detail: str = "") -> RecordRejected:
    return RecordRejected(reason, detail)


def _decode(value: bytes | None) -> Any:
    if value is None:
        raise _reject("tombstone", "armguard never writes tombstones; the last state is kept")
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise _reject("not_json", str(exc)) from None


def _key(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        raise _reject("bad_key", "the key is not UTF-8") from None


def _revision(data: Mapping[str, Any]) -> int:
    rev = data.get("revision")
    if isinstance(rev, bool) or not isinstance(rev, int) or rev < 0:
        raise _reject("bad_data", f"revision must be a non-negative integer, got {rev!r}")
    return rev


def parse_killswitch(key: bytes | None, value: bytes | None) -> ExperimentView:
    """Decode one ``armguard.killswitch`` record, or raise :class:`RecordRejected` with a reason.

    Reasons: ``tombstone``, ``not_json``, ``bad_key``, ``not_cloudevent`` (not a CloudEvents 1.0
    object), ``wrong_type`` (``type`` is not ``armguard.killswitch.v1``), ``bad_data`` (the data
    section breaks the contract) and ``key_mismatch`` (the key names another experiment).
    """
    k = _key(key)
    event = _decode(value)
    if not isinstance(event, dict) or event.get("specversion") != "1.0":
        raise _reject("not_cloudevent", "expected a CloudEvents 1.0 JSON object")
    if event.get("type") != KILLSWITCH_TYPE:
        raise _reject("wrong_type", f"type must be {KILLSWITCH_TYPE!r}, got {event.get('type')!r}")
    data = event.get("data")
    if not isinstance(data, dict):
        raise _reject("bad_data", "data must be an object")
    experiment = data.get("experiment")
    if not isinstance(experiment, str) or not experiment:
        raise _reject("bad_data", "data.experiment must be a non-empty string")
    if k is not None and k != experiment:
        raise _reject("key_mismatch", f"key {k!r} but data.experiment {experiment!r}")
    revision = _revision(data)
    state = data.get("state")
    if state not in EXPERIMENT_STATES:
        raise _reject("bad_data", f"data.state must be one of {sorted(EXPERIMENT_STATES)}")
    arms = data.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise _reject("bad_data", "data.arms must be a non-empty object of arm -> state")
    for arm, arm_state in arms.items():
        if not arm or arm_state not in ARM_STATES:
            raise _reject("bad_data", f"data.arms[{arm!r}] must be one of {sorted(ARM_STATES)}")
    cause = data.get("cause")
    event_time = event.get("time")
    event_id = event.get("id")
    running = state == "running"
    return ExperimentView(
        experiment=experiment,
        revision=revision,
        state=state,
        arms=MappingProxyType(dict(arms)),
        allowed=MappingProxyType({a: running and s == "running" for a, s in arms.items()}),
        cause=cause if isinstance(cause, str) else None,
        event_id=event_id if isinstance(event_id, str) else None,
        time=event_time if isinstance(event_time, str) else None,
        data=MappingProxyType(data),
    )


def parse_state(key: bytes | None, value: bytes | None) -> ExperimentStatus:
    """Decode one ``armguard.state`` snapshot, or raise :class:`RecordRejected` with a reason."""
    k = _key(key)
    snap = _decode(value)
    if not isinstance(snap, dict) or snap.get("v") != 1:
        raise _reject("bad_data", "a state snapshot is a JSON object with v = 1")
    experiment = snap.get("experiment")
    if not isinstance(experiment, str) or not experiment:
        raise _reject("bad_data", "experiment must be a non-empty string")
    if k is not None and k != experiment:
        raise _reject("key_mismatch", f"key {k!r} but experiment {experiment!r}")
    revision = _revision(snap)
    desired = snap.get("desired") or {}
    status = snap.get("status") or {}
    if not isinstance(desired, dict) or not isinstance(status, dict):
        raise _reject("bad_data", "desired and status must be objects")
    cv = snap.get("config_version")
    return ExperimentStatus(
        experiment=experiment,
        revision=revision,
        config_version=cv if isinstance(cv, str) else None,
        desired=MappingProxyType(desired),
        status=MappingProxyType(status),
    )


Applied = Literal["applied", "duplicate", "stale"]


class KillSwitchTable:
    """Latest kill-switch view and status per experiment; the highest revision wins.

    Pure and synchronous: the follower feeds it, tests drive it with plain values. Reads are
    lock-free dictionary lookups, safe from other threads (a whole view is replaced atomically).
    """

    def __init__(self) -> None:
        self._views: dict[str, ExperimentView] = {}
        self._status: dict[str, ExperimentStatus] = {}
        #: Bumped on every applied change; the HTTP layer derives ETags and caches from it.
        self.version = 0

    def apply(self, view: ExperimentView) -> Applied:
        """Keep ``view`` if its revision is newer than the one held."""
        old = self._views.get(view.experiment)
        if old is not None and view.revision <= old.revision:
            return "duplicate" if view.revision == old.revision else "stale"
        self._views[view.experiment] = view
        self.version += 1
        return "applied"

    def apply_status(self, status: ExperimentStatus) -> Applied:
        """Keep ``status`` if its revision is not older than the one held.

        Snapshots may repeat a revision with fresher guardrail rows, so an equal revision replaces.
        """
        old = self._status.get(status.experiment)
        if old is not None and status.revision < old.revision:
            return "stale"
        self._status[status.experiment] = status
        self.version += 1
        return "applied"

    def allowed(self, experiment: str, arm: str, default: bool = True) -> bool:
        """Whether ``arm`` may receive traffic; ``default`` when the experiment or arm is unknown."""
        view = self._views.get(experiment)
        if view is None:
            return default
        return view.allowed.get(arm, default)

    def get(self, experiment: str) -> ExperimentView | None:
        return self._views.get(experiment)

    def status(self, experiment: str) -> ExperimentStatus | None:
        return self._status.get(experiment)

    def experiments(self) -> list[str]:
        """Every experiment with a kill-switch event or a status snapshot, sorted."""
        return sorted(self._views.keys() | self._status.keys())

    def __len__(self) -> int:
        return len(self._views)


Callback = Callable[[str, ExperimentView | None, ExperimentView], Awaitable[None] | None]


class KillSwitchFollower:
    """Follow ``armguard.killswitch`` (and optionally ``armguard.state``) on the running loop.

    Parameters
    ----------
    kafka
        The ``kafka`` settings section (:class:`~armguard.daemon.settings.KafkaSettings`); the
        client options come from :func:`armguard.daemon.kafka.kafka_options`.
    topic
        The kill-switch topic.
    state_topic
        Also follow this ``armguard.state`` topic for guardrail status (the status API does).
    fail_open
        The answer of :meth:`allowed` while not ready and for unknown experiments or arms.
    poll_timeout_ms
        Longest wait for new records in one fetch.
    metrics, health
        Optional daemon :class:`~armguard.daemon.metrics.Metrics` and
        :class:`~armguard.daemon.health.Health`: records consumed/skipped and consumer lag are
        exported, the loop beats and readiness is reported as component ``killswitch-follower``.

    Use it as an async context manager (which waits until ready), or call :meth:`run` under a
    supervisor (it returns once ``stop`` is set). Callbacks registered with :meth:`on_change`
    run on the event loop for every change applied after ready; a callback that raises is logged
    and counted in ``callback_errors``, and never stops the follower.
    """

    name = "killswitch-follower"

    def __init__(
        self,
        kafka: Any,
        *,
        topic: str = "armguard.killswitch",
        state_topic: str | None = None,
        fail_open: bool = True,
        poll_timeout_ms: int = 200,
        metrics: Any = None,
        health: Any = None,
    ):
        if not isinstance(fail_open, bool):
            raise ValueError(f"fail_open must be True or False, got {fail_open!r}")
        if poll_timeout_ms < 0:
            raise ValueError(f"poll_timeout_ms must be >= 0, got {poll_timeout_ms!r}")
        self.kafka = kafka
        self.topic = topic
        self.state_topic = state_topic
        self.fail_open = fail_open
        self.poll_timeout_ms = poll_timeout_ms
        self.metrics = metrics
        self.health = health
        self.table = KillSwitchTable()
        self.skipped: Counter[str] = Counter()
        self.records = 0
        self.applied = 0
        self.callback_errors = 0
        self.last_record_monotonic: float | None = None
        self._ready = False
        self._ready_event = asyncio.Event()
        self._callbacks: list[Callback] = []
        self._callback_tasks: set[asyncio.Future[Any]] = set()
        self._lag: dict[Any, int] = {}
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # -- reading ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once every partition was read up to its last stable offset measured at start."""
        return self._ready

    @property
    def lag(self) -> int | None:
        """Records between the follower's position and the last stable offsets (None before the
        first fetch)."""
        return sum(self._lag.values()) if self._lag else None

    def allowed(self, experiment: str, arm: str) -> bool:
        """Whether ``arm`` of ``experiment`` may receive traffic (see the module's defaults)."""
        if not self._ready:
            return self.fail_open
        return self.table.allowed(experiment, arm, self.fail_open)

    def get(self, experiment: str) -> ExperimentView | None:
        """The latest kill-switch view of ``experiment`` (None if unknown)."""
        return self.table.get(experiment)

    def status(self, experiment: str) -> ExperimentStatus | None:
        """The latest status snapshot of ``experiment`` (None if unknown or not followed)."""
        return self.table.status(experiment)

    def on_change(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(experiment, old_view, new_view)`` on each change after ready.

        Returns a function that unregisters it.
        """
        self._callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return remove

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        return (
            f"{self.name}: {self.records} records, {self.applied} applied, {skipped} skipped "
            f"({', '.join(f'{k}={v}' for k, v in sorted(self.skipped.items())) or 'none'}), "
            f"{len(self.table)} experiments, lag {self.lag}"
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until ready; re-raises the follower's error if it failed meanwhile."""
        waiter = asyncio.ensure_future(self._ready_event.wait())
        pending: set[asyncio.Future[Any]] = {waiter}
        if self._task is not None:
            pending.add(self._task)
        try:
            done, _ = await asyncio.wait(
                pending, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if self._task is not None and self._task in done:
            self._task.result()  # raises the follower's error
            raise RuntimeError("the follower stopped before it was ready")
        if not self._ready:
            raise TimeoutError(f"the kill-switch follower was not ready within {timeout_s} s")

    async def start(self) -> None:
        """Run the follower as a task of the running loop (see :meth:`stop`)."""
        if self._task is not None:
            raise RuntimeError("the follower is already started")
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.run(self._stop), name=self.name)

    async def stop(self) -> None:
        """Stop the task started by :meth:`start`; re-raises its error if it failed."""
        task, self._task = self._task, None
        if task is None:
            return
        assert self._stop is not None
        self._stop.set()
        await task

    async def __aenter__(self) -> KillSwitchFollower:
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Follow until ``stop`` is set. Raises on unknown failures (the supervisor stops all)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from .kafka import kafka_options

        options = dict(kafka_options(self.kafka))
        options["client_id"] = f"{options.get('client_id') or 'armguard'}-follower"
        consumer = AIOKafkaConsumer(
            **options,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        )
        self._set_ready(False)
        await consumer.start()
        try:
            topics = [self.topic] + ([self.state_topic] if self.state_topic else [])
            tps: list[TopicPartition] = []
            for topic in topics:
                parts = await self._wait_for_topic(consumer, topic, stop)
                if parts is None:
                    return
                tps.extend(TopicPartition(topic, p) for p in sorted(parts))
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            remaining = {tp: off for tp, off in end.items() if off > 0}
            self._lag = dict(remaining)
            if not remaining:
                self._became_ready()
            while not stop.is_set():
                if self.health is not None:
                    self.health.beat(self.name)
                batches = await consumer.getmany(timeout_ms=self.poll_timeout_ms)
                for tp, records in batches.items():
                    for record in records:
                        self._on_record(tp.topic, record.key, record.value)
                for tp in tps:
                    pos = await consumer.position(tp)
                    lso = consumer.last_stable_offset(tp)
                    if lso is None:
                        lso = consumer.highwater(tp)
                    if lso is not None:
                        self._lag[tp] = max(0, lso - pos)
                        if self.metrics is not None:
                            self._export_lag(tp, self._lag[tp])
                    if tp in remaining and pos >= remaining[tp]:
                        del remaining[tp]
                if not self._ready and not remaining:
                    self._became_ready()
        finally:
            self._set_ready(False)
            await consumer.stop()

    async def _wait_for_topic(self, consumer: Any, topic: str, stop: asyncio.Event) -> Any:
        logged = False
        while not stop.is_set():
            # consumer.topics() fetches fresh metadata but does not update what
            # partitions_for_topic() reads, so ask the returned cluster view directly.
            cluster = await consumer._client.fetch_all_metadata()
            parts = cluster.partitions_for_topic(topic)
            if parts:
                return parts
            if not logged:
                log.warning("topic %s does not exist yet; the follower waits for it", topic)
                logged = True
            if self.health is not None:
                self.health.beat(self.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        return None

    # -- internals -------------------------------------------------------------------------------

    def _set_ready(self, ready: bool) -> None:
        self._ready = ready
        if ready:
            self._ready_event.set()
        else:
            self._ready_event.clear()
        if self.health is not None:
            self.health.set_ready(self.name, ready)

    def _became_ready(self) -> None:
        log.info(
            "kill-switch follower ready: %d experiments after %d records (%d skipped)",
            len(self.table),
            self.records,
            sum(self.skipped.values()),
        )
        self._set_ready(True)

    def _on_record(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        self.records += 1
        self.last_record_monotonic = time.monotonic()
        m = self.metrics
        if m is not None:
            m.records_consumed.labels(topic=topic).inc()
        try:
            if topic == self.topic:
                view = parse_killswitch(key, value)
                old = self.table.get(view.experiment)
                outcome = self.table.apply(view)
            else:
                outcome = self.table.apply_status(parse_state(key, value))
                view = old = None
        except RecordRejected as exc:
            self._skip(topic, exc.reason)
            log.warning("skipped an invalid record on %s: %s", topic, exc)
            return
        if outcome != "applied":
            self._skip(topic, f"{outcome}_revision")
            return
        self.applied += 1
        if view is not None and self._ready:
            self._notify(view.experiment, old, view)

    def _skip(self, topic: str, reason: str) -> None:
        self.skipped[reason] += 1
        if self.metrics is not None:
            self.metrics.records_skipped.labels(topic=topic, reason=reason).inc()

    def _export_lag(self, tp: Any, lag: int) -> None:
        self.metrics.consumer_lag.labels(
            group=self.name, topic=tp.topic, partition=str(tp.partition)
        ).set(lag)

    def _notify(self, experiment: str, old: ExperimentView | None, new: ExperimentView) -> None:
        for cb in list(self._callbacks):
            try:
                result = cb(experiment, old, new)
                if asyncio.iscoroutine(result):
                    task = asyncio.ensure_future(result)
                    self._callback_tasks.add(task)
                    task.add_done_callback(self._callback_done)
            except Exception:
                self.callback_errors += 1
                log.exception("a kill-switch callback failed for %s", experiment)

    def _callback_done(self, task: asyncio.Future[Any]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.callback_errors += 1
            log.error("a kill-switch callback failed: %r", task.exception())


class ThreadedKillSwitchFollower:
    """A :class:`KillSwitchFollower` on its own event loop in a daemon thread, for sync apps.

    ``start(timeout_s)`` blocks until ready (or raises ``TimeoutError``, leaving the follower
    running and answering the default); ``allowed()`` reads a dictionary and never blocks.
    Callbacks run on the follower's thread. Use it as a context manager.

    ``ready_timeout_s`` bounds the wait of ``start()`` and of ``with`` (which stops the thread
    again when it times out); the other parameters are those of :class:`KillSwitchFollower`.
    """

    def __init__(self, kafka: Any, *, ready_timeout_s: float | None = 30.0, **kwargs: Any):
        self.ready_timeout_s = ready_timeout_s
        self._kwargs = kwargs
        self._kafka = kafka
        self.follower: KillSwitchFollower | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._fail_open = bool(kwargs.get("fail_open", True))

    def start(self, timeout_s: float | None = None) -> ThreadedKillSwitchFollower:
        """Start the thread and wait until ready (``timeout_s``, default ``ready_timeout_s``)."""
        if timeout_s is None:
            timeout_s = self.ready_timeout_s
        if self._thread is not None:
            raise RuntimeError("the follower is already started")
        self._thread = threading.Thread(target=self._main, name="armguard-follower", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        assert self._loop is not None and self.follower is not None
        fut = asyncio.run_coroutine_threadsafe(self.follower.wait_ready(timeout_s), self._loop)
        fut.result()
        return self

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._amain())
        except BaseException as exc:  # surfaced by stop()/start()
            self._error = exc
        finally:
            self._started.set()
            loop.close()

    async def _amain(self) -> None:
        try:
            self.follower = KillSwitchFollower(self._kafka, **self._kwargs)
            self._stop = asyncio.Event()
        finally:
            self._started.set()
        await self.follower.run(self._stop)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; re-raises the follower's error if it failed."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        thread.join(timeout_s)
        if self._error is not None:
            raise self._error

    def __enter__(self) -> ThreadedKillSwitchFollower:
        try:
            return self.start()
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def ready(self) -> bool:
        return self.follower is not None and self.follower.ready

    @property
    def lag(self) -> int | None:
        return self.follower.lag if self.follower is not None else None

    def allowed(self, experiment: str, arm: str) -> bool:
        f = self.follower
        return f.allowed(experiment, arm) if f is not None else self._fail_open

    def get(self, experiment: str) -> ExperimentView | None:
        return self.follower.get(experiment) if self.follower is not None else None

    def on_change(self, callback: Callback) -> Callable[[], None]:
        if self.follower is None:
            raise RuntimeError("start() the follower before registering callbacks")
        return self.follower.on_change(callback)
