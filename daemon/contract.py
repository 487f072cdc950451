"""The pure half of ingest: decode telemetry, check the data contract, fold into summaries.

Nothing here touches Kafka, a clock or a file: records in (anything with ``value``, ``offset``,
``key`` and ``timestamp`` attributes, such as aiokafka's ``ConsumerRecord``), summary records and
dead letters out. The ingest stage drives it from ``getmany`` batches; ``armguard replay`` can
drive it from a recorded file and get the same summaries.

The data contract, checked in this order; the first failure is the record's reason (a short,
stable code that becomes the ``armguard.reason`` dead-letter header and a metric label):

==================  =====================================================================
reason              the record
==================  =====================================================================
``no_value``        has a null value (a tombstone)
``too_large``       is longer than ``ingest.max_record_bytes``
``invalid_json``    is not one JSON document in UTF-8 (also: NaN, Infinity, trailing bytes)
``not_object``      is JSON but not an object
``missing_field``   lacks the experiment, arm or event time
``wrong_type``      has a field of the wrong type: experiment/arm not a string, time not a
                    number, unit not a string or integer, metrics/features not an object,
                    a summarised value not a number (booleans are not numbers)
``unknown_arm``     names an arm its (configured) experiment does not have
``late``            has an event time more than ``max_lateness_s`` before the reference time
``future``          has an event time more than ``max_future_skew_s`` after the reference time
``out_of_range``    has a summarised value outside the configured [min, max] of its metric
==================  =====================================================================

Telemetry of an experiment that is not configured is *skipped* (reason
``unknown_experiment``), not dead-lettered: other teams' experiments share the topic. Metrics
and features a record carries but the experiment does not summarise are ignored. A record is
folded whole or not at all. JSON numbers cannot be NaN or infinite (orjson refuses them), so
"finite" holds for every number that reaches a range check.

Event time ``ts`` is seconds since the epoch. Freshness is measured against a reference time:
by default each record's Kafka timestamp (when it reached Kafka), so a backlog read after an
outage is not dead-lettered as late and a replay of the same records makes the same verdicts;
``fold(records, now=...)`` measures against a fixed time instead.

Field paths are configurable (``ingest.experiment_field`` etc.); a dotted path such as
``ctx.experiment`` reads a nested field.

Examples
--------
>>> from armguard.daemon.experiments import parse_experiments
>>> from armguard.daemon.settings import IngestSettings
>>> exps = parse_experiments('''
... experiments:
...   - id: ranker-v2
...     control: control
...     arms: {control: 0.5, treatment: 0.5}
...     metrics: {latency_ms: {min: 0, max: 60000}}
... ''', where="inline.yaml")
>>> contract = Contract(exps, IngestSettings())
>>> ok = b'{"experiment": "ranker-v2", "arm": "control", "ts": 1000.0, "metrics": {"latency_ms": 42}}'
>>> contract.decode(ok, now=1001.0)
Accepted(experiment='ranker-v2', arm='control', ts=1000.0, metrics={'latency_ms': 42.0}, features={})
>>> contract.decode(b'{"experiment": "ranker-v2", "arm": "control", "ts": 1000.0, '
...                 b'"metrics": {"latency_ms": -5}}', now=1001.0)
Rejected(reason='out_of_range', detail='metrics.latency_ms=-5 outside [0.0, 60000.0]')
>>> contract.decode(b'{"experiment": "other", "arm": "a", "ts": 1000.0}', now=1001.0)
Skipped(reason='unknown_experiment', detail='other')
>>> contract.decode(b'\\xff\\xfe', now=1001.0).reason
'invalid_json'
"""

from __future__ import annotations

import re
import weakref
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np
import orjson

from .experiments import ExperimentsFile
from .heap import gc_paused
from .settings import IngestSettings
from .summarise import GroupSummaries

__all__ = [
    "REASONS",
    "Accepted",
    "Contract",
    "DeadLetter",
    "Flush",
    "PartitionAccumulator",
    "RawRecord",
    "Rejected",
    "Skipped",
    "deadletter_headers",
    "fold_all",
]

REASONS = (
    "no_value",
    "too_large",
    "invalid_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "unknown_arm",
    "late",
    "future",
    "out_of_range",
)
SKIP_REASONS = ("unknown_experiment",)

# A metric without a configured range still has one: |x| <= 1e100, so squared deviations in the
# summaries cannot overflow. orjson never yields inf or NaN.
_LO = -1e100
_HI = 1e100
_DETAIL_CHARS = 200
# The fold decodes and checks a batch this many records at a time: the decoded objects of one
# chunk are alive together and stay in the CPU caches until they are freed (4,096 cost 30% more
# per record than 512 with 10,000 experiments; 256 more per-chunk numpy calls).
_CHUNK = 512
# Below this magnitude an integer converts to a float exactly, so numpy's comparisons of the
# float agree with Python's of the integer; larger ones take the per-record path.
_EXACT = 2.0**53
_NAN = float("nan")
_EMPTY: dict[str, Any] = {}  # what an undecodable record reads as in the fast path (never mutated)
_NUMBER = frozenset((float, int))
_UNIT = frozenset((type(None), str, int))
_BLOCK = frozenset((type(None), dict))
_timestamp = attrgetter("timestamp")
# An experiment id or arm name that str() of a JSON scalar can produce (None, True, 12, 1.5,
# 1e+20, inf, nan): with one of these configured, the group key quotes its parts (below).
_CONFUSABLE = re.compile(r"None|True|False|inf|nan|[0-9][0-9.eE+-]*")


class Accepted(NamedTuple):
    """A record that passed the contract: the values ingest folds (only summarised names)."""

    experiment: str
    arm: str
    ts: float
    metrics: dict[str, float]
    features: dict[str, float]


class Rejected(NamedTuple):
    """A record that breaks the contract; it goes to the dead-letter topic."""

    reason: str
    detail: str


class Skipped(NamedTuple):
    """A record that is not armguard's business (an experiment that is not configured)."""

    reason: str
    detail: str


class RawRecord(NamedTuple):
    """The attributes of a consumed record that ingest reads (aiokafka's ``ConsumerRecord``
    has them too); for replay and tests."""

    offset: int
    value: bytes | None
    key: bytes | None = None
    timestamp: int = 0  # milliseconds since the epoch, as Kafka stores it


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One rejected record and why."""

    record: Any  # the consumed record: value, key, offset, timestamp
    reason: str
    detail: str


@dataclass(slots=True)
class Flush:
    """What one flush of one input partition writes, in one transaction.

    ``summaries`` are (key, value) pairs for the summaries topic, one per experiment with data,
    sorted by experiment; ``commit_offset`` is the offset just past the last record
    (``last_offset + 1``). Ingest commits the accumulator's position, which can lie further,
    past transaction markers (``IngestStage._settle``).
    """

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    summaries: list[tuple[bytes, bytes]]
    deadletters: list[DeadLetter]
    consumed: int
    summarised: int
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def commit_offset(self) -> int:
        return self.last_offset + 1

    @property
    def deadlettered(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.deadletters:
            out[d.reason] = out.get(d.reason, 0) + 1
        return out


def _ranges(contracts: dict[str, Any], names: set[str]) -> dict[str, tuple[float, float]]:
    out = {}
    for name in sorted(names):
        c = contracts.get(name)
        lo = c.min if c is not None and c.min is not None else _LO
        hi = c.max if c is not None and c.max is not None else _HI
        out[name] = (float(lo), float(hi))
    return out


class Contract:
    """The compiled data contract of a set of experiments, and the field paths to read.

    Parameters
    ----------
    experiments
        The validated experiments; their arms, summarised metrics and features, and ranges.
    ingest
        The ingest settings: field paths, record size limit, lateness and future skew.
    relative_accuracy
        Relative accuracy of the summaries' quantile histograms.
    """

    def __init__(
        self,
        experiments: ExperimentsFile,
        ingest: IngestSettings,
        *,
        relative_accuracy: float = 0.01,
    ):
        self.config_version = experiments.version
        self.relative_accuracy = relative_accuracy
        self.max_record_bytes = ingest.max_record_bytes
        self.max_lateness_s = ingest.max_lateness_s
        self.max_future_skew_s = ingest.max_future_skew_s
        paths = {
            "experiment": ingest.experiment_field,
            "arm": ingest.arm_field,
            "ts": ingest.ts_field,
            "unit": ingest.unit_field,
            "metrics": ingest.metrics_field,
            "features": ingest.features_field,
        }
        for role, path in paths.items():
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"ingest.{role}_field: {path!r} is not a field path like 'a.b'")
        self.paths = paths
        self._parts = {role: tuple(p.split(".")) for role, p in paths.items()}
        self.nested = any(len(parts) > 1 for parts in self._parts.values())
        # group id -> (experiment, arm); group ids of one experiment are consecutive.
        self._groups: list[tuple[str, str]] = []
        # group id -> (metric ranges, feature ranges); identical range tables are shared.
        self._ranges: list[tuple[dict[str, Any], dict[str, Any]]] = []
        exp_ranges: list[tuple[dict[str, Any], dict[str, Any]]] = []
        interned: dict[tuple[Any, ...], dict[str, tuple[float, float]]] = {}
        metric_names: set[str] = set()
        feature_names: set[str] = set()
        for e in experiments.experiments:
            metrics, features = e.summarised()
            metric_names |= metrics
            feature_names |= features
            mr = _ranges(e.metrics, metrics)
            fr = _ranges(e.features, features)
            # A proportion guardrail's values are 0/1 outcomes: a value outside [0, 1] is
            # dead-lettered here (out_of_range), one record, instead of making the summary of
            # the whole flush invalid in the evaluate stage (its sum outside [0, count]).
            for g in e.guardrails:
                if g.test == "proportion" and g.metric:
                    table = fr if g.source == "feature" else mr
                    lo, hi = table[g.metric]
                    table[g.metric] = (max(lo, 0.0), min(hi, 1.0))
            mr = interned.setdefault(tuple(mr.items()), mr)
            fr = interned.setdefault(tuple(fr.items()), fr)
            exp_ranges.append((mr, fr))
            for arm in e.arms:
                self._groups.append((e.id, arm))
                self._ranges.append((mr, fr))
        # The group key of (experiment, arm): "experiment\0arm" (ids match _ID, so the
        # separator cannot occur in them). The fold formats it for every record, whatever the
        # types of the two fields, and looks it up once (one probe of one table: with 10,000
        # experiments the lookups miss the CPU caches, and two nested tables cost ~0.85 us per
        # record, this one ~0.55). Only strings may match, so if str() of a JSON number, bool
        # or null could spell a configured id or arm ("5", "None"), both parts are quoted.
        plain = not any(_CONFUSABLE.fullmatch(name) for pair in self._groups for name in pair)
        self._quoted = not plain
        self._key = "{!r}\0{!r}".format if self._quoted else "{}\0{}".format
        # group key -> group id
        self._by_group: dict[str, int] = {
            self._key(e, arm): gid for gid, (e, arm) in enumerate(self._groups)
        }
        # experiment id -> its position in the config (and in _exp_ids)
        self._exp_ids = [e.id for e in experiments.experiments]
        self._exp_index = {e: i for i, e in enumerate(self._exp_ids)}
        # group id -> position of its experiment (vectorised grouping at a flush)
        index = self._exp_index
        self._group_exp = np.array([index[e] for e, _ in self._groups], dtype=np.int64)
        self.metric_names = tuple(sorted(metric_names))
        self.feature_names = tuple(sorted(feature_names))
        # name -> (min, max) per experiment position, NaN where the experiment does not
        # summarise the name (the fold compares whole columns against them).
        self._limits = tuple(
            _limits([r[section] for r in exp_ranges], names)
            for section, names in enumerate((self.metric_names, self.feature_names))
        )

    @property
    def experiment_ids(self) -> list[str]:
        return list(self._exp_ids)

    def _flatten(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Read the configured (possibly nested) paths into a flat dict keyed by role."""
        out = {}
        for role, parts in self._parts.items():
            v: Any = obj
            for part in parts:
                if type(v) is not dict:
                    v = None
                    break
                v = v.get(part)
            if v is not None:
                out[role] = v
        return out

    def decode(self, value: bytes | None, *, now: float) -> Accepted | Rejected | Skipped:
        """The verdict on one record's value, with event time checked against ``now``.

        Runs the very code the hot path runs (on a scratch accumulator), so what it says is what
        ingest does. Never raises.
        """
        acc = PartitionAccumulator(self, "decode", 0)
        acc.fold([RawRecord(0, value)], now=now)
        if acc._deadletters:
            d = acc._deadletters[0]
            return Rejected(d.reason, d.detail)
        if acc._skipped:
            return Skipped("unknown_experiment", acc._skipped_detail)
        exp, arm = self._groups[acc._gids[0]]
        metrics = {n: col[0][0] for n, col in acc._mcols.items() if col[0]}
        features = {n: col[0][0] for n, col in acc._fcols.items() if col[0]}
        return Accepted(exp, arm, acc._ts[0], metrics, features)


def _numbers(values: list[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """``values`` as floats, and which were not numbers (None if all were).

    A number is a float or an int (not a bool) of magnitude below 2**53 (larger ones would
    round: the record-by-record check decides them); NaN stands for a missing value (JSON
    numbers are never NaN). Entries that are not numbers read as NaN.
    """
    types = set(map(type, values))
    if types <= _NUMBER:
        out = np.array(values, dtype=np.float64)
        if int not in types:
            return out, None
        with np.errstate(invalid="ignore"):
            big = np.abs(out) >= _EXACT
        return out, (big if big.any() else None)
    ok = [type(v) is float or (type(v) is int and -_EXACT < v < _EXACT) for v in values]
    out = np.array([v if k else _NAN for v, k in zip(values, ok, strict=True)], dtype=np.float64)
    return out, ~np.array(ok, dtype=bool)


def _limits(
    ranges: list[dict[str, tuple[float, float]]], names: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (min, max) by experiment position, NaN where the experiment does not summarise
    the name."""
    n = len(ranges)
    out = {name: (np.full(n, np.nan), np.full(n, np.nan)) for name in names}
    for k, r in enumerate(ranges):
        for name, (lo, hi) in r.items():
            out[name][0][k] = lo
            out[name][1][k] = hi
    return out


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _clip(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


class PartitionAccumulator:
    """Valid records of one input partition since its last flush, held in columns.

    :meth:`fold` appends to a handful of flat columns whatever the number of experiments: per
    accepted record its group (experiment, arm) and event time, per summarised value the value
    and its group; it checks a chunk of records column by column and only the records it
    cannot accept one by one (:meth:`_fold_chunk`). :meth:`drain` groups them with one sort per
    metric and summarises every group in one vectorised pass
    (:func:`~armguard.daemon.summarise.summarise_groups`). Memory is a few machine words per
    value, bounded by the flush size (``ingest.max_pending_records``).

    Parameters
    ----------
    contract
        The compiled contract.
    topic, partition
        The input partition this accumulator covers (written into the summaries).
    """

    def __init__(self, contract: Contract, topic: str, partition: int):
        self.contract = contract
        self.topic = topic
        self.partition = partition
        self.next_offset: int | None = None  # the first offset not folded yet
        self._reset()

    def _reset(self) -> None:
        c = self.contract
        # Typed arrays: 8 bytes per entry, and the drain reads them without a copy.
        self._gids = array("q")
        self._ts = array("d")
        # name -> (values, groups)
        self._mcols: dict[str, tuple[array[float], array[int]]] = {
            n: (array("d"), array("q")) for n in c.metric_names
        }
        self._fcols: dict[str, tuple[array[float], array[int]]] = {
            n: (array("d"), array("q")) for n in c.feature_names
        }
        # The same columns' bound append methods, for the hot loop.
        self._mappend = {n: (v.append, g.append) for n, (v, g) in self._mcols.items()}
        self._fappend = {n: (v.append, g.append) for n, (v, g) in self._fcols.items()}
        self._deadletters: list[DeadLetter] = []
        self._skipped = 0
        self._skipped_detail = ""
        self.consumed = 0
        self.first_offset: int | None = None
        self.last_offset: int | None = None

    @property
    def pending(self) -> int:
        """Records folded since the last drain (each holds memory until the flush)."""
        return self.consumed

    def fold(self, records: Sequence[Any], now: float | None = None) -> int:
        """Fold a batch of records of this partition, in offset order; return how many were new.

        Records at offsets below :attr:`next_offset` (already folded) are ignored, so a batch
        fetched twice around a rebalance cannot count twice. ``now`` (seconds) is the reference
        time of the freshness check; ``None`` uses each record's Kafka timestamp. Never raises on
        any record content.
        """
        if not records:
            return 0
        nxt = self.next_offset
        if nxt is not None and records[0].offset < nxt:
            records = [r for r in records if r.offset >= nxt]
            if not records:
                return 0
        for start in range(0, len(records), _CHUNK):
            self._fold_chunk(records[start : start + _CHUNK], now)
        n = len(records)
        if self.first_offset is None:
            self.first_offset = records[0].offset
        self.last_offset = records[-1].offset
        self.next_offset = self.last_offset + 1
        self.consumed += n
        return n

    def _fold_chunk(self, records: Sequence[Any], now: float | None) -> None:
        """Fold records column by column, and the few that need it one by one.

        Each record is decoded (one ``orjson.loads`` each) and its group key looked up (one
        ``map`` over the chunk); telemetry of unconfigured experiments is counted as skipped.
        Every other check of the contract then runs on the records that have a group, all at
        once: the fields are read with ``map`` and their types checked per column
        (``set(map(type, ...))``), times and values compared with numpy against per-experiment
        ranges. Records that pass every check are appended in bulk. The rest (undecodable,
        unknown arm, wrong type, late, out of range: whatever is rejected) go, in offset order
        and in one call, through :meth:`_fold_each`, the record-by-record statement of the
        contract, which names each one's reason; as it appends nothing for them, the accepted
        records are appended after it. It may, rarely, accept a record the columns left to it
        (a boolean in a metric the experiment does not summarise, an integer beyond 2**53):
        then its work is undone and the chunk is folded in order, the accepted records between
        two such runs in bulk. Either way every column receives its values in the order a
        record-by-record fold gives them, and dead letters are in offset order.
        """
        c = self.contract
        n = len(records)
        chunk = records
        loads = orjson.loads
        max_bytes = c.max_record_bytes
        empty = _EMPTY
        if c.nested:
            flatten = c._flatten
            k_exp, k_arm, k_ts, k_unit = "experiment", "arm", "ts", "unit"
            k_met, k_feat = "metrics", "features"
        else:
            flatten = None
            p = c.paths
            k_exp, k_arm, k_ts, k_unit = p["experiment"], p["arm"], p["ts"], p["unit"]
            k_met, k_feat = p["metrics"], p["features"]
        # Decoded objects (anything undecodable reads as an empty one: no experiment, so no
        # group) and their group keys, as Contract._key formats them (inlined: a call per
        # record costs more than the f-string).
        objs: list[dict[str, Any]] = []
        keys: list[str] = []
        add = objs.append
        add_key = keys.append
        quoted = c._quoted
        for r in records:
            try:
                o = loads(v) if len(v := r.value) <= max_bytes else empty
            except (ValueError, TypeError):  # invalid JSON (a ValueError), a null value
                o = empty
            if type(o) is not dict:
                o = empty
            elif flatten is not None and o is not empty:
                o = flatten(o)
            add(o)
            if quoted:
                add_key(f"{o.get(k_exp)!r}\0{o.get(k_arm)!r}")
            else:
                add_key(f"{o.get(k_exp)}\0{o.get(k_arm)}")
        get = dict.get
        all_objs = objs
        # The group of every record, -1 if none.
        gid = np.fromiter(map(c._by_group.get, keys, repeat(-1)), dtype=np.int64, count=n)
        known = gid >= 0
        # Records without a group: telemetry of unconfigured experiments is skipped here, the
        # rest (no value, invalid JSON, unknown arm...) is for _fold_each.
        slow: list[int] = []
        if known.all():
            at = None  # every record is checked below
        else:
            exps = c._exp_index
            skipped = 0
            last = None
            for i in np.flatnonzero(~known).tolist():
                e = get(objs[i], k_exp)
                if type(e) is str and e not in exps:
                    skipped += 1
                    last = e
                else:
                    slow.append(i)
            if skipped:
                self._skipped += skipped
                self._skipped_detail = _clip(last)
            # The checks below run on the records with a group only (a shared topic may carry
            # mostly other teams' telemetry).
            at = np.flatnonzero(known)
            if not at.shape[0]:
                if slow:
                    decoded = [None if objs[i] is empty else objs[i] for i in slow]
                    self._fold_each([records[i] for i in slow], now, decoded)
                return
            pick = at.tolist()
            objs = list(map(objs.__getitem__, pick))
            gid = gid[at]
            records = list(map(records.__getitem__, pick))
        exp = c._group_exp[gid]
        m = len(objs)

        # Event time: a number (missing reads as NaN), fresh against the reference time.
        ts, bad = _numbers(list(map(get, objs, repeat(k_ts), repeat(_NAN))))
        if now is None:
            ref = np.fromiter(map(_timestamp, records), dtype=np.float64, count=m) * 0.001
        else:
            ref = now
        with np.errstate(invalid="ignore"):
            reject = np.isnan(ts) | (ts < ref - c.max_lateness_s) | (ts > ref + c.max_future_skew_s)
        if bad is not None:
            reject |= bad
        if not set(map(type, map(get, objs, repeat(k_unit)))) <= _UNIT:
            units = map(get, objs, repeat(k_unit))
            reject |= np.array([type(u) not in _UNIT for u in units], dtype=bool)
        # Metrics and features: objects (missing or null: none), each summarised value a
        # number within its experiment's range.
        columns = []
        for section, key, cols in ((0, k_met, self._mcols), (1, k_feat, self._fcols)):
            limits = c._limits[section]
            if not limits:  # nothing to summarise: only the type of the object is checked
                if not set(map(type, map(get, objs, repeat(key), repeat(empty)))) <= _BLOCK:
                    blocks = map(get, objs, repeat(key))
                    reject |= np.array([type(b) not in _BLOCK for b in blocks], dtype=bool)
                continue
            blocks = list(map(get, objs, repeat(key), repeat(empty)))
            if set(map(type, blocks)) != {dict}:
                reject |= np.array(
                    [b is not None and type(b) is not dict for b in blocks], dtype=bool
                )
                blocks = [b if type(b) is dict else empty for b in blocks]
            for name, (lo_e, hi_e) in limits.items():
                lo = lo_e[exp]
                summarised = ~np.isnan(lo)
                if not summarised.any():
                    continue
                hi = hi_e[exp]
                values, bad = _numbers(list(map(get, blocks, repeat(name), repeat(_NAN))))
                if bad is not None:
                    reject |= bad & summarised
                take = summarised & ~np.isnan(values)
                with np.errstate(invalid="ignore"):
                    reject |= take & ~((values >= lo) & (values <= hi))
                columns.append((cols[name], values, take))
        accept = ~reject

        def append(a: int, b: int) -> None:  # the accepted records among the checked a..b-1
            ok = accept[a:b]
            self._gids.frombytes(gid[a:b][ok].tobytes())
            self._ts.frombytes(ts[a:b][ok].tobytes())
            for (col_values, col_groups), values, take in columns:
                t = take[a:b] & ok
                col_values.frombytes(values[a:b][t].tobytes())
                col_groups.frombytes(gid[a:b][t].tobytes())

        rejected = np.flatnonzero(reject)
        if rejected.shape[0]:
            slow = rejected.tolist() if at is None else sorted(slow + at[rejected].tolist())
        if not slow:
            append(0, m)
            return
        # The records for _fold_each, in offset order: it rejects them (that is why they are
        # here) and appends nothing, so the accepted ones go in after it, in one go. If it did
        # accept one (see above), that is undone and the chunk is folded in order instead.
        # What was decoded is passed on (only records that failed to decode are decoded again).
        decoded = [None if o is empty else o for o in map(all_objs.__getitem__, slow)]
        mark = self._mark()
        self._fold_each([chunk[i] for i in slow], now, decoded)
        if len(self._gids) == mark[0]:
            append(0, m)
            return
        self._undo(mark)
        checked = np.arange(n) if at is None else at
        starts = [i for k, i in enumerate(slow) if not k or slow[k - 1] != i - 1]
        ends = [i + 1 for k, i in enumerate(slow) if k + 1 == len(slow) or slow[k + 1] != i + 1]
        done = 0  # checked records before this one are folded
        for first, end in zip(starts, ends, strict=True):
            upto = int(checked.searchsorted(first))
            append(done, upto)
            decoded = [None if o is empty else o for o in all_objs[first:end]]
            self._fold_each(chunk[first:end], now, decoded)
            done = int(checked.searchsorted(end))
        append(done, m)

    def _value_columns(self) -> list[array[Any]]:
        return [a for v, g in (*self._mcols.values(), *self._fcols.values()) for a in (v, g)]

    def _mark(self) -> tuple[int, int, int, str, list[int]]:
        cols = [len(a) for a in self._value_columns()]
        return len(self._gids), len(self._deadletters), self._skipped, self._skipped_detail, cols

    def _undo(self, mark: tuple[int, int, int, str, list[int]]) -> None:
        """Truncate the columns, dead letters and skipped count back to :meth:`_mark`'s."""
        rows, dead, self._skipped, self._skipped_detail, cols = mark
        del self._gids[rows:], self._ts[rows:], self._deadletters[dead:]
        for a, size in zip(self._value_columns(), cols, strict=True):
            del a[size:]

    def _fold_each(
        self,
        records: Sequence[Any],
        now: float | None,
        decoded: Sequence[dict[str, Any] | None] | None = None,
    ) -> None:
        """The data contract, record by record: the reason of every rejected record, and the
        fold of a record whose checks the columns left undecided (see :meth:`_fold_chunk`).

        ``decoded`` (one per record, if given): the record's value already decoded into an
        object (flattened for nested paths), or None where it was not (then it is decoded
        here, which finds the reason it could not be).
        """
        c = self.contract
        loads = orjson.loads
        json_error = orjson.JSONDecodeError
        exps = c._exp_index
        groups_get = c._by_group.get
        key = c._key
        ranges = c._ranges
        mcols = self._mappend
        fcols = self._fappend
        gid_append = self._gids.append
        ts_append = self._ts.append
        dead = self._deadletters.append
        max_bytes = c.max_record_bytes
        late = c.max_lateness_s
        skew = c.max_future_skew_s
        nested = c.nested
        flatten = c._flatten
        if nested:
            k_exp, k_arm, k_ts, k_unit = "experiment", "arm", "ts", "unit"
            k_met, k_feat = "metrics", "features"
        else:
            p = c.paths
            k_exp, k_arm, k_ts, k_unit = p["experiment"], p["arm"], p["ts"], p["unit"]
            k_met, k_feat = p["metrics"], p["features"]
        skipped = 0
        skipped_exp = None

        for rec, obj in zip(records, repeat(None) if decoded is None else decoded):  # noqa: B905
            if obj is None:
                value = rec.value
                if value is None:
                    dead(DeadLetter(rec, "no_value", "the record has a null value"))
                    continue
                if len(value) > max_bytes:
                    dead(DeadLetter(rec, "too_large", f"{len(value)} bytes > {max_bytes}"))
                    continue
                try:
                    obj = loads(value)
                except json_error as exc:
                    dead(DeadLetter(rec, "invalid_json", _clip(str(exc))))
                    continue
                if type(obj) is not dict:
                    dead(DeadLetter(rec, "not_object", f"a JSON {_kind(obj)}, not an object"))
                    continue
                if nested:
                    obj = flatten(obj)

            exp = obj.get(k_exp)
            arm = obj.get(k_arm)
            gid = groups_get(key(exp, arm)) if type(exp) is str and type(arm) is str else None
            if gid is None:  # why not: the experiment first, then the arm
                if type(exp) is not str:
                    dead(_field_rejection(rec, c.paths["experiment"], exp, "string"))
                elif exp not in exps:
                    skipped += 1
                    skipped_exp = exp
                elif type(arm) is str:
                    dead(DeadLetter(rec, "unknown_arm", _clip(f"{exp}/{arm}")))
                else:
                    dead(_field_rejection(rec, c.paths["arm"], arm, "string"))
                continue
            mranges, franges = ranges[gid]
            ts = obj.get(k_ts)
            tt = type(ts)
            if tt is not float and tt is not int:
                dead(_field_rejection(rec, c.paths["ts"], ts, "number"))
                continue
            ref = now if now is not None else rec.timestamp * 0.001
            if ts < ref - late:
                dead(DeadLetter(rec, "late", f"{c.paths['ts']}={ts} is {ref - ts:.0f} s old"))
                continue
            if ts > ref + skew:
                dead(DeadLetter(rec, "future", f"{c.paths['ts']}={ts} is {ts - ref:.0f} s ahead"))
                continue
            unit = obj.get(k_unit)
            if unit is not None and type(unit) is not str and type(unit) is not int:
                dead(DeadLetter(rec, "wrong_type", f"{c.paths['unit']}: {_kind(unit)}"))
                continue
            m = obj.get(k_met)
            f = obj.get(k_feat)
            if m is not None and type(m) is not dict:
                dead(DeadLetter(rec, "wrong_type", f"{c.paths['metrics']}: {_kind(m)}"))
                continue
            if f is not None and type(f) is not dict:
                dead(DeadLetter(rec, "wrong_type", f"{c.paths['features']}: {_kind(f)}"))
                continue

            bad = None
            if m:
                for name, v in m.items():
                    r = mranges.get(name)
                    if r is None:
                        continue
                    tv = type(v)
                    if (tv is float or tv is int) and r[0] <= v <= r[1]:
                        add_value, add_group = mcols[name]
                        add_value(v)
                        add_group(gid)
                    else:
                        bad = ("metrics", name, v, r)
                        break
            if f and bad is None:
                for name, v in f.items():
                    r = franges.get(name)
                    if r is None:
                        continue
                    tv = type(v)
                    if (tv is float or tv is int) and r[0] <= v <= r[1]:
                        add_value, add_group = fcols[name]
                        add_value(v)
                        add_group(gid)
                    else:
                        bad = ("features", name, v, r)
                        break
            if bad is not None:
                self._rollback(m, mranges, f, franges, bad)
                dead(_value_rejection(rec, c.paths[bad[0]], bad))
                continue
            gid_append(gid)
            ts_append(ts)

        if skipped:
            self._skipped += skipped
            self._skipped_detail = _clip(str(skipped_exp))

    def _rollback(
        self,
        m: dict[str, Any] | None,
        mranges: dict[str, Any],
        f: dict[str, Any] | None,
        franges: dict[str, Any],
        bad: tuple[str, str, Any, Any],
    ) -> None:
        """Undo the appends of a record that failed part-way (rare: only rejected records)."""
        where, bad_name = bad[0], bad[1]
        for section, values, ranges, cols in (
            ("metrics", m, mranges, self._mcols),
            ("features", f, franges, self._fcols),
        ):
            if not values:
                continue
            for name in values:
                if section == where and name == bad_name:
                    return
                if name in ranges:
                    col = cols[name]
                    col[0].pop()
                    col[1].pop()

    def drain(self) -> Flush | None:
        """Summarise what was folded since the last drain and start afresh; ``None`` if nothing
        was consumed."""
        if not self.consumed:
            return None
        # Nothing a flush allocates can form a cycle (the version-1 fallback builds ~10
        # containers per group): the cyclic collector would only rescan it. drain is
        # synchronous, so nothing else runs while it is off.
        with gc_paused():
            return self._drain()

    def _drain(self) -> Flush:
        c = self.contract
        ra = c.relative_accuracy
        summaries: list[tuple[bytes, bytes]] = []
        summarised = len(self._gids)
        if summarised:
            gids = np.frombuffer(self._gids, dtype=np.int64)
            ts = np.frombuffer(self._ts, dtype=np.float64)
            # Groups with records, ascending, and their record counts (no sort: group ids are
            # small integers).
            per_group = np.bincount(gids)
            labels = np.flatnonzero(per_group)
            counts = per_group[labels]
            # Group ids of one experiment are consecutive, so the arms of an experiment are
            # adjacent in the ascending labels: experiment k covers labels[first[k]:end[k]].
            exp_of = c._group_exp[labels]
            first = np.flatnonzero(np.r_[True, exp_of[1:] != exp_of[:-1]])
            end = np.r_[first[1:], labels.shape[0]]
            # Event-time span per experiment (indexed by experiment position in the config).
            exp_of_record = c._group_exp[gids]
            span_lo = np.full(len(c._exp_ids), np.inf)
            span_hi = np.full(len(c._exp_ids), -np.inf)
            np.minimum.at(span_lo, exp_of_record, ts)
            np.maximum.at(span_hi, exp_of_record, ts)
            # One columnar summary of every (arm, name) series at once: series label
            # gid * n_names + name, so an experiment's series are adjacent, arm by arm, and
            # every experiment's record is one slice of each column.
            names: list[list[str]] = []
            parts_v, parts_g = [], []
            for section, cols in (("metrics", self._mcols), ("features", self._fcols)):
                for name, (vals, grp) in cols.items():
                    if vals:
                        names.append([section, name])
                        parts_v.append(np.frombuffer(vals, dtype=np.float64))
                        parts_g.append(np.frombuffer(grp, dtype=np.int64))
            n_names = max(len(names), 1)
            if names:
                gs = GroupSummaries(
                    np.concatenate(parts_v),
                    np.concatenate([g * n_names + m for m, g in enumerate(parts_g)]),
                    relative_accuracy=ra,
                    numpy_counts=True,
                )
                series = gs.labels
                row_gid = series // n_names
                # Each series' arm as its position in its record's "arms" (the experiment's
                # groups with records, ascending), and its name as a position in "names".
                # (Lookup tables, not searchsorted: a binary search per row misses the caches.)
                position = np.zeros(labels[-1] + 1, dtype=np.int64)
                position[labels] = np.arange(labels.shape[0])
                rank = position[row_gid]
                row_exp = np.repeat(np.arange(first.shape[0]), end - first)[rank]
                row_arm = rank - first[row_exp]
                row_name = series - row_gid * n_names
                # Experiment k's series are rows row_bounds[k] .. row_bounds[k + 1] - 1.
                row_bounds = np.r_[0, np.cumsum(np.bincount(row_exp, minlength=first.shape[0]))]
            else:
                gs = None
            # Every record of the flush: {"v": 2, "experiment", **head, "span", "arms",
            # "count", then "ra" .. "rows" when it has rows}, built column by column as bytes:
            # each column is serialised once for the whole flush and cut into one piece per
            # record (no per-record dicts; the bytes are those orjson.dumps of the dict gave).
            head: dict[str, Any] = {
                "config_version": c.config_version,
                "source": {"topic": self.topic, "partition": self.partition},
                "offsets": [
                    {
                        "topic": self.topic,
                        "partition": self.partition,
                        "first": self.first_offset,
                        "last": self.last_offset,
                    }
                ],
            }
            exp_pos = exp_of[first]
            ids = _ids_of(c)
            one_each = np.arange(exp_pos.shape[0] + 1)
            arm_names = ids.arms[labels].tolist()
            slots: list[Iterable[bytes]] = [
                ids.openings[exp_pos].tolist(),
                repeat(b"," + orjson.dumps(head)[1:-1] + b',"span":{"min_ts":'),
                _pieces(span_lo[exp_pos], one_each),
                repeat(b',"max_ts":'),
                _pieces(span_hi[exp_pos], one_each),
                repeat(b'},"arms":['),
                _pieces(arm_names, np.r_[first, labels.shape[0]]),
                repeat(b'],"count":['),
                _pieces(counts, np.r_[first, labels.shape[0]]),
                repeat(b"]"),
            ]
            if gs is not None:
                slots += _rows_slots(gs, names, row_arm, row_name, row_bounds, ra)
            slots.append(repeat(b"}"))
            # strict=False: the constant slots repeat endlessly; the others have a piece for
            # every record.
            values = list(map(b"".join, zip(*slots, strict=False)))
            if gs is not None and gs.collapsed:
                # An arm's histogram collapsed (its store is not columnar): version 1.
                at = row_bounds.searchsorted(gs.collapsed, side="right") - 1
                for k in sorted(set(at.tolist())):
                    a, b = int(first[k]), int(end[k])
                    rec = {
                        "experiment": c._exp_ids[exp_pos[k]],
                        **head,
                        "span": {
                            "min_ts": float(span_lo[exp_pos[k]]),
                            "max_ts": float(span_hi[exp_pos[k]]),
                        },
                        "arms": arm_names[a:b],
                        "count": counts[a:b].tolist(),
                    }
                    record = _v1_record(rec, labels[a:b].tolist(), gs, names)
                    values[k] = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
            # Sorted by key (the experiments' config order usually is already).
            key_rank = ids.rank[exp_pos]
            keys = ids.keys[exp_pos]
            if key_rank.shape[0] > 1 and not (key_rank[1:] > key_rank[:-1]).all():
                order = np.argsort(key_rank)
                keys = keys[order]
                values = [values[k] for k in order.tolist()]
            summaries = list(zip(keys.tolist(), values, strict=True))
        assert self.first_offset is not None and self.last_offset is not None
        out = Flush(
            topic=self.topic,
            partition=self.partition,
            first_offset=self.first_offset,
            last_offset=self.last_offset,
            summaries=summaries,
            deadletters=self._deadletters,
            consumed=self.consumed,
            summarised=summarised,
            skipped={"unknown_experiment": self._skipped} if self._skipped else {},
        )
        self._reset()
        return out

    def discard(self) -> None:
        """Drop what was folded since the last drain (its transaction was aborted); the caller
        rewinds the consumer to the returned offset, from which :meth:`fold` accepts records
        again."""
        first = self.first_offset
        self._reset()
        if first is not None:
            self.next_offset = first


class _Ids(NamedTuple):
    """A contract's names as arrays, for the flush's fancy indexing."""

    keys: np.ndarray  # object: summary record key (UTF-8 id) by position in the config
    rank: np.ndarray  # int64: its position in key order
    arms: np.ndarray  # object: arm name by group id
    openings: np.ndarray  # object: b'{"v":2,"experiment":"<id>"', its record's first bytes


# Built at a contract's first flush (a contract never changes; a new config is a new one).
_IDS: weakref.WeakKeyDictionary[Contract, _Ids] = weakref.WeakKeyDictionary()


def _ids_of(c: Contract) -> _Ids:
    ids = _IDS.get(c)
    if ids is None:
        keys = [e.encode() for e in c._exp_ids]
        rank = np.empty(len(keys), dtype=np.int64)
        rank[sorted(range(len(keys)), key=keys.__getitem__)] = np.arange(len(keys))
        ids = _IDS[c] = _Ids(
            _objects(keys),
            rank,
            _objects([arm for _, arm in c._groups]),
            _objects([b'{"v":2,"experiment":' + orjson.dumps(e) for e in c._exp_ids]),
        )
    return ids


def _objects(items: list[Any]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _v1_record(
    rec: dict[str, Any], groups: list[int], gs: GroupSummaries, names: list[list[str]]
) -> dict[str, Any]:
    """The version-1 form of one experiment's record: per arm, one state per name."""
    arms = {}
    n_names = len(names)
    for g, arm, n in zip(groups, rec["arms"], rec["count"], strict=True):
        body: dict[str, Any] = {"count": n, "metrics": {}, "features": {}}
        for m, (section, name) in enumerate(names):
            try:
                body[section][name] = gs.state(gs.index(g * n_names + m))
            except KeyError:  # no value of that name for this arm
                continue
        arms[arm] = body
    keep = ("experiment", "config_version", "source", "offsets", "span")
    return {"v": 1, **{key: rec[key] for key in keep}, "arms": arms}


def _rows_slots(
    gs: GroupSummaries,
    names: list[list[str]],
    row_arm: np.ndarray,
    row_name: np.ndarray,
    row_bounds: np.ndarray,
    ra: float,
) -> list[Iterable[bytes]]:
    """The slots of every version-2 record from ``"ra"`` to the end of ``"rows"``, in the key
    order the record has always had (``b""`` for a record without rows or without values of
    one sign); experiment ``k``'s rows are ``row_bounds[k]`` .. ``row_bounds[k + 1] - 1``."""
    cols = gs.columns()
    has_rows = row_bounds[1:] > row_bounds[:-1]
    dumps = orjson.dumps
    lead = b',"ra":%b,"mb":%b,"names":%b,"rows":{"count":[' % (
        dumps(ra),
        dumps(gs.max_bins),
        dumps(names),
    )
    out: list[Iterable[bytes]] = [_const(lead, has_rows), _pieces(cols.count, row_bounds)]
    for key, col in (("sum", cols.sum), ("m2", cols.m2), ("min", cols.min), ("max", cols.max)):
        out += [_const(b'],"%b":[' % key.encode(), has_rows), _pieces(col, row_bounds)]
    out += [
        _const(b'],"zero":[', has_rows),
        _pieces(cols.zero, row_bounds),
        _const(b"]", has_rows),
    ]
    for key, st in (("pos", cols.pos), ("neg", cols.neg)):
        if st is None:  # no value of that sign in the flush
            continue
        pair_bounds = st.bounds[row_bounds]
        has = pair_bounds[1:] > pair_bounds[:-1]
        out += [
            _const(b',"%b":[[' % key.encode(), has),
            _pieces(st.nnz, row_bounds, keep=has),
            _const(b"],[", has),
            _pieces(st.keys, pair_bounds),
            _const(b"],[", has),
            _pieces(st.counts, pair_bounds),
            _const(b"]]", has),
        ]
    out += [
        _const(b',"arm":[', has_rows),
        _pieces(row_arm, row_bounds),
        _const(b'],"name":[', has_rows),
        _pieces(row_name, row_bounds),
        _const(b"]}", has_rows),
    ]
    return out


def _const(piece: bytes, present: np.ndarray) -> Iterable[bytes]:
    """``piece`` for every record where ``present``, ``b""`` for the others."""
    if present.all():
        return repeat(piece)
    return [piece if p else b"" for p in present.tolist()]


_SEP = 10  # b"\n": never in orjson's output (it escapes control characters in strings)


def _pieces(items: Any, bounds: np.ndarray, keep: np.ndarray | None = None) -> list[bytes]:
    """Per group ``k`` the JSON of ``items[bounds[k]:bounds[k + 1]]`` without its brackets
    (``b""`` when empty or not ``keep``), byte for byte as in ``orjson.dumps`` of that list.

    ``items`` (a numpy array or a list of strings) is serialised once and cut at the commas
    between groups; ``bounds`` ascends from 0 to ``len(items)``.
    """
    n_groups = bounds.shape[0] - 1
    nonempty = bounds[1:] > bounds[:-1]
    if keep is not None:
        nonempty &= keep
    if not nonempty.any():
        return [b""] * n_groups
    buf = orjson.dumps(items, option=orjson.OPT_SERIALIZE_NUMPY)
    arr = np.frombuffer(buf, dtype=np.uint8)[1:-1].copy()
    commas = np.flatnonzero(arr == 44)  # b","
    if commas.shape[0] != len(items) - 1:
        # A string holds a comma (numbers never do): the separators from each one's length.
        lengths = np.array([len(orjson.dumps(x)) for x in items], dtype=np.int64)
        commas = np.cumsum(lengths + 1)[:-1] - 1
    # Cut after each group (a dropped group's elements become pieces that are then ignored).
    ends = bounds[1:][bounds[1:] > bounds[:-1]][:-1]
    arr[commas[ends - 1]] = _SEP
    pieces = arr.tobytes().split(b"\n")
    if nonempty.all():
        return pieces
    out = [b""] * n_groups
    full = np.flatnonzero(bounds[1:] > bounds[:-1])
    for k, piece in zip(full.tolist(), pieces, strict=True):
        out[k] = piece
    for k in np.flatnonzero(~nonempty).tolist():
        out[k] = b""
    return out


def _field_rejection(rec: Any, path: str, v: Any, want: str) -> DeadLetter:
    if v is None:
        return DeadLetter(rec, "missing_field", path)
    return DeadLetter(rec, "wrong_type", f"{path}: {_kind(v)}, not {want}")


def _value_rejection(rec: Any, path: str, bad: tuple[str, str, Any, Any]) -> DeadLetter:
    _, name, v, (lo, hi) = bad
    tv = type(v)
    if tv is not float and tv is not int:
        return DeadLetter(rec, "wrong_type", _clip(f"{path}.{name}: {_kind(v)}, not number"))
    return DeadLetter(rec, "out_of_range", _clip(f"{path}.{name}={v!r} outside [{lo!r}, {hi!r}]"))


def deadletter_headers(
    d: DeadLetter, *, topic: str, partition: int, config_version: str, max_record_bytes: int
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The dead-letter record's value and headers.

    The value is the original bytes, unchanged, so a fixed record can be re-produced as is;
    a record over ``max_record_bytes`` is dead-lettered with a null value (the headers point at
    it in the source topic). Headers: ``armguard.reason``, ``armguard.source.topic``,
    ``armguard.source.partition``, ``armguard.source.offset`` and ``armguard.envelope``, a small
    JSON object with all of these plus the detail, the original size and timestamp, whether the
    value is included, and the config version.
    """
    rec = d.record
    value = rec.value
    size = len(value) if value is not None else 0
    included = value is not None and size <= max_record_bytes
    envelope = {
        "v": 1,
        "reason": d.reason,
        "detail": d.detail,
        "source": {
            "topic": topic,
            "partition": partition,
            "offset": rec.offset,
            "timestamp": rec.timestamp,
        },
        "size": size,
        "value_included": included,
        "config_version": config_version,
    }
    headers = [
        ("armguard.reason", d.reason.encode()),
        ("armguard.source.topic", topic.encode()),
        ("armguard.source.partition", str(partition).encode()),
        ("armguard.source.offset", str(rec.offset).encode()),
        ("armguard.envelope", orjson.dumps(envelope)),
    ]
    return (value if included else None), headers


def fold_all(
    contract: Contract, topic: str, partition: int, records: Iterable[Any], now: float | None = None
) -> Flush | None:
    """Convenience for replay and tests: fold ``records`` of one partition and drain once."""
    acc = PartitionAccumulator(contract, topic, partition)
    acc.fold(list(records), now=now)
    return acc.drain()
