"""The mapper's relationship index, in the state Redis.

Which weddings a vendor serves (so a vendor change fans out to every wedding) and
which regions a wedding's guests are in (so warms go only where guests will look).
Both are kept from the content topics themselves, so a replay rebuilds them.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from cachesync.consumers import keys
from cachesync.consumers.errors import RedisBoundary, redis_errors
from cachesync.topology import Topology

# A batch reads and writes its sets in one script call each rather than a pipeline of
# one command per set: redis-py spends some 15 us of Python on each command of a pipeline
# (building, packing, parsing its reply), and a batch of 100 events names ~150 sets, which
# made reading and writing the index a sixth of the mapper's own CPU. A script call is one
# command whose reply hiredis parses in C. Every key a script touches is in its KEYS.
#
# Read: the members of each set named, in order.
_READ_SETS = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('SMEMBERS', KEYS[i])
end
return out
"""
# Write: the writes in order, atomically. ARGV per write: its
# command (sadd, srem, del), how many members, the members; KEYS: each write's set.
_WRITE_SETS = """
local a = 1
for i = 1, #KEYS do
  local command, n = ARGV[a], tonumber(ARGV[a + 1])
  if command == 'del' then
    redis.call('DEL', KEYS[i])
  elseif n > 0 then
    redis.call(command, KEYS[i], unpack(ARGV, a + 2, a + 1 + n))
  end
  a = a + 2 + n
end
return #KEYS
"""
# Sets per script call: Lua's unpack and one call's hold on Redis stay small.
SETS_PER_CALL = 2_000


class RelationshipIndex:
    def __init__(self, redis: Redis, topology: Topology) -> None:
        self.redis = redis
        self.topology = topology

    @functools.cached_property
    def read_sets(self) -> AsyncScript:
        return self.redis.register_script(_READ_SETS)

    @functools.cached_property
    def write_sets(self) -> AsyncScript:
        return self.redis.register_script(_WRITE_SETS)

    async def link_vendor(self, vendor_id: str, wedding_id: str) -> None:
        async with self._guard("link vendor"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.sadd(keys.vendor_weddings(vendor_id), wedding_id)
            pipe.sadd(keys.wedding_vendors(wedding_id), vendor_id)
            await pipe.execute()

    async def unlink_vendor(self, vendor_id: str, wedding_id: str) -> None:
        async with self._guard("unlink vendor"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.srem(keys.vendor_weddings(vendor_id), wedding_id)
            pipe.srem(keys.wedding_vendors(wedding_id), vendor_id)
            await pipe.execute()

    async def forget_vendor(self, vendor_id: str) -> None:
        async with self._guard("forget vendor"):
            weddings = await self.redis.smembers(keys.vendor_weddings(vendor_id))
            pipe = self.redis.pipeline(transaction=False)
            for wedding in weddings:
                pipe.srem(keys.wedding_vendors(_s(wedding)), vendor_id)
            pipe.delete(keys.vendor_weddings(vendor_id))
            await pipe.execute()

    def regions_for_countries(self, countries: Iterable[str]) -> list[str]:
        regions: dict[str, None] = {}
        for country in countries:
            region = self.topology.region_of_country(country)
            if region is not None:
                regions[region] = None
        return list(regions) or [self.topology.default_region]

    async def set_wedding_regions(self, wedding_id: str, countries: Iterable[str]) -> list[str]:
        regions = self.regions_for_countries(countries)
        async with self._guard("set wedding regions"):
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(keys.wedding_regions(wedding_id))
            pipe.sadd(keys.wedding_regions(wedding_id), *regions)
            await pipe.execute()
        return regions

    async def weddings_of(self, vendor_id: str) -> list[str]:
        async with self._guard("read vendor weddings"):
            return sorted(_s(w) for w in await self.redis.smembers(keys.vendor_weddings(vendor_id)))

    async def regions_of(self, wedding_ids: list[str]) -> dict[str, list[str]]:
        """Regions per wedding; a wedding never described gets the default region."""
        if not wedding_ids:
            return {}
        async with self._guard("read wedding regions"):
            pipe = self.redis.pipeline(transaction=False)
            for wedding in wedding_ids:
                pipe.smembers(keys.wedding_regions(wedding))
            results = await pipe.execute()
        out: dict[str, list[str]] = {}
        for wedding, members in zip(wedding_ids, results, strict=True):
            regions = sorted(r for r in (_s(m) for m in members) if r in self.topology.regions)
            out[wedding] = regions or [self.topology.default_region]
        return out

    def batch(self) -> BatchIndex:
        """A view for one batch of events: one round trip to read, one to write."""
        return BatchIndex(self)

    def _guard(self, what: str) -> RedisBoundary:
        """Redis errors become TransientError (the batch is retried), naming `what`."""
        return redis_errors(f"state redis: {what}")


class BatchIndex:
    """The index as one batch of events sees it, read and written in one round trip each.

    `prefetch` loads the sets the batch's events name; each read then comes from
    memory, updated by the batch's own earlier writes in event order (read your
    writes), so every event sees what the per-event index would have shown it. The
    writes are queued and `flush` applies them, in order, atomically, in one script call.
    A set that was not prefetched is read from Redis on first use. A batch that fails before
    `flush` leaves the index as it was, so its retry maps exactly as the first attempt:
    the mapper flushes only once every command of the batch is acknowledged. Each write
    is tagged with the `origin` set when it was queued (the event's place in its batch),
    so that `flush` can leave out the writes of events that were dead-lettered.
    Per-event calls cost a round trip each, which was most of the mapper's time
    (bench/results/profile.txt).
    """

    def __init__(self, index: RelationshipIndex) -> None:
        self.index = index
        self.redis = index.redis
        self.topology = index.topology
        self._vendor_weddings: dict[str, set[str]] = {}
        self._wedding_regions: dict[str, set[str]] = {}
        # (origin, command, key, members)
        self._writes: list[tuple[int, str, str, tuple[str, ...]]] = []
        self.origin = -1  # the event whose writes are being queued

    async def prefetch(self, vendor_ids: Iterable[str], wedding_ids: Iterable[str]) -> None:
        """Load the vendors' weddings, then the regions of those weddings and `wedding_ids`."""
        await self._load(vendors=list(vendor_ids), weddings=list(wedding_ids))
        served = {w for v in self._vendor_weddings.values() for w in v}
        await self._load(vendors=[], weddings=sorted(served))

    async def _load(self, *, vendors: list[str], weddings: list[str]) -> None:
        vendors = [v for v in dict.fromkeys(vendors) if v not in self._vendor_weddings]
        weddings = [w for w in dict.fromkeys(weddings) if w not in self._wedding_regions]
        if not vendors and not weddings:
            return
        names = [keys.vendor_weddings(v) for v in vendors]
        names += [keys.wedding_regions(w) for w in weddings]
        results: list[list[bytes]] = []
        async with self.index._guard("read relationship index"):
            for start in range(0, len(names), SETS_PER_CALL):
                results += await self.index.read_sets(keys=names[start : start + SETS_PER_CALL])
        for vendor, members in zip(vendors, results[: len(vendors)], strict=True):
            self._vendor_weddings[vendor] = {_s(m) for m in members}
        for wedding, members in zip(weddings, results[len(vendors) :], strict=True):
            self._wedding_regions[wedding] = {_s(m) for m in members}

    async def _weddings(self, vendor_id: str) -> set[str]:
        await self._load(vendors=[vendor_id], weddings=[])
        return self._vendor_weddings[vendor_id]

    async def link_vendor(self, vendor_id: str, wedding_id: str) -> None:
        (await self._weddings(vendor_id)).add(wedding_id)
        self._queue("sadd", keys.vendor_weddings(vendor_id), (wedding_id,))
        self._queue("sadd", keys.wedding_vendors(wedding_id), (vendor_id,))

    async def unlink_vendor(self, vendor_id: str, wedding_id: str) -> None:
        (await self._weddings(vendor_id)).discard(wedding_id)
        self._queue("srem", keys.vendor_weddings(vendor_id), (wedding_id,))
        self._queue("srem", keys.wedding_vendors(wedding_id), (vendor_id,))

    async def forget_vendor(self, vendor_id: str) -> None:
        weddings = await self._weddings(vendor_id)
        for wedding in sorted(weddings):
            self._queue("srem", keys.wedding_vendors(wedding), (vendor_id,))
        self._queue("del", keys.vendor_weddings(vendor_id))
        weddings.clear()

    def regions_for_countries(self, countries: Iterable[str]) -> list[str]:
        return self.index.regions_for_countries(countries)

    async def set_wedding_regions(self, wedding_id: str, countries: Iterable[str]) -> list[str]:
        regions = self.index.regions_for_countries(countries)
        self._wedding_regions[wedding_id] = set(regions)
        self._queue("del", keys.wedding_regions(wedding_id))
        self._queue("sadd", keys.wedding_regions(wedding_id), tuple(regions))
        return regions

    async def weddings_of(self, vendor_id: str) -> list[str]:
        return sorted(await self._weddings(vendor_id))

    async def regions_of(self, wedding_ids: list[str]) -> dict[str, list[str]]:
        """Regions per wedding; a wedding never described gets the default region."""
        await self._load(vendors=[], weddings=wedding_ids)
        out: dict[str, list[str]] = {}
        for wedding in wedding_ids:
            members = self._wedding_regions[wedding]
            regions = sorted(r for r in members if r in self.topology.regions)
            out[wedding] = regions or [self.topology.default_region]
        return out

    def _queue(self, command: str, key: str, members: tuple[str, ...] = ()) -> None:
        self._writes.append((self.origin, command, key, members))

    async def flush(self, *, skip: Collection[int] = ()) -> None:
        """Apply the batch's writes, in event order, atomically; not those of the events
        (origins) in `skip`."""
        writes, self._writes = [w for w in self._writes if w[0] not in skip], []
        if not writes:
            return
        calls: list[tuple[list[str], list[str | int]]] = []
        for start in range(0, len(writes), SETS_PER_CALL):
            names: list[str] = []
            args: list[str | int] = []
            for _, command, key, members in writes[start : start + SETS_PER_CALL]:
                names.append(key)
                args += (command, len(members), *members)
            calls.append((names, args))
        async with self.index._guard("write relationship index"):
            if len(calls) == 1:
                await self.index.write_sets(keys=calls[0][0], args=calls[0][1])
            else:
                # Several calls, all or none: in one MULTI/EXEC, as one call is.
                pipe = self.redis.pipeline(transaction=True)
                for names, args in calls:
                    await self.index.write_sets(keys=names, args=args, client=pipe)
                await pipe.execute()


# What the mapper reads and writes the index through: per event, or per batch.
IndexView = RelationshipIndex | BatchIndex


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
