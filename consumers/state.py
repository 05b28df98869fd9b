"""The mapper's relationship index, in the state Redis.

Which weddings a vendor serves (so a vendor change fans out to every wedding) and
which regions a wedding's guests are in (so warms go only where guests will look).
Both are kept from the content topics themselves, so a replay rebuilds them.
"""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from consumers import keys
from consumers.errors import TransientError
from topology import Topology


class RelationshipIndex:
    def __init__(self, redis: Redis, topology: Topology) -> None:
        self.redis = redis
        self.topology = topology

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

    def _guard(self, what: str) -> _RedisGuard:
        return _RedisGuard(what)


class _RedisGuard:
    """Maps redis errors to TransientError, once, at this boundary."""

    def __init__(self, what: str) -> None:
        self.what = what

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, RedisError | OSError):
            raise TransientError(f"state redis: {self.what} failed: {type(exc).__name__}") from exc


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
