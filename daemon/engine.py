"""The evaluate stage's pure core: summaries and operator commands in, decisions out.

Nothing here touches Kafka or reads a clock. The engine is a deterministic function of the
sequence of input records (and their offsets and Kafka timestamps), so the live daemon, a restart
from a snapshot and ``armguard replay`` reach the same decisions, with the same event ids.

Policy
------
* A guardrail is evaluated per treatment arm; its level is ``inconclusive`` until the data and the
  minimum sample size are there (never a pass, never a kill), then ``ok``, ``warn`` or ``breach``.
* A breach fires once per onset: the action (``alert``, ``pause``, ``kill``) is taken when the level
  enters ``breach`` and not again until it has left it. ``shadow`` guardrails record what would
  have fired and change nothing.
* ``pause`` and ``kill`` change the arm's desired state (kill outranks pause); an SRM breach acts
  on the whole experiment. The daemon never sets anything back to ``running``: only an operator's
  ``resume`` does, and the onset it resumed from stays consumed, so the resume is not undone.
* An operator ``override`` silences one guardrail (state ``overridden``) until it expires in event
  time; a breach still standing when it expires fires then.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from . import commands as cmds
from .errors import CommandRejected
from .events import DECISION_TYPE, KILLSWITCH_TYPE, cloud_event
from .experiments import ExperimentConfig, ExperimentsFile
from .guardrails import ArmData, GuardrailRunner, SrmRunner, make_runners
from .heap import gc_paused
from .summary_record import arm_states

__all__ = ["Engine", "ExperimentState", "Output", "Unreadable"]

SEVERITY = {"running": 0, "paused": 1, "killed": 2}
_MAX_SEEN_COMMANDS = 1000
# Records whose drift updates wait for one batch; the vectorised pass gains little past ~1,000.
_WAVE = 1024
# What reading a malformed record can raise (JSON errors are ValueErrors; an integer beyond
# int64 in a histogram is an OverflowError, a list where an object belongs an AttributeError):
# the record is counted and skipped. Escaping apply_summaries, any of them stopped the stage at
# every restart on the same record.
_MALFORMED = (ValueError, TypeError, LookupError, AttributeError, ArithmeticError)
# Revisions and decision sequence numbers: integers orjson encodes (it refuses beyond 64 bits).
_MAX_SEQ = 1 << 63
# Event times (Unix seconds) an event's RFC 3339 time can say: datetime's years 1 to 9999.
# (A command record without a Kafka timestamp has the time -0.001.)
_MIN_TS = -62_135_596_800.0
_MAX_TS = 253_402_300_800.0


def _seq(v: Any) -> int:
    """A revision or decision sequence number read from a snapshot, or ValueError."""
    if type(v) is not int or not 0 <= v < _MAX_SEQ:
        raise ValueError(f"not a sequence number: {v!r:.40}")
    return v


def _event_time(v: Any) -> float | None:
    """An event time read from a snapshot (None: not known yet), or ValueError."""
    if v is None:
        return None
    if type(v) not in (int, float) or not _MIN_TS <= v < _MAX_TS:
        raise ValueError(f"not an event time: {v!r:.40}")
    return float(v)


def _desired(d: Any) -> tuple[str, dict[str, str]]:
    state, arms = d["state"], d["arms"]
    if not isinstance(arms, dict):
        raise TypeError("desired arms must be an object")
    if state not in SEVERITY or any(v not in SEVERITY for v in arms.values()):
        raise ValueError(f"unknown desired state in {d!r:.80}")
    return state, arms


def _status(st: Any) -> tuple[float | None, dict[str, Any] | None]:
    last_ts, last_decision = _event_time(st.get("updated_ts")), st.get("last_decision")
    if last_decision is not None and not isinstance(last_decision, dict):
        raise TypeError("last_decision must be an object")
    return last_ts, last_decision


def _overrides(o: Any) -> dict[str, float]:
    out = {str(k): float(v) for k, v in o.items()}
    if not all(math.isfinite(v) for v in out.values()):
        raise ValueError("an override's expiry is not finite")
    return out


def _seen_commands(seen: Any) -> list[str]:
    if not isinstance(seen, list) or not all(isinstance(c, str) for c in seen):
        raise TypeError("seen_commands must be a list of command ids")
    return list(seen)


def _offset_ranges(ranges: Any) -> dict[str, list[int]]:
    """``{"topic:partition": [first, last]}`` as ``ExperimentState.offsets`` expands them."""
    out = {}
    for key, r in ranges.items():
        _, sep, part = key.rpartition(":")
        if not (sep and part.isdigit() and isinstance(r, list) and len(r) == 2):
            raise ValueError(f"not an offsets range: {key!r:.60}: {r!r:.60}")
        first, last = r
        if not (type(first) is int and type(last) is int and 0 <= first <= last < _MAX_SEQ):
            raise ValueError(f"not an offsets range: {key!r:.60}: {r!r:.60}")
        out[key] = [first, last]
    return out


def _check_proportions(data: ArmData, binary: set[tuple[str, str]]) -> None:
    """ValueError if a proportion guardrail's summary in ``data`` has a sum outside
    [0, count]: ProportionDifferenceTest raised on it at that and every later record (ingest
    holds such metrics to [0, 1], but a record or snapshot may come from elsewhere)."""
    for source, name in binary:
        b = data.get(source, name)
        if b is not None and not 0.0 <= b.sum <= b.count:
            raise ValueError(f"{name}: a proportion's sum is not in [0, count]")


def _next_tick(v: Any) -> float | None:
    if v is None:
        return None
    if type(v) not in (int, float) or not math.isfinite(v):
        raise ValueError(f"not an event time: {v!r:.40}")
    return float(v)


@dataclass(frozen=True, slots=True)
class Output:
    """A record for one of armguard's topics: ``kind`` is killswitch, decisions, state or
    deadletter (with ``headers``)."""

    kind: str
    key: bytes
    value: bytes | None  # None only for a dead letter too large to include
    outcome: str = ""  # the metric label: the action taken, or why a command was rejected
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A stashed snapshot that could not be restored, and what of it was kept.

    ``source`` is ``(partition, offset, timestamp)`` of its record on the state topic when
    :meth:`Engine.stash` was told them. The evaluate stage dead-letters ``value`` as it is.
    """

    experiment: str
    value: bytes
    reason: str
    kept: tuple[str, ...]
    source: tuple[int, int, int | None] | None


def _ranges_add(ranges: dict[str, list[int]], key: str, first: int, last: int) -> None:
    cur = ranges.get(key)
    if cur is None:
        ranges[key] = [first, last]
    else:
        cur[0] = min(cur[0], first)
        cur[1] = max(cur[1], last)


class ExperimentState:
    """Everything the evaluate stage knows about one experiment; snapshotted after each change."""

    def __init__(self, exp: ExperimentConfig):
        self.exp = exp
        self.id = exp.id
        self.revision = 0
        self.state = "running"
        self.arm_states = {a: "running" for a in exp.arms}
        self.arms: dict[str, ArmData] = {}
        self.interval: dict[str, ArmData] = {}
        self.next_tick: float | None = None
        self.runners: dict[str, GuardrailRunner] = make_runners(exp)
        self.srm = SrmRunner(exp) if exp.srm.enabled else None
        # (source, name) of the summaries a proportion test reads: 0 <= sum <= count each.
        self.binary = {(g.source, g.metric) for g in exp.guardrails if g.test == "proportion"}
        self.overrides: dict[str, float] = {}  # guardrail name -> expiry (event time)
        self.seen_commands: list[str] = []
        self.summary_offsets: dict[str, list[int]] = {}
        self.telemetry_offsets: dict[str, list[int]] = {}
        self.last_ts: float | None = None
        self.last_decision: dict[str, Any] | None = None
        self.decision_seq = 0

    # -- public views -------------------------------------------------------------------------
    def guardrail_state(self, r: GuardrailRunner) -> str:
        exp_at = self.overrides.get(r.g.name)
        if exp_at is not None and (self.last_ts is None or self.last_ts < exp_at):
            return "overridden"
        return r.status.level

    def rows(self) -> list[dict[str, Any]]:
        return [r.status.row(self.guardrail_state(r)) for r in self.runners.values()]

    def desired(self) -> dict[str, Any]:
        return {"state": self.state, "arms": dict(self.arm_states)}

    def offsets(self) -> dict[str, list[dict[str, Any]]]:
        def expand(ranges: dict[str, list[int]]) -> list[dict[str, Any]]:
            out = []
            for key, (first, last) in sorted(ranges.items()):
                topic, _, part = key.rpartition(":")
                out.append({"topic": topic, "partition": int(part), "first": first, "last": last})
            return out

        return {
            "summaries": expand(self.summary_offsets),
            "telemetry": expand(self.telemetry_offsets),
        }

    # -- snapshots ----------------------------------------------------------------------------
    def snapshot(self, config_version: str) -> dict[str, Any]:
        return {
            "v": 1,
            "experiment": self.id,
            "revision": self.revision,
            "config_version": config_version,
            "desired": self.desired(),
            "status": {
                "updated_ts": self.last_ts,
                "guardrails": self.rows(),
                "srm": None
                if self.srm is None
                else {"p_value": self.srm.p_value, "state": self.srm.level},
                "last_decision": self.last_decision,
            },
            "internal": {
                "arms": {a: d.to_state() for a, d in sorted(self.arms.items())},
                "interval": {a: d.to_state() for a, d in sorted(self.interval.items())},
                "next_tick": self.next_tick,
                "runners": {k: r.to_state() for k, r in sorted(self.runners.items())},
                "srm": None if self.srm is None else self.srm.to_state(),
                "overrides": dict(sorted(self.overrides.items())),
                "seen_commands": list(self.seen_commands),
                "summary_offsets": self.summary_offsets,
                "telemetry_offsets": self.telemetry_offsets,
                "decision_seq": self.decision_seq,
            },
        }

    @classmethod
    def restore(cls, exp: ExperimentConfig, snap: dict[str, Any]) -> ExperimentState:
        # The parts the engine goes on using are checked here: a value no armguard writes
        # failed later, out of the engine (at the next snapshot, event or comparison), where
        # it stopped the stage; refused here, the snapshot is salvaged instead (Engine._decoded).
        s = cls(exp)
        s.revision = _seq(snap["revision"])
        s.state, arms = _desired(snap["desired"])
        for arm, st in arms.items():
            if arm in s.arm_states:
                s.arm_states[arm] = st
        s.last_ts, s.last_decision = _status(snap.get("status") or {})
        internal = snap["internal"]
        s.arms = {a: ArmData.from_state(d) for a, d in internal["arms"].items()}
        s.interval = {a: ArmData.from_state(d) for a, d in internal["interval"].items()}
        for data in (*s.arms.values(), *s.interval.values()):
            _check_proportions(data, s.binary)  # as the records' check
        s.next_tick = _next_tick(internal["next_tick"])
        for key, rst in internal["runners"].items():
            # A guardrail removed from the config is dropped; a new one starts fresh and
            # catches up on the cumulative data at the next evaluation.
            # So does one that reads another metric or runs another test now (same name).
            r = s.runners.get(key)
            row = rst.get("status") or {}
            seen = (row.get("metric"), row.get("test")) if "metric" in row else None
            if r is not None and seen in (None, (r.g.metric, r.g.test)):
                r.restore(rst)
                # A sequential test that has seen more than the data holds (restored with
                # other data) raised "counts went down" at every record: it starts again too.
                if r.sequential and not r.fits(s.arms, rst["detector"]):
                    s.runners[key] = GuardrailRunner(exp, r.g, r.arm, r.alpha)
        # An SRM test of other arms or another split (the config changed), or that counted
        # more units than the data holds, raised "unknown arms" or "counts must be
        # cumulative" at every record, or tested the old split: it starts again instead.
        if s.srm is not None and internal.get("srm"):
            if s.srm.fits(s.arms, internal["srm"]["detector"]):
                s.srm.restore(internal["srm"])
        s.overrides = _overrides(internal["overrides"])
        s.seen_commands = _seen_commands(internal["seen_commands"])
        s.summary_offsets = _offset_ranges(internal["summary_offsets"])
        s.telemetry_offsets = _offset_ranges(internal["telemetry_offsets"])
        s.decision_seq = _seq(internal.get("decision_seq", 0))
        return s

    @classmethod
    def salvage(cls, exp: ExperimentConfig, snap: Any) -> tuple[ExperimentState, tuple[str, ...]]:
        """A fresh state with what an unreadable snapshot still says that the detectors do not.

        Kept where readable, each part whole or not at all: the desired states (a killed or
        paused arm stays so: only an operator resumes), the revision and decision sequence
        (event ids and sequence numbers never repeat), the operator overrides, the seen command
        ids (a command is not applied twice) and the status. The accumulated data, the
        detectors and the offsets that fed them start again, as for a new experiment.
        """
        s = cls(exp)
        kept: list[str] = []
        internal = snap.get("internal") if isinstance(snap, dict) else None
        internal = internal if isinstance(internal, dict) else {}

        # The same checks as restore's: a part kept here is one restore would have taken.
        def desired() -> None:
            s.state, arms = _desired(snap["desired"])
            s.arm_states.update((a, v) for a, v in arms.items() if a in s.arm_states)

        def revision() -> None:
            s.revision, s.decision_seq = (
                _seq(snap["revision"]),
                _seq(internal.get("decision_seq", 0)),
            )

        def overrides() -> None:
            s.overrides = _overrides(internal["overrides"])

        def seen_commands() -> None:
            s.seen_commands = _seen_commands(internal["seen_commands"])

        def status() -> None:
            s.last_ts, s.last_decision = _status(snap["status"])

        if isinstance(snap, dict):
            for name, part in (
                ("desired", desired),
                ("revision", revision),
                ("overrides", overrides),
                ("seen_commands", seen_commands),
                ("status", status),
            ):
                try:
                    part()
                except _MALFORMED:
                    continue
                kept.append(name)
        return s, tuple(kept)


class Engine:
    """Applies summaries and commands to experiment states and says what to publish.

    Parameters
    ----------
    experiments
        The validated experiment definitions; their hash is the config version in every event.
    evaluation_interval_s
        Event-time length of the interval after which drift and anomaly detectors run.
    hmac_key, command_max_age_s
        Command authentication (see :mod:`armguard.daemon.commands`).
    """

    def __init__(
        self,
        experiments: ExperimentsFile,
        *,
        evaluation_interval_s: float = 10.0,
        hmac_key: bytes | None = None,
        command_max_age_s: float = 300.0,
        source: str = "armguard",
    ):
        self.config = experiments
        self.version = experiments.version
        self.by_id = experiments.by_id()
        self.interval_s = float(evaluation_interval_s)
        self.hmac_key = hmac_key
        self.command_max_age_s = command_max_age_s
        self.source = source
        self.states: dict[str, ExperimentState] = {}
        self.pending: dict[str, bytes] = {}  # stashed snapshots not decoded yet
        self._stashed_at: dict[str, tuple[int, int, int | None]] = {}
        # Snapshots that could not be restored, for the stage to dead-letter (take_unreadable).
        self.unreadable: list[Unreadable] = []
        self.dirty: set[str] = set()
        self.counters: dict[str, int] = {
            "summaries": 0,
            "summaries_unknown_experiment": 0,
            "summaries_invalid": 0,
            "commands_applied": 0,
            "commands_rejected": 0,
            "killswitch_events": 0,
            "decisions": 0,
            "snapshots_unreadable": 0,
        }
        # (command, outcome) of every command since the edge last drained it, for metrics
        self.command_outcomes: list[tuple[str, str]] = []

    # -- state management ---------------------------------------------------------------------
    def state_for(self, experiment: str) -> ExperimentState | None:
        st = self.states.get(experiment)
        if st is None:
            exp = self.by_id.get(experiment)
            if exp is None:
                return None
            raw = self.pending.pop(experiment, None)
            if raw is not None:
                st = self.states[experiment] = self._decoded(exp, raw)
            else:
                st = self.states[experiment] = ExperimentState(exp)
        return st

    def _decoded(self, exp: ExperimentConfig, raw: bytes) -> ExperimentState:
        source = self._stashed_at.pop(exp.id, None)
        try:
            return ExperimentState.restore(exp, orjson.loads(raw))
        except Exception as exc:  # any failure: the snapshot is data from outside the process
            # Raised out of here it stopped the stage at every restart (the snapshot stays on
            # the state topic) or, on a summary's path, dropped that summary as invalid and
            # reset the experiment silently. Kept instead: what the snapshot still says that
            # the detectors do not, the rest fresh, and the snapshot dead-lettered as it is.
            reason = f"{type(exc).__name__}: {exc}"
        try:
            snap = orjson.loads(raw)
        except orjson.JSONDecodeError:
            snap = None
        st, kept = ExperimentState.salvage(exp, snap)
        self.counters["snapshots_unreadable"] += 1
        self.unreadable.append(Unreadable(exp.id, raw, reason[:500], kept, source))
        return st

    def take_unreadable(self, experiments: set[str] | None = None) -> list[Unreadable]:
        """Remove and return the unreadable snapshots found (of ``experiments`` only, if given)."""
        if experiments is None:
            out, self.unreadable = self.unreadable, []
            return out
        out = [u for u in self.unreadable if u.experiment in experiments]
        self.unreadable = [u for u in self.unreadable if u.experiment not in experiments]
        return out

    def restore(self, value: bytes) -> str | None:
        """Load one snapshot from the state topic; returns its experiment id, or None if unknown."""
        snap = orjson.loads(value)
        exp = self.by_id.get(snap.get("experiment"))
        if exp is None:
            return None
        self.pending.pop(exp.id, None)
        self.states[exp.id] = ExperimentState.restore(exp, snap)
        return exp.id

    def stash(
        self,
        experiment: str,
        value: bytes,
        source: tuple[int, int, int | None] | None = None,
    ) -> bool:
        """Keep a snapshot's bytes to restore later (lazily, on first use, or in idle time):
        a partition is ready as soon as its state topic is read, whatever the number of
        experiments. A later snapshot of the same experiment replaces an earlier one.
        ``source`` is the record's ``(partition, offset, timestamp)``, named if it cannot be
        restored (see :class:`Unreadable`)."""
        if experiment not in self.by_id:
            return False
        self.states.pop(experiment, None)
        self.pending[experiment] = value
        if source is not None:
            self._stashed_at[experiment] = source
        else:
            self._stashed_at.pop(experiment, None)
        return True

    def restore_pending(self, limit: int) -> int:
        """Decode up to ``limit`` stashed snapshots; returns how many are left."""
        # The cyclic GC is paused meanwhile: each decoded experiment adds ~90 long-lived
        # objects, and collections triggered by that growth cost more than the decoding.
        with gc_paused():
            for experiment in list(itertools.islice(self.pending, limit)):
                self.state_for(experiment)
        return len(self.pending)

    def drop(self, experiments: set[str]) -> None:
        for e in experiments:
            self.states.pop(e, None)
            self.pending.pop(e, None)
            self._stashed_at.pop(e, None)
            self.dirty.discard(e)
        self.take_unreadable(experiments)  # the partition's new owner meets them again

    def snapshot_of(self, experiment: str) -> Output | None:
        """The state record of one experiment (None if it has no state here)."""
        st = self.states.get(experiment)
        if st is None:
            return None
        return Output("state", experiment.encode(), orjson.dumps(st.snapshot(self.version)))

    def snapshots(self) -> list[Output]:
        """State snapshots of every experiment changed since the last call."""
        out = [o for e in sorted(self.dirty) if (o := self.snapshot_of(e)) is not None]
        self.dirty.clear()
        return out

    # -- summaries ----------------------------------------------------------------------------
    def apply_summary(
        self, value: bytes, *, topic: str, partition: int, offset: int
    ) -> list[Output]:
        """Merge one summary record and evaluate; returns the events and decisions to publish."""
        return self.apply_summaries([(value, topic, partition, offset)])[0]

    def apply_summaries(
        self,
        records: Sequence[tuple[bytes, str, int, int]],
        keys: Sequence[bytes | None] | None = None,
    ) -> list[list[Output]]:
        """:meth:`apply_summary` for a run of ``(value, topic, partition, offset)`` records.

        ``keys``, the records' Kafka keys, if given: a record of a configured experiment whose
        key is not that experiment's id (UTF-8) is counted invalid and skipped (the evaluate
        stage passes them; replay and tests need not).

        Returns each record's outputs, in record order, exactly as applying the records one by
        one would. Each experiment's records are applied strictly in order; experiments are
        independent, so they advance together in *waves*: records run until their
        drift detectors need updating, then the updates of the whole wave (up to ~1,000 records)
        are computed in one vectorised pass per detector type (``TwoSampleDrift.update_many``,
        ``WindowDrift.update_many``, whose result for a detector does not depend on the rest of
        the batch, bit for bit), and those records finish; an experiment's next record starts
        when its previous one is done. Thousands of experiments tick at the same event-time
        boundaries, so a flush of the summaries topic makes a few large waves. Commands are not
        batched: pass only runs of summary records between two commands.
        """
        outputs: list[list[Output]] = [[] for _ in records]
        steps: dict[int, Generator[Any, None, list[Output]]] = {}
        experiment_of: dict[int, str] = {}
        blocked: dict[str, deque[int]] = {}  # records decoded behind one of their experiment's
        in_flight: set[str] = set()
        wave: dict[type, tuple[list[Any], list[Any]]] = {}
        waiting: list[int] = []  # records of the wave, waiting for their detectors' updates

        def advance(i: int) -> None:
            """Run record ``i`` until its drift detectors need updating or it is done; a done
            record hands over to the next record of its experiment."""
            while True:
                try:
                    wanted = next(steps[i])
                except StopIteration as done:
                    outputs[i] = done.value
                    del steps[i]
                    experiment = experiment_of.pop(i)
                    queue = blocked.get(experiment)
                    if not queue:
                        in_flight.discard(experiment)
                        return
                    i = queue.popleft()
                    if not queue:
                        del blocked[experiment]
                    continue
                waiting.append(i)
                for det, pair in wanted:
                    dets, pairs = wave.setdefault(type(det), ([], []))
                    dets.append(det)
                    pairs.append(pair)
                return

        def run_wave() -> None:
            resumed = list(waiting)
            for cls, (dets, pairs) in wave.items():
                cls.update_many(dets, pairs)
            wave.clear()
            waiting.clear()
            for i in resumed:
                advance(i)

        # Records are decoded as they come (holding a whole run decoded costs more in memory
        # and garbage collection than the batching saves), and waves run once big enough.
        # The cyclic GC is paused for the run: a wave holds ~1,000 records' generators and
        # inputs, which every collection would otherwise scan and promote towards the oldest
        # generation (whose full collections scan every experiment's state); what the run
        # frees is freed by reference counting.
        with gc_paused():
            for i, (value, topic, partition, offset) in enumerate(records):
                gen = self._summary_steps(
                    value,
                    topic=topic,
                    partition=partition,
                    offset=offset,
                    key=None if keys is None else keys[i],
                )
                try:
                    experiment = next(gen)  # decoded and validated; nothing merged yet
                except StopIteration as done:
                    outputs[i] = done.value
                    continue
                steps[i] = gen
                experiment_of[i] = experiment
                if experiment in in_flight:
                    blocked.setdefault(experiment, deque()).append(i)
                    continue
                in_flight.add(experiment)
                advance(i)
                if len(waiting) >= _WAVE:
                    run_wave()
            while waiting:
                run_wave()
        return outputs

    def _summary_steps(
        self, value: bytes, *, topic: str, partition: int, offset: int, key: bytes | None = None
    ) -> Generator[Any, None, list[Output]]:
        """One summary record, as a generator: yields the experiment id once decoded, then the
        ``(detector, input)`` drift updates it needs (the caller performs them; ``input`` is a
        ``(treatment, control)`` pair or one Summary, what the detector type's ``update_many``
        takes), and returns the outputs."""
        try:
            rec = orjson.loads(value)
            experiment = rec["experiment"]
            arms = arm_states(rec)
            span = rec.get("span") or {}
            offsets = rec.get("offsets") or []
            if not (
                isinstance(experiment, str) and isinstance(span, dict) and isinstance(offsets, list)
            ):
                raise TypeError("bad shape")
            # An event time no event can carry (not a number, NaN, before year 1 or past year
            # 9999: the next event's RFC 3339 time raised out of here, and a snapshot holding
            # it is unreadable) is left out; the record's summaries are still applied.
            try:
                max_ts = _event_time(span.get("max_ts"))
            except ValueError:
                max_ts = None
            st = self.state_for(experiment)
            incoming: dict[str, ArmData] = {}
            if st is not None and key is not None and key != experiment.encode():
                # Records are partitioned by key, and an experiment belongs to the owner of
                # its key's partition: applied here, it would also live on this partition's
                # owner (and its snapshots in this state partition), two owners deciding.
                raise ValueError("the record's key is not its experiment")
            if st is not None:
                # Every summary is read before any is merged: a bad one leaves no trace.
                for arm, data in arms.items():
                    if arm in st.exp.arms:
                        incoming[arm] = parsed = ArmData()
                        parsed.merge_state(data)
                        _check_proportions(parsed, st.binary)
                        # A summary that cannot merge into the data so far is refused here: a
                        # ValueError while merging below stopped the stage at every restart.
                        for held in (st.arms.get(arm), st.interval.get(arm)):
                            if held is not None:
                                held.check_mergeable(parsed)
        except _MALFORMED:
            self.counters["summaries_invalid"] += 1
            return []
        if st is None:
            self.counters["summaries_unknown_experiment"] += 1
            return []
        yield experiment
        self.counters["summaries"] += 1
        for arm, data in incoming.items():
            st.arms.setdefault(arm, ArmData()).merge_in(data)
            # The decoded record is dropped below: the interval takes its Summaries.
            st.interval.setdefault(arm, ArmData()).absorb(data)
        _ranges_add(st.summary_offsets, f"{topic}:{partition}", offset, offset)
        for o in offsets:  # telemetry ranges: a malformed entry is left out
            try:
                source, part = o["topic"], int(o["partition"])
                first, last = int(o["first"]), int(o["last"])
            except (KeyError, TypeError, ValueError, OverflowError):
                continue
            if isinstance(source, str) and 0 <= part < 1 << 31 and 0 <= first <= last < 1 << 63:
                _ranges_add(st.telemetry_offsets, f"{source}:{part}", first, last)
        if max_ts is not None:
            st.last_ts = max(st.last_ts or max_ts, max_ts)
        self.dirty.add(experiment)
        # The decoded record is merged: drop it before a drift wave keeps this frame waiting.
        rec = arms = incoming = data = parsed = None
        return (yield from self._evaluate(st))

    def _evaluate(self, st: ExperimentState) -> Generator[Any, None, list[Output]]:
        out: list[Output] = []
        for r in st.runners.values():
            if r.sequential:
                r.evaluate_cumulative(st.arms)
        if st.srm is not None:
            st.srm.evaluate(st.arms)
        # Drift and anomaly run when event time crosses an evaluation boundary.
        if st.last_ts is not None:
            if st.next_tick is None:
                st.next_tick = (math.floor(st.last_ts / self.interval_s) + 1) * self.interval_s
            elif st.last_ts >= st.next_tick:
                wanted, started = [], []
                for r in st.runners.values():
                    if not r.sequential:
                        update = r.start_interval(st.interval, st.arms, st.next_tick)
                        if update is not None:
                            wanted.append((r.detector, update))
                            started.append(r)
                if wanted:
                    yield wanted  # the caller updates these detectors, batched across experiments
                    for r in started:
                        r.finish_interval()
                st.interval = {}
                st.next_tick = (math.floor(st.last_ts / self.interval_s) + 1) * self.interval_s
        for r in st.runners.values():
            out.extend(self._policy(st, r))
        if st.srm is not None:
            out.extend(self._srm_policy(st))
        return out

    # -- policy -------------------------------------------------------------------------------
    def _policy(self, st: ExperimentState, r: GuardrailRunner) -> list[Output]:
        state = st.guardrail_state(r)
        if state == "overridden":
            return []
        if r.status.level != "breach":
            r.firing = False  # cleared: the next breach is a new onset
            return []
        if r.firing:
            return []
        r.firing = True
        # The control arm cannot be switched off in favour of itself: its alarms only alert.
        action = "alert" if r.arm == st.exp.control else r.g.action
        return self._act(st, "guardrail", action, r.g.shadow, r.arm, r.status.row("breach"))

    def _srm_policy(self, st: ExperimentState) -> list[Output]:
        srm = st.srm
        assert srm is not None
        if srm.level != "breach":
            srm.firing = False
            return []
        if srm.firing:
            return []
        srm.firing = True
        row = {
            "guardrail": "srm",
            "arm": None,
            "metric": None,
            "test": "srm",
            "state": "breach",
            "method": getattr(srm.detector, "method", "srm"),
            "p_value": srm.p_value,
            "alpha": srm.cfg.alpha,
            "counts": {a: (st.arms[a].count if a in st.arms else 0) for a in st.exp.arms},
        }
        return self._act(st, "srm", srm.cfg.action, srm.cfg.shadow, None, row)

    def _act(
        self,
        st: ExperimentState,
        cause: str,
        action: str,
        shadow: bool,
        arm: str | None,
        row: dict[str, Any],
        operator: dict[str, Any] | None = None,
    ) -> list[Output]:
        decision = {**row, "action": action, "shadow": shadow, "operator": operator}
        changed = False
        if not shadow and action in ("pause", "kill"):
            target = "killed" if action == "kill" else "paused"
            if arm is None or arm == st.exp.control:
                if SEVERITY[target] > SEVERITY[st.state]:
                    st.state = target
                    changed = True
            elif SEVERITY[target] > SEVERITY[st.arm_states[arm]]:
                st.arm_states[arm] = target
                changed = True
        return self._publish(st, cause, decision, changed)

    def _publish(
        self, st: ExperimentState, cause: str, decision: dict[str, Any], changed: bool
    ) -> list[Output]:
        out: list[Output] = []
        st.decision_seq += 1
        st.last_decision = decision
        self.dirty.add(st.id)
        if changed:
            st.revision += 1
            data = {
                "experiment": st.id,
                "revision": st.revision,
                **st.desired(),
                "cause": cause,
                "decision": decision,
                "guardrails": st.rows(),
                "config_version": self.version,
                "offsets": st.offsets(),
            }
            ev = cloud_event(
                KILLSWITCH_TYPE,
                st.id,
                data,
                id_parts=(st.id, st.revision, cause),
                event_time=st.last_ts,
                source=self.source,
            )
            out.append(Output("killswitch", st.id.encode(), orjson.dumps(ev), decision["action"]))
            self.counters["killswitch_events"] += 1
        audit = cloud_event(
            DECISION_TYPE,
            st.id,
            {
                "kind": "decision" if cause != "operator" else "command",
                "experiment": st.id,
                "seq": st.decision_seq,
                "revision": st.revision,
                "state_changed": changed,
                **st.desired(),
                "cause": cause,
                "decision": decision,
                "config_version": self.version,
                "offsets": st.offsets(),
            },
            id_parts=(st.id, "decision", st.decision_seq),
            event_time=st.last_ts,
            source=self.source,
        )
        outcome = f"shadow_{decision['action']}" if decision["shadow"] else decision["action"]
        out.append(Output("decisions", st.id.encode(), orjson.dumps(audit), outcome))
        self.counters["decisions"] += 1
        return out

    # -- commands -----------------------------------------------------------------------------
    def apply_command(
        self, value: bytes | None, *, topic: str, partition: int, offset: int, timestamp_s: float
    ) -> list[Output]:
        """Authenticate and apply one operator command; rejected ones are audited."""
        try:
            obj = cmds.parse(value)
            cmd = cmds.verify(
                obj, self.hmac_key, received_at=timestamp_s, max_age_s=self.command_max_age_s
            )
            st = self.state_for(cmd.experiment)
            if st is None:
                raise CommandRejected("unknown_experiment", f"{cmd.experiment!r} is not configured")
            if cmd.id in st.seen_commands:
                raise CommandRejected("replayed", f"command id {cmd.id} was already applied")
            if cmd.arm is not None and cmd.arm not in st.exp.arms:
                raise CommandRejected(
                    "unknown_arm", f"arm {cmd.arm!r}; arms: {', '.join(st.exp.arms)}"
                )
            if cmd.guardrail is not None and cmd.guardrail not in {
                g.name for g in st.exp.guardrails
            } | {"srm"}:
                raise CommandRejected("unknown_guardrail", f"guardrail {cmd.guardrail!r}")
        except CommandRejected as exc:
            return self._reject(value, exc, topic, partition, offset, timestamp_s)
        self.counters["commands_applied"] += 1
        self.command_outcomes.append((cmd.command, "applied"))
        st.seen_commands.append(cmd.id)
        del st.seen_commands[:-_MAX_SEEN_COMMANDS]
        operator = {
            **cmd.to_dict(),
            "offset": {"topic": topic, "partition": partition, "offset": offset},
        }
        if st.last_ts is None:
            st.last_ts = timestamp_s
        changed = False
        row: dict[str, Any] = {"guardrail": cmd.guardrail, "arm": cmd.arm, "state": None}
        if cmd.command in ("kill", "pause"):
            target = "killed" if cmd.command == "kill" else "paused"
            if cmd.arm is None or cmd.arm == st.exp.control:
                changed = st.state != target
                st.state = target
            else:
                changed = st.arm_states[cmd.arm] != target
                st.arm_states[cmd.arm] = target
        elif cmd.command == "resume":
            if cmd.arm is None or cmd.arm == st.exp.control:
                changed = st.state != "running"
                st.state = "running"
                if cmd.arm is None:
                    for a in st.arm_states:
                        changed = changed or st.arm_states[a] != "running"
                        st.arm_states[a] = "running"
            else:
                changed = st.arm_states[cmd.arm] != "running"
                st.arm_states[cmd.arm] = "running"
        elif cmd.command == "override":
            assert cmd.guardrail is not None and cmd.duration_s is not None
            # Expiry is measured in event time from the later of the data's time and the
            # command's issue time, so it is reproducible on replay.
            base = max(st.last_ts or cmd.issued_at, cmd.issued_at)
            st.overrides[cmd.guardrail] = base + cmd.duration_s
            row["expires_ts"] = st.overrides[cmd.guardrail]
        # acknowledge: audited only.
        decision = {**row, "action": cmd.command, "shadow": False, "operator": operator}
        return self._publish(st, "operator", decision, changed)

    def _reject(
        self,
        value: bytes | None,
        exc: CommandRejected,
        topic: str,
        partition: int,
        offset: int,
        timestamp_s: float,
    ) -> list[Output]:
        self.counters["commands_rejected"] += 1
        command = "unknown"
        experiment = ""
        try:
            obj = orjson.loads(value) if value else None
            if isinstance(obj, dict):
                command = str(obj.get("command", "unknown"))[:32]
                experiment = str(obj.get("experiment", ""))[:100]
        except orjson.JSONDecodeError:
            pass
        name = command if command in cmds.COMMANDS else "unknown"
        self.command_outcomes.append((name, f"rejected_{exc.reason}"))
        audit = cloud_event(
            DECISION_TYPE,
            experiment or "unknown",
            {
                "kind": "command_rejected",
                "experiment": experiment,
                "command": command,
                "reason": exc.reason,
                "detail": exc.detail,
                "offset": {"topic": topic, "partition": partition, "offset": offset},
            },
            id_parts=("rejected", topic, partition, offset),
            event_time=timestamp_s,
            source=self.source,
        )
        key = (experiment or "unknown").encode()
        return [Output("decisions", key, orjson.dumps(audit), "command_rejected")]

    # -- read-only views for metrics and status -----------------------------------------------
    def experiment_ids(self) -> list[str]:
        return sorted(set(self.states) | set(self.pending))
