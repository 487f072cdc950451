"""The summary record: what ingest writes to ``armguard.summaries``, one per experiment and flush.

Key: the experiment id (UTF-8). Value: JSON. Every version carries

* ``experiment``, ``config_version`` (hash of the experiments file the contract came from);
* ``source`` ``{"topic", "partition"}`` and ``offsets`` ``[{"topic", "partition", "first",
  "last"}]``: the input partition and the offset range the record covers;
* ``span`` ``{"min_ts", "max_ts"}``: the event-time span of its records (seconds).

**Version 2** (written since the columnar flush) holds every (arm, name) series of the record in
one table of columns, so a flush of 10,000 experiments builds 10,000 small tables instead of
~100,000 per-arm summary states:

.. code-block:: text

    "v": 2,
    "arms": ["control", "treatment"],        # arms with records in this flush
    "count": [523, 498],                     # their record counts (SRM counts these)
    "ra": 0.01, "mb": 2048,                  # histogram relative accuracy and max bins
    "names": [["metrics", "latency_ms"], ["features", "query_length"]],
    "rows": {                                # one entry per series, in every column:
        "arm": [0, 0, 1, 1],                 #   its arm (index in "arms")
        "name": [0, 1, 0, 1],                #   its metric or feature (index in "names")
        "count": [...], "sum": [...], "m2": [...], "min": [...], "max": [...],
        "zero": [...],                       #   values in the histogram's zero bucket
        "pos": [nonzero, keys, counts],      #   log buckets of the positive values: per row
        "neg": [nonzero, keys, counts]}      #   the number of non-empty buckets, then the
                                             #   keys and counts of all rows concatenated
                                             #   ("pos"/"neg" absent: no value of that sign;
                                             #   "ra", "mb", "names" and "rows" absent: no
                                             #   metric or feature values at all)

Each row is exactly the :class:`~armguard.detectors.summary.Summary` whose state is
``{"v": 1, "n": count, "sum": sum, "mean": sum / count, "m2": m2, "min": min, "max": max,
"h": {"ra": ra, "mb": mb, "p": [keys, counts], "n": [keys, counts], "z": zero}}`` (the mean of
an ingest summary is computed as ``sum / count``, so it is not written).

**Version 1** (still read: records already on the topic) holds one ``Summary.to_state()`` per
arm and name: ``"arms": {"control": {"count": 523, "metrics": {"latency_ms": <state>},
"features": {...}}}``. Ingest writes it for an experiment one of whose arms spans more than
``max_bins`` histogram keys (its collapsed store is not columnar).

:func:`arm_states` reads either into the version-1 per-arm form the evaluate stage merges.

Examples
--------
>>> rec = {"v": 2, "experiment": "e", "ra": 0.01, "mb": 2048, "arms": ["control", "t"],
...        "count": [2, 1], "names": [["metrics", "latency_ms"]],
...        "rows": {"arm": [0], "name": [0], "count": [2], "sum": [3.0], "m2": [0.5],
...                 "min": [1.0], "max": [2.0], "zero": [0], "pos": [[2], [0, 35], [1, 1]]}}
>>> arms = arm_states(rec)
>>> arms["t"]
{'count': 1, 'metrics': {}, 'features': {}}
>>> st = arms["control"]["metrics"]["latency_ms"]
>>> st["mean"], st["h"]["p"]
(1.5, [[0, 35], [1, 1]])
"""

from __future__ import annotations

from typing import Any

__all__ = ["arm_states"]

_EMPTY_STORE: list[Any] = [0, []]


def arm_states(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per arm ``{"count", "metrics": {name: Summary state}, "features": {...}}`` of a summary
    record of either version.

    Raises ``ValueError``, ``TypeError`` or ``KeyError`` on a record of another shape (a
    malformed version-2 record always raises ``ValueError``, naming what is wrong).
    """
    version = rec.get("v", 1)
    if version == 1:
        arms = rec["arms"]
        if not isinstance(arms, dict):
            raise TypeError("a version-1 summary record's arms must be an object")
        return arms
    if version != 2:
        raise ValueError(f"unknown summary record version {version!r}")
    try:
        return _decode(rec)
    except (AttributeError, IndexError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise ValueError(f"malformed version-2 summary record: {exc!r}") from None


def _decode(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    names = rec["arms"]
    counts = rec["count"]
    if not isinstance(names, list) or not isinstance(counts, list) or len(names) != len(counts):
        raise TypeError("a version-2 summary record needs lists arms and count of one length")
    out: dict[str, dict[str, Any]] = {
        arm: {"count": int(n), "metrics": {}, "features": {}}
        for arm, n in zip(names, counts, strict=True)
    }
    rows = rec.get("rows")
    if rows is None:
        return out
    series = rec["names"]
    ra = rec["ra"]
    mb = rec["mb"]
    arm_of, name_of = rows["arm"], rows["name"]
    n = rows["count"]
    sums, m2s, mins, maxs, zeros = rows["sum"], rows["m2"], rows["min"], rows["max"], rows["zero"]
    k = len(arm_of)
    if (
        not len(name_of)
        == len(n)
        == len(sums)
        == len(m2s)
        == len(mins)
        == len(maxs)
        == len(zeros)
        == k
    ):
        raise TypeError("the columns of rows have different lengths")
    if k and not (
        0 <= min(arm_of) <= max(arm_of) < len(names)
        and 0 <= min(name_of) <= max(name_of) < len(series)
    ):
        raise IndexError("a row's arm or name is out of range")
    pos = _stores(rows.get("pos"), k)
    neg = _stores(rows.get("neg"), k)
    sections = {"metrics", "features"}
    for r in range(k):
        count = n[r]
        if type(count) is not int or count <= 0:
            raise TypeError("a row's count must be a positive integer")
        section, name = series[name_of[r]]
        if section not in sections:
            raise TypeError(f"unknown section {section!r}")
        if type(name) is not str:  # merged under it, it failed the next snapshot's sort
            raise TypeError(f"a series name must be a string, got {name!r:.40}")
        out[names[arm_of[r]]][section][name] = {
            "v": 1,
            "n": count,
            "sum": sums[r],
            "mean": sums[r] / count,
            "m2": m2s[r],
            "min": mins[r],
            "max": maxs[r],
            "h": {"ra": ra, "mb": mb, "p": pos[r], "n": neg[r], "z": zeros[r]},
        }
    return out


def _stores(col: Any, rows: int) -> list[list[Any]]:
    """Per row the sparse store ``[keys, counts]`` (``[0, []]`` when empty)."""
    if col is None:
        return [_EMPTY_STORE] * rows
    nonzero, keys, counts = col
    if len(nonzero) != rows or len(keys) != len(counts) or sum(nonzero) != len(keys):
        raise TypeError("a histogram column's lengths do not add up")
    if counts and min(counts) <= 0:  # only non-empty buckets are written
        raise TypeError("a histogram bucket count must be a positive integer")
    out = []
    at = 0
    for m in nonzero:
        if m:
            out.append([keys[at : at + m], counts[at : at + m]])
            at += m
        else:
            out.append(_EMPTY_STORE)
    return out
