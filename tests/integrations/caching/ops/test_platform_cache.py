"""How the platform writes its cache (`ops/platform_cache.py`), read back from Redis itself:
every entry's value, TTL and write stamp, and its key in each of its tags' index sets,
for a fill small enough for one script call and for one cut into several."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.ops import platform_cache
from cachesync.consumers.ops.platform_cache import cache_put_many


@pytest.mark.parametrize("n", [3, 2 * platform_cache._PUT_CHUNK + 1])
async def test_every_entry_its_stamp_and_its_tags(region_redis: dict[str, Redis], n: int) -> None:
    redis = next(iter(region_redis.values()))
    run = uuid.uuid4().hex[:8]
    # No tag, one tag, two tags (one shared by every entry), in turn.
    entries = [
        (
            f"pc:{run}:{i}",
            f"value {i}".encode(),
            [f"pc:{run}:all", f"pc:{run}:{i}"][: i % 3],
        )
        for i in range(n)
    ]
    await cache_put_many(redis, entries, ttl_s=600, written_at_ms=1_234)
    for key, value, tags in entries:
        assert await redis.get(key) == value
        assert 0 < await redis.ttl(key) <= 600
        assert await redis.get(keys.written_at(key)) == b"1234"
        assert 0 < await redis.ttl(keys.written_at(key)) <= 600
        for tag in tags:
            assert await redis.sismember(keys.tag_index(tag), key)
            assert 0 < await redis.ttl(keys.tag_index(tag)) <= 600
    tagged_all = [key for key, _, tags in entries if f"pc:{run}:all" in tags]
    members = await redis.smembers(keys.tag_index(f"pc:{run}:all"))
    assert sorted(m.decode() for m in members) == sorted(tagged_all)


async def test_only_missing_writes_what_is_not_cached(region_redis: dict[str, Redis]) -> None:
    """A cache-aside fill: the entry still cached keeps its value, stamp and tags; the
    missing one is written with its stamp and tags."""
    redis = next(iter(region_redis.values()))
    run = uuid.uuid4().hex[:8]
    cached, missing = f"pc:{run}:cached", f"pc:{run}:missing"
    await cache_put_many(redis, [(cached, b"old", [f"pc:{run}:a"])], ttl_s=600, written_at_ms=1)
    await cache_put_many(
        redis,
        [(cached, b"new", [f"pc:{run}:b"]), (missing, b"new", [f"pc:{run}:b"])],
        ttl_s=600,
        written_at_ms=2,
        only_missing=True,
    )
    assert await redis.get(cached) == b"old"
    assert await redis.get(keys.written_at(cached)) == b"1"
    assert await redis.get(missing) == b"new"
    assert await redis.get(keys.written_at(missing)) == b"2"
    assert await redis.smembers(keys.tag_index(f"pc:{run}:b")) == {missing.encode()}
    assert await redis.smembers(keys.tag_index(f"pc:{run}:a")) == {cached.encode()}
