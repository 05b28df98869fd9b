"""A purge too large for one command is split into parts: every item kept, each part within
the budget, ids distinct and the same on every mapping of the same event."""

from __future__ import annotations

from cachesync.consumers.commands import PurgeCommand, command_id
from cachesync.consumers.mapping.mapper import MAX_PURGE_BYTES, Mapper
from cachesync.consumers.ops.publish import new_event
from cachesync.schemas import SchemaCatalog, SingleObjectCodec
from tests.unit.test_mapper_rules import ALL, T0, TOPOLOGY, MemoryIndex

CODEC = SingleObjectCodec(SchemaCatalog())


def _mapper(weddings: int, *, max_purge_bytes: int = MAX_PURGE_BYTES) -> Mapper:
    index = MemoryIndex(TOPOLOGY)
    index.vendor_weddings = {"v1": {f"w{i:05d}" for i in range(weddings)}}
    return Mapper(TOPOLOGY, index, clock=lambda: T0 / 1000 + 1, max_purge_bytes=max_purge_bytes)


def _update() -> dict[str, object]:
    return new_event(
        "vendor.updated",
        event_id="e1",
        occurred_at=T0,
        vendor_id="v1",
        category="band",
        changed_fields=["bio"],
    )


async def _purges(mapper: Mapper) -> list[PurgeCommand]:
    commands = await mapper.map_event("vendor.updated", _update())
    return [c for c in commands if isinstance(c, PurgeCommand)]


async def test_a_small_purge_is_one_command_per_region_with_the_unsplit_id() -> None:
    """Two weddings: one purge per region, its id the one every earlier release gave it."""
    purges = await _purges(_mapper(2))

    assert [p.region for p in purges] == ALL
    assert [p.command_id for p in purges] == [command_id("e1", r, "purge") for r in ALL]


async def test_a_large_purge_is_split_within_the_budget_keeping_every_item_once() -> None:
    """5,000 weddings at a 16 KiB budget: several parts per region, each encoding near the
    budget, together every key and URL once, same entity and version, distinct ids."""
    budget = 16 * 1024
    purges = await _purges(_mapper(5_000, max_purge_bytes=budget))

    for region in ALL:
        parts = [p for p in purges if p.region == region]
        assert len(parts) > 5
        assert parts[0].command_id == command_id("e1", region, "purge")
        assert len({p.command_id for p in parts}) == len(parts)
        assert {(p.entity, p.version, p.scope) for p in parts} == {("vendor:v1", T0, "vendor")}
        for part in parts:
            assert len(CODEC.encode("purge", part.to_record())) <= budget + 1024
        keys = [k for p in parts for k in p.keys]
        urls = [u for p in parts for u in p.urls]
        assert len(keys) == len(set(keys)) == 5_000 + 2
        assert len(urls) == len(set(urls)) == 5_000 + 1
        assert {"wedding:w04999:vendors", "vendor:v1", "vendor:v1:profile"} <= set(keys)
        assert [pre for p in parts for pre in p.prefixes] == ["/vendors/v1/assets/"]
        # Later tiers wait for the event until its last part: they count down to it.
        assert [p.parts_after for p in parts] == list(range(len(parts) - 1, -1, -1))


async def test_splitting_is_the_same_on_every_mapping_of_the_event() -> None:
    """A retried or replayed event splits into the same parts under the same ids."""
    first = await _purges(_mapper(3_000, max_purge_bytes=8 * 1024))
    again = await _purges(_mapper(3_000, max_purge_bytes=8 * 1024))

    assert first == again


async def test_an_item_larger_than_the_budget_makes_a_part_of_its_own() -> None:
    """One oversized item is never cut: it goes alone, the rest around it in other parts."""
    mapper = _mapper(0, max_purge_bytes=1024)
    path = "/weddings/w1/photos/" + "p" * 4000
    event = new_event(
        "photo.updated",
        event_id="e2",
        occurred_at=T0,
        wedding_id="w1",
        photo_id="p1",
        album_id=None,
        path=path,
        changed_fields=["caption"],
    )
    commands = await mapper.map_event("photo.updated", event)
    parts = [c for c in commands if isinstance(c, PurgeCommand) and c.region == "eu-west"]

    assert [p.urls for p in parts if path in p.urls] == [(path,)]
    assert {k for p in parts for k in p.keys} == {"photo:p1", "wedding:w1:gallery"}
