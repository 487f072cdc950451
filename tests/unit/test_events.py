"""CloudEvents times: RFC 3339 UTC with milliseconds, four-digit years."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from armguard.daemon.events import rfc3339

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (None, "1970-01-01T00:00:00.000Z"),
        (1_764_300_000.123, "2025-11-28T03:20:00.123Z"),
        (-0.001, "1969-12-31T23:59:59.999Z"),  # a command record without a Kafka timestamp
        (datetime(1, 1, 1, tzinfo=UTC).timestamp(), "0001-01-01T00:00:00.000Z"),
        (datetime(999, 7, 1, tzinfo=UTC).timestamp(), "0999-07-01T00:00:00.000Z"),
        (datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp(), "9999-12-31T23:59:59.000Z"),
    ],
)
def test_event_times_are_rfc3339_with_four_digit_years(ts, text):
    assert rfc3339(ts) == text and RFC3339.match(text)
