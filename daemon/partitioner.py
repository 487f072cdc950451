"""Kafka's default partitioner for many keys at once.

A flush of 10,000 experiments writes 10,000 keyed summaries; aiokafka's ``murmur2`` is pure
Python (~2 us a key). :func:`partitions_of` hashes every key in a few numpy passes (one per
distinct key length), bit for bit the Java client's ``Utils.murmur2``, and picks the partition
as its default partitioner does: ``(murmur2(key) & 0x7fffffff) % partitions``.

Examples
--------
>>> from aiokafka.partitioner import murmur2
>>> keys = [b"ranker-v2", b"exp-00001", b"u1"]
>>> partitions_of(keys, 6).tolist() == [(murmur2(k) & 0x7FFFFFFF) % 6 for k in keys]
True
"""

from __future__ import annotations

import numpy as np

__all__ = ["murmur2_many", "partitions_of"]

_M = np.uint32(0x5BD1E995)


def murmur2_many(keys: list[bytes]) -> np.ndarray:
    """Kafka's murmur2 hash of every key, vectorised over keys of equal length (uint32).

    Bit for bit the Java client's ``Utils.murmur2`` (and aiokafka's pure-Python copy), which picks
    the partition of a keyed record; one numpy pass per distinct key length.

    >>> from aiokafka.partitioner import murmur2
    >>> [int(h) for h in murmur2_many([b"u1", b"ranker-v2"])] == [
    ...     murmur2(b"u1") & 0xFFFFFFFF, murmur2(b"ranker-v2") & 0xFFFFFFFF]
    True
    """
    out = np.empty(len(keys), dtype=np.uint32)
    if not keys:
        return out
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
    for length in set(lengths.tolist()):  # (np.unique's first call costs ~6 ms of imports)
        rows = np.flatnonzero(lengths == length)
        data = np.frombuffer(b"".join(keys[j] for j in rows.tolist()), dtype=np.uint8)
        data = data.reshape(len(rows), length)
        h = np.full(len(rows), (0x9747B28C ^ length) & 0xFFFFFFFF, dtype=np.uint32)
        n4 = length // 4
        if n4:
            words = np.ascontiguousarray(data[:, : 4 * n4]).view("<u4")
            for i in range(n4):
                k = words[:, i] * _M
                k ^= k >> np.uint32(24)
                k *= _M
                h *= _M
                h ^= k
        tail = length & ~3
        extra = length % 4
        if extra >= 3:
            h ^= data[:, tail + 2].astype(np.uint32) << np.uint32(16)
        if extra >= 2:
            h ^= data[:, tail + 1].astype(np.uint32) << np.uint32(8)
        if extra >= 1:
            h ^= data[:, tail].astype(np.uint32)
            h *= _M
        h ^= h >> np.uint32(13)
        h *= _M
        h ^= h >> np.uint32(15)
        out[rows] = h
    return out


def partitions_of(keys: list[bytes], partitions: int) -> np.ndarray:
    """The partition (int64) Kafka's default partitioner gives each key among ``partitions``."""
    return (murmur2_many(keys) & np.uint32(0x7FFFFFFF)).astype(np.int64) % partitions
