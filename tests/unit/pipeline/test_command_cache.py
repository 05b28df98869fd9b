"""Sink roles of one process decode a command message once and share the command."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import ConsumerRecord

from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.pipeline import roles
from cachesync.consumers.pipeline.roles import CommandCache, SinkRole
from cachesync.schemas import SchemaCatalog, SingleObjectCodec

CODEC = SingleObjectCodec(SchemaCatalog())


def purge(n: int) -> PurgeCommand:
    return PurgeCommand(
        command_id=f"cmd-{n}",
        origin_event_id=f"ev-{n}",
        origin_event_type="photo.updated",
        origin_occurred_at=1_764_000_000_000 + n,
        region="eu-west",
        entity="wedding:w1",
        version=1_764_000_000_000 + n,
        issued_at=1_764_000_000_100 + n,
        scope="wedding",
        keys=("wedding:w1:gallery",),
        tags=("wedding:w1",),
    )


def message(value: bytes, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        "cache.commands.eu-west", 0, offset, 0, 0, b"k", value, None, 1, len(value), []
    )


def test_the_oldest_command_goes_first_past_the_size() -> None:
    cache = CommandCache(size=2)
    a, b, c = purge(1), purge(2), purge(3)
    cache.put(b"a", a)
    cache.put(b"b", b)
    cache.put(b"c", c)

    assert cache.get(b"a") is None
    assert cache.get(b"b") is b and cache.get(b"c") is c


async def test_two_sinks_of_a_process_share_the_command_decoded_from_the_same_bytes(
    monkeypatch,
) -> None:
    """The second sink to read a message takes the first's command; different bytes (a
    different command) are decoded on their own."""
    monkeypatch.setattr(roles, "_COMMANDS", CommandCache())
    # Two sinks as far as decoding goes: each with its own codec.
    sinks = [SimpleNamespace(codec=SingleObjectCodec(SchemaCatalog())) for _ in range(2)]
    value = CODEC.encode("purge", purge(1).to_record())
    other = CODEC.encode("purge", purge(2).to_record())

    first = await SinkRole._decode(sinks[0], message(value))
    second = await SinkRole._decode(sinks[1], message(value, offset=1))
    third = await SinkRole._decode(sinks[1], message(other, offset=2))

    assert first == purge(1) and second is first
    assert third == purge(2) and third is not first
