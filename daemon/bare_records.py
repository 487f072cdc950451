"""Fetched records without a ``ConsumerRecord`` each: the ingest consumer's fast path.

For every record it returns, aiokafka's ``getmany`` builds a ``ConsumerRecord`` (an 11-field
dataclass, a tuple of the headers, two ``len`` calls) from the record object its record-batch
parser already made. Ingest reads four attributes of it (``value``, ``offset``, ``timestamp``,
``key``), which the parser's record has too, so for the ingest consumer that object and its
construction are pure overhead: about 0.6 us of the ~2.5 us per event that a plain ``getmany``
and ``orjson.loads`` loop costs on the bench's records (``bench/ingest.py`` prints both paths).

A consumer opts in by passing :func:`bare_value` as its ``value_deserializer``. Once
:func:`enable` has run, the partition records aiokafka builds for such a consumer hand out the
parser's records as they are; every other consumer of the process is untouched (the choice is
made once per fetch response, not per record). Everything else stays aiokafka's own code:
positions, ``read_committed`` filtering of aborted transactions, control batches, CRC checks.

This reaches into one private class of aiokafka (``aiokafka.consumer.fetcher.PartitionRecords``:
its constructor's parameters and its ``_consumer_record`` method), so :func:`enable` checks that
both look as expected and otherwise leaves aiokafka alone: :func:`bare_value` is then an
ordinary identity deserializer and the consumer gets ``ConsumerRecord``\\ s, correct and slower.
``tests/unit/test_bare_records.py`` fails if the installed aiokafka no longer takes the fast path,
so an upgrade that breaks it is seen, not silently slow.

Examples
--------
>>> enable()
True
>>> bare_value(b'{"a": 1}')
b'{"a": 1}'
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

__all__ = ["bare_value", "enable", "enabled"]

log = logging.getLogger("armguard.kafka")

# The constructor aiokafka's fetcher calls, positionally, in 0.11 to 0.14.
_EXPECTED = [
    "self",
    "tp",
    "records",
    "aborted_transactions",
    "fetch_offset",
    "key_deserializer",
    "value_deserializer",
    "check_crcs",
    "isolation_level",
]
_state: dict[str, bool] = {}


def bare_value(value: bytes | None) -> bytes | None:
    """The ``value_deserializer`` that marks a consumer for bare records (an identity function,
    so a consumer marked with it is correct whether or not the fast path is enabled)."""
    return value


def _bare(tp: Any, record: Any) -> Any:
    return record


def enable() -> bool:
    """Install the fast path in aiokafka's fetcher, once; return whether it is active."""
    if "active" in _state:
        return _state["active"]
    try:
        from aiokafka.consumer import fetcher
    except ImportError:  # pragma: no cover - aiokafka is a dependency
        _state["active"] = False
        return False
    base = getattr(fetcher, "PartitionRecords", None)
    params = list(inspect.signature(base.__init__).parameters) if base is not None else []
    if base is None or params != _EXPECTED or not callable(getattr(base, "_consumer_record", None)):
        log.warning(
            "aiokafka %s: its fetcher is not the one armguard's fast record path knows; "
            "ingest uses ConsumerRecords (correct, ~0.6 us per event slower)",
            getattr(__import__("aiokafka"), "__version__", "?"),
        )
        _state["active"] = False
        return False

    class BarePartitionRecords(base):  # type: ignore[misc, valid-type]
        """aiokafka's PartitionRecords; for a consumer marked with bare_value it returns the
        record parser's objects instead of building a ConsumerRecord from each."""

        def __init__(
            self,
            tp: Any,
            records: Any,
            aborted_transactions: Any,
            fetch_offset: int,
            key_deserializer: Any,
            value_deserializer: Any,
            check_crcs: bool,
            isolation_level: Any,
        ) -> None:
            super().__init__(
                tp,
                records,
                aborted_transactions,
                fetch_offset,
                key_deserializer,
                value_deserializer,
                check_crcs,
                isolation_level,
            )
            if value_deserializer is bare_value:
                # Looked up on the instance each time the record iterator yields.
                self._consumer_record = _bare

    fetcher.PartitionRecords = BarePartitionRecords
    _state["active"] = True
    return True


def enabled() -> bool:
    """Whether :func:`enable` installed the fast path."""
    return _state.get("active", False)
