"""The partitioner's murmur2 gives what every Kafka client gives for a key (aiokafka's
pure-Python port of the Java client's, as the reference), for every tail length."""

from __future__ import annotations

import random

from aiokafka.partitioner import murmur2 as reference

from cachesync.consumers.pipeline.kafka import Murmur2Partitioner, murmur2


def test_murmur2_matches_the_reference_for_keys_of_every_length() -> None:
    rng = random.Random(7)
    keys = [bytes(rng.randrange(256) for _ in range(n)) for n in range(0, 70) for _ in range(20)]
    keys += [b"wedding:w-0001", "vendor:ü-7".encode(), b"\xff" * 13]
    for key in keys:
        assert murmur2(key) == reference(key), key


def test_the_partitioner_places_keys_as_the_default_partitioner() -> None:
    partitions = list(range(6))
    ours = Murmur2Partitioner()
    for n in range(500):
        key = f"event-{n}".encode()
        assert ours(key, partitions, partitions) == (reference(key) & 0x7FFFFFFF) % 6
