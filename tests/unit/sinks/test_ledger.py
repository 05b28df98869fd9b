"""The ledger's arithmetic (which offset a flush records, what covers a record, what a
redelivered command's note says) and its TTLs against the shipped topology."""

from __future__ import annotations

from cachesync.consumers import keys
from cachesync.consumers.sinks.base import Position, Sink
from cachesync.consumers.sinks.ledger import (
    Applied,
    covers,
    offsets_to_record,
    redelivered,
)
from cachesync.topology import load_topology


def at(partition: int, offset: int, ts: int = 1_000, topic: str = "cmds") -> Position:
    return Position(topic, partition, offset, ts)


def test_a_flush_records_the_last_offset_per_partition_with_the_newest_record_time() -> None:
    """Per partition, the highest offset read and the newest record time among those covered."""
    positions = {"a": at(0, 5, 1_000), "b": at(0, 9, 900), "c": at(1, 3, 2_000)}
    assert offsets_to_record(positions) == {
        ("cmds", 0): at(0, 9, 1_000),
        ("cmds", 1): at(1, 3, 2_000),
    }


def test_the_offset_stops_short_of_a_rejected_command() -> None:
    """A rejected command is dead-lettered after the ledger is written: the recorded offset
    must not cover it, nor anything after it in its partition (a crash in between re-reads
    them); other partitions are not held back."""
    positions = {"a": at(0, 5), "bad": at(0, 6), "c": at(0, 7), "d": at(1, 2)}
    assert offsets_to_record(positions, held={"bad"}) == {
        ("cmds", 0): at(0, 5),
        ("cmds", 1): at(1, 2),
    }
    assert offsets_to_record({"bad": at(0, 6)}, held={"bad"}) == {}


def test_a_record_is_covered_at_or_below_the_offset_and_no_newer_than_any_applied() -> None:
    """Covered: offset and record time within what was applied. A newer record at a lower
    offset is not (its topic was made again); nothing is covered where nothing was applied."""
    applied = [b"10", b"5000", b"1760000000000"]
    assert covers(applied, at(0, 10, 5_000))
    assert covers(applied, at(0, 3, 4_000))
    assert not covers(applied, at(0, 11, 4_000))
    assert not covers(applied, at(0, 3, 6_000))
    assert not covers([None, None, None], at(0, 0, 0))


def test_a_redelivered_command_is_audited_as_applied_with_when() -> None:
    """Outcome "applied"; exact time from its marker, "at or before" from the offset."""
    exact = redelivered(Applied(1_767_225_600_123))
    assert exact.outcome == "applied"
    assert exact.detail == "redelivered; applied at 2026-01-01T00:00:00.123Z"
    bound = redelivered(Applied(1_767_225_600_123, exact=False))
    assert bound.detail == "redelivered; applied at or before 2026-01-01T00:00:00.123Z"
    assert redelivered(Applied(None)).detail == "redelivered; applied earlier"


def test_markers_outlive_every_tier_wait_and_offsets_outlive_the_retention() -> None:
    """APPLIED_TTL_S is at least twice the longest anything waits on a marker in the shipped
    topology (a warm's deadline, the warmer's and the edges' tier waits); the applied
    offsets and CloudFront's references outlive the command topics' retention."""
    topology = load_topology()
    deadlines = [r.warm.deadline_s for r in topology.rules.values() if r.warm is not None]
    longest = max([*deadlines, topology.cdn.warm.max_wait_s, Sink.after_max_wait_s])
    assert 2 * longest <= keys.APPLIED_TTL_S
    retention_s = topology.topics.commands.retention_ms / 1000
    assert retention_s < keys.APPLIED_OFFSET_TTL_S
    assert retention_s < keys.CLOUDFRONT_BATCH_TTL_S
