"""How the platform writes its Redis cache so that cachesync can purge it by tag.

Every entry is SET with a TTL, stamped with its write time (`keys.WRITTEN_AT`) and
its key is added to the tag index set of each of its tags (see `keys.TAG_INDEX`).
The demo, tests and benchmarks use this to fill a region's cache the way the
platform does.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from redis.asyncio import Redis

from cachesync.consumers import keys


async def cache_put(
    redis: Redis,
    key: str,
    value: bytes | str,
    *,
    tags: Iterable[str] = (),
    ttl_s: int = 3600,
    written_at_ms: int | None = None,
) -> None:
    """Write one entry, stamp its write time and index it under its tags.

    `written_at_ms` is when the data was read from the source of truth (now, unless a
    test or a backup restore says otherwise)."""
    await cache_put_many(
        redis, [(key, value, list(tags))], ttl_s=ttl_s, written_at_ms=written_at_ms
    )


async def cache_put_many(
    redis: Redis,
    entries: Iterable[tuple[str, bytes | str, list[str]]],
    *,
    ttl_s: int = 3600,
    written_at_ms: int | None = None,
) -> None:
    """`cache_put` for many (key, value, tags) entries in one round trip."""
    stamp = written_at_ms or int(time.time() * 1000)
    pipe = redis.pipeline(transaction=False)
    for key, value, tags in entries:
        pipe.set(key, value, ex=ttl_s)
        pipe.set(keys.written_at(key), stamp, ex=ttl_s)
        for tag in tags:
            pipe.sadd(keys.tag_index(tag), key)
            pipe.expire(keys.tag_index(tag), ttl_s)
    await pipe.execute()
