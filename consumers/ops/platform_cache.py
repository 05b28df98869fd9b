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


# One entry after another: SET the value and its write stamp with the TTL, add the key to
# each tag's index set and give the set the TTL too. KEYS, per entry: the key, its stamp
# key, its tags' index sets; ARGV: the TTL, the stamp, whether to write only the keys not
# cached ("1"), then per entry its value and its number of tags. One call writes a chunk
# atomically, where a pipeline of the same commands cost a command and a reply each: the
# demo's guest fills (about 100 commands a fill) were a fifth of `make run`'s CPU that way.
_PUT = """
local ttl, stamp, missing, k = ARGV[1], ARGV[2], ARGV[3] == '1', 1
for i = 4, #ARGV, 2 do
  local key, tags = KEYS[k], tonumber(ARGV[i + 1])
  local written
  if missing then
    written = redis.call('SET', key, ARGV[i], 'EX', ttl, 'NX')
  else
    written = redis.call('SET', key, ARGV[i], 'EX', ttl)
  end
  if written then
    redis.call('SET', KEYS[k + 1], stamp, 'EX', ttl)
    for j = 1, tags do
      redis.call('SADD', KEYS[k + 1 + j], key)
      redis.call('EXPIRE', KEYS[k + 1 + j], ttl)
    end
  end
  k = k + 2 + tags
end
return k - 1
"""
# Entries per script call: a call blocks the Redis server while it runs, so a large fill
# (a test's or a benchmark's 100,000 keys) goes out as several, in one pipeline.
_PUT_CHUNK = 500


async def cache_put_many(
    redis: Redis,
    entries: Iterable[tuple[str, bytes | str, list[str]]],
    *,
    ttl_s: int = 3600,
    written_at_ms: int | None = None,
    only_missing: bool = False,
) -> None:
    """`cache_put` for many (key, value, tags) entries in one round trip.

    `only_missing`: write only the entries not cached (what a cache-aside read does after
    its misses); an entry still cached keeps its value, TTL, stamp and tags."""
    stamp = written_at_ms or int(time.time() * 1000)
    calls: list[tuple[list[str], list[bytes | str | int]]] = []
    for n, (key, value, tags) in enumerate(entries):
        if n % _PUT_CHUNK == 0:
            calls.append(([], [ttl_s, stamp, "1" if only_missing else "0"]))
        call_keys, call_args = calls[-1]
        call_keys += (key, keys.written_at(key), *(keys.tag_index(tag) for tag in tags))
        call_args += (value, len(tags))
    put = redis.register_script(_PUT)
    if len(calls) == 1:
        await put(keys=calls[0][0], args=calls[0][1])
    elif calls:
        pipe = redis.pipeline(transaction=False)
        for call_keys, call_args in calls:
            await put(keys=call_keys, args=call_args, client=pipe)
        await pipe.execute()
