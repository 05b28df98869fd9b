"""The vendor API cache's Redis: entries and locks through cashews, tags in cachesync's tag index.

Entries are written with cashews (JSON, with a TTL) and fetches are serialised with
its Redis lock (`SET NX PX` plus a compare-and-delete script), so one caller in any
process goes upstream. Tags are not cashews' own (`_tag:` sets, which the Redis sink
does not know): every entry key is added to `keys.tag_index(tag)`, the sets the Redis
sink purges, so `vendor.updated`, `vendor.deleted`, `vendor_api.changed` and
`wedding.*` reach these entries with no change to the sink.

A purge can land while a fetch is in flight; storing that fetch afterwards would
resurrect what the purge removed. So before going upstream the fetcher puts a marker
in each tag set, and stores its result only if every marker survived (a purge deletes
the sets): the lease idea of Facebook's memcache, on our tag index.

Redis errors become `CacheUnavailable` here, through the project's one Redis mapping
(`errors.redis_errors`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from cashews import Cache, CacheBackendInteractionError
from pydantic import ValidationError
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.errors import CacheUnavailable, LockHeld, RedisBoundary, redis_errors
from cachesync.consumers.vendor_api.entry import StoredEntry

log = logging.getLogger(__name__)


# Extend a set's TTL to at least ARGV[n] ms, never shorten it: the set must outlive
# every key it indexes, or a purge would miss the longer-lived ones.
_EXTEND = """
local function extend(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"""

# KEYS: tag index sets. ARGV[1] fill marker, ARGV[2] TTL in ms.
_RESERVE_SCRIPT = (
    _EXTEND
    + """
for i = 1, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[1])
  extend(KEYS[i], tonumber(ARGV[2]))
end
return 1
"""
)

# KEYS: tag index sets. ARGV[1] entry key, ARGV[2] fill marker, ARGV[3] TTL in ms.
# Returns 1 when the entry is now indexed, 0 when a purge removed a marker meanwhile.
_REGISTER_SCRIPT = (
    _EXTEND
    + """
local intact = 1
for i = 1, #KEYS do
  if redis.call('SISMEMBER', KEYS[i], ARGV[2]) == 0 then intact = 0 end
end
for i = 1, #KEYS do
  redis.call('SREM', KEYS[i], ARGV[2])
end
if intact == 0 then return 0 end
for i = 1, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[1])
  extend(KEYS[i], tonumber(ARGV[3]))
end
return 1
"""
)


class EntryStore:
    """Entries, fetch locks and tag registration in one region's Redis."""

    def __init__(self, redis_url: str, *, socket_timeout_s: float = 2.0) -> None:
        self.redis_url = redis_url
        # One cashews instance per store (not the module-global `cashews.cache`), so
        # several clients, regions or tests in one process never share a backend.
        self._cache = Cache(name=f"cachesync-vendor-api-{uuid.uuid4().hex[:8]}")
        self._cache.setup(
            redis_url,
            suppress=False,  # a Redis error must surface, to be mapped below
            pickle_type="json",
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            max_connections=64,
            client_name="cachesync-vendor-api",
        )
        self._redis = Redis.from_url(
            redis_url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        self._reserve = self._redis.register_script(_RESERVE_SCRIPT)
        self._register = self._redis.register_script(_REGISTER_SCRIPT)

    async def get(self, key: str) -> StoredEntry | None:
        with _redis("get"):
            raw = await self._cache.get(key)
        if raw is None:
            return None
        try:
            return StoredEntry.model_validate(raw)
        except ValidationError:
            # Written by an older or foreign writer: a miss, and the next fetch replaces it.
            log.warning("vendor api cache: unreadable entry %s, treated as a miss", key)
            return None

    @asynccontextmanager
    async def lock(self, key: str, *, ttl_s: float) -> AsyncIterator[None]:
        """Hold the cross-process fetch lock for `key`, or raise `LockHeld` at once."""
        token = uuid.uuid4().hex
        with _redis("lock"):
            acquired = await self._cache.set_lock(key, token, expire=ttl_s)
        if not acquired:
            raise LockHeld(key)
        try:
            yield
        finally:
            try:
                with _redis("unlock"):
                    await self._cache.unlock(key, token)
            except CacheUnavailable:
                # It expires by itself within ttl_s; waiters then take their turn.
                log.warning("vendor api cache: could not release lock %s", key, exc_info=True)

    async def is_locked(self, key: str) -> bool:
        with _redis("is_locked"):
            return bool(await self._cache.is_locked(key))

    async def reserve(self, tags: Iterable[str], marker: str, *, ttl_s: float) -> None:
        """Put `marker` in each tag's index set before a fetch (see the module docstring)."""
        sets = [keys.tag_index(t) for t in tags]
        with _redis("reserve"):
            await self._reserve(keys=sets, args=[marker, _ms(ttl_s)])

    async def release(self, tags: Iterable[str], marker: str) -> None:
        """Take back a reservation whose fetch stored nothing."""
        with _redis("release"):
            pipe = self._redis.pipeline(transaction=False)
            for tag in tags:
                pipe.srem(keys.tag_index(tag), marker)
            await pipe.execute()

    async def put(
        self, key: str, entry: StoredEntry, tags: list[str], marker: str, *, ttl_s: float
    ) -> bool:
        """Store `entry` and index it under `tags`; False if a purge came during the fetch.

        The entry is written first and indexed second: a purge between the two removes
        the marker, the index step reports it, and the entry is deleted again.
        """
        sets = [keys.tag_index(t) for t in tags]
        with _redis("put"):
            await self._cache.set(key, entry.model_dump(mode="json"), expire=ttl_s)
            indexed = await self._register(keys=sets, args=[key, marker, _ms(ttl_s)])
            if not indexed:
                await self._cache.delete(key)
        return bool(indexed)

    async def delete(self, key: str) -> None:
        with _redis("delete"):
            await self._cache.delete(key)

    async def ttl_s(self, key: str) -> float | None:
        """Seconds Redis keeps `key`, None if absent (for tests and the CLI)."""
        with _redis("pttl"):
            pttl = int(await self._redis.pttl(key))
        return None if pttl < 0 else pttl / 1000

    async def close(self) -> None:
        await self._cache.close()
        await self._redis.aclose()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _redis(op: str) -> RedisBoundary:
    """Redis errors (cashews wraps them) become CacheUnavailable, naming the operation."""
    return redis_errors(
        f"vendor api cache: redis {op}", into=CacheUnavailable, also=(CacheBackendInteractionError,)
    )
