"""The memoized partitioner picks exactly what the default one does."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner

from cachesync.consumers.pipeline.kafka import CachedPartitioner


def test_same_choice_as_the_default_partitioner() -> None:
    cached, default = CachedPartitioner(max_keys=10), DefaultPartitioner()
    partitions = list(range(6))
    for i in range(50):  # more keys than the cache holds: it is cleared and refilled
        key = f"wedding:w-{i}".encode()
        assert cached(key, partitions, partitions) == default(key, partitions, partitions)
        assert cached(key, partitions, partitions) == default(key, partitions, partitions)
    assert len(cached._hashes) <= 10
