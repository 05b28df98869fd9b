"""A CDN sink's ledger written and read in one script call per flush, not one command per purge.

`PurgeLedger` (sinks/ledger.py) records a flush's purges as a pipeline of Redis commands:
two SETs per purge (its marker and its event's), a fence script call per entity and per
URL, and reads them back with an MGET of every marker. At the HTTP-purge sink's rate
(thousands of URLs a second, one purge each) building and parsing those commands in
redis-py costs more CPU than the purges themselves (some 1.7 us per argument). This
ledger keeps the same records with the same meaning (markers, fences, applied offsets,
read back the same way) but hands Redis each flush as one script call per chunk of
`COMMANDS_PER_CALL` purges, its keys packed into one length-prefixed argument ("<bytes>:
<item>" repeated, so that an item may hold any character) that the script unpacks, each
after its kind's prefix (`cachesync:applied:<sink>:`, `cachesync:purged:<sink>:`, given
once):

- `record`: every marker set to now (an event's only at its last part, `parts_after` 0,
  as `PurgeLedger` does), every fence raised to the flush's newest version
  (never lowered), then the partitions' applied offsets moved (in the last call of the
  flush: the chunks run in order on one connection, so an offset never covers a purge
  whose records are not written). Each call is atomic, which the pipeline was not;
- `applied_before`: the partitions' applied offsets, and only the markers that exist
  (their index in the flush and their value), not a reply per purge.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import redis_errors
from cachesync.consumers.sinks.base import Position
from cachesync.consumers.sinks.ledger import (
    Applied,
    PurgeLedger,
    applied_at,
    covers,
    offsets_to_record,
)

# Purges per script call: a flush of 5,000 is five calls in one round trip, each holding
# Redis a few milliseconds at most.
COMMANDS_PER_CALL = 1_000

# Unpacks a length-prefixed argument into a table of keys, each `prefix` .. the item.
_UNPACK = """
local function unpack_keys(blob, prefix)
  local out, pos, n = {}, 1, #blob
  while pos <= n do
    local colon = string.find(blob, ':', pos, true)
    local len = tonumber(string.sub(blob, pos, colon - 1))
    out[#out + 1] = prefix .. string.sub(blob, colon + 1, colon + len)
    pos = colon + len + 1
  end
  return out
end
"""

# KEYS: the applied-offset hashes to move. ARGV[1] now (ms), [2] marker TTL, [3] fence TTL,
# [4] offset TTL, [5] the markers' prefix, [6] the markers (packed: what follows the
# prefix), [7] the fences' prefix, [8] the fences (packed entity, version pairs), then for
# each KEYS[i] the offset and record time it moves to (as ledger._ADVANCE_OFFSET: past its
# offset, or a record newer than any applied; the newest record time is kept).
_RECORD = (
    _UNPACK
    + """
local now, marker_ttl, fence_ttl, offset_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
for _, key in ipairs(unpack_keys(ARGV[6], ARGV[5])) do
  redis.call('SET', key, now, 'EX', marker_ttl)
end
local fences = unpack_keys(ARGV[8], '')
for i = 1, #fences, 2 do
  local key, version = ARGV[7] .. fences[i], fences[i + 1]
  if tonumber(version) > tonumber(redis.call('GET', key) or '-1') then
    redis.call('SET', key, version, 'EX', fence_ttl)
  else
    redis.call('EXPIRE', key, fence_ttl)
  end
end
for i = 1, #KEYS do
  local offset, record_ts = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  local cur = redis.call('HMGET', KEYS[i], 'offset', 'record_ts')
  local ts = tonumber(cur[2] or '-1')
  if tonumber(offset) > tonumber(cur[1] or '-1') or tonumber(record_ts) > ts then
    local newest = record_ts
    if ts > tonumber(record_ts) then newest = cur[2] end
    redis.call('HSET', KEYS[i], 'offset', offset, 'record_ts', newest, 'applied_at', now)
  end
  redis.call('EXPIRE', KEYS[i], offset_ttl)
end
return 0
"""
)

# KEYS: the applied-offset hashes to read. ARGV[1]: the markers' prefix, [2] the markers
# (packed). Reply: offset, record_ts, applied_at of each KEYS[i] (nil when absent), then
# the index (1-based) and value of each marker that exists.
_APPLIED_BEFORE = (
    _UNPACK
    + """
local reply = {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'offset', 'record_ts', 'applied_at')
  reply[#reply + 1] = v[1]; reply[#reply + 1] = v[2]; reply[#reply + 1] = v[3]
end
for i, key in ipairs(unpack_keys(ARGV[2], ARGV[1])) do
  local marker = redis.call('GET', key)
  if marker then reply[#reply + 1] = i; reply[#reply + 1] = marker end
end
return reply
"""
)


def pack(items: Iterable[str]) -> bytes:
    """Strings as one argument the scripts unpack: "<bytes>:<item>" for each."""
    parts = []
    for item in items:
        size = len(item) if item.isascii() else len(item.encode())
        parts.append(f"{size}:{item}")
    return "".join(parts).encode()


def _prefix(key_of: Callable[[str, str], str], sink: str) -> str:
    """What `key_of(sink, x)` puts before x (the script adds it back to each packed item)."""
    prefix = key_of(sink, "")
    assert key_of(sink, "x") == prefix + "x", f"{key_of.__name__} is not a prefix and its item"
    return prefix


class FlushLedger(PurgeLedger):
    """`PurgeLedger`'s records, written and read in one script call per chunk of a flush."""

    def __init__(self, redis: Redis, sink: str, region: str) -> None:
        super().__init__(redis, sink, region)
        self._record_script = redis.register_script(_RECORD)
        self._applied_script = redis.register_script(_APPLIED_BEFORE)
        # Markers (`keys.applied`, and `keys.applied_event` under it) and fences
        # (`keys.purge_version`) travel as what follows their sink's prefix.
        self._marker_prefix = _prefix(keys.applied, sink)
        self._event_marker = keys.APPLIED_EVENT.format(event_id="")
        self._fence_prefix = _prefix(keys.purge_version, sink)

    async def record(
        self,
        commands: Sequence[PurgeCommand],
        *,
        positions: Mapping[str, Position] | None = None,
        held: Collection[str] = (),
    ) -> None:
        if not commands and not positions:
            return
        now = int(time.time() * 1000)
        # The newest version per entity and per URL over the whole flush (fences only grow).
        newest: dict[str, int] = {}
        for cmd in commands:
            if newest.get(cmd.entity, -1) < cmd.version:
                newest[cmd.entity] = cmd.version
            for url in cmd.urls:
                target = keys.url_target(url)
                if newest.get(target, -1) < cmd.version:
                    newest[target] = cmd.version
        fences = list(newest.items())
        offsets = offsets_to_record(positions or {}, held)
        per = COMMANDS_PER_CALL
        n_calls = max(math.ceil(len(commands) / per), math.ceil(len(fences) / per), 1)
        event = self._event_marker
        calls: list[tuple[list[str], list[int | str | bytes]]] = []
        for c in range(n_calls):
            chunk = commands[c * per : (c + 1) * per]
            # The event's marker only at its last part: later tiers wait for the whole purge.
            markers = pack(
                [cmd.command_id for cmd in chunk]
                + [event + cmd.origin_event_id for cmd in chunk if cmd.parts_after == 0]
            )
            fence_args = pack(
                item
                for entity, version in fences[c * per : (c + 1) * per]
                for item in (entity, str(version))
            )
            last = c == n_calls - 1
            offset_keys = [keys.applied_offset(self.sink, t, p) for t, p in offsets] if last else []
            offset_args = (
                [v for p in offsets.values() for v in (p.offset, p.timestamp)] if last else []
            )
            calls.append(
                (
                    offset_keys,
                    [
                        now,
                        keys.APPLIED_TTL_S,
                        keys.PURGE_VERSION_TTL_S,
                        keys.APPLIED_OFFSET_TTL_S,
                        self._marker_prefix,
                        markers,
                        self._fence_prefix,
                        fence_args,
                        *offset_args,
                    ],
                )
            )
        with redis_errors(f"{self.sink} {self.region}: recording applied purges"):
            if len(calls) == 1:
                await self._record_script(keys=calls[0][0], args=calls[0][1])
                return
            # In order on one connection: the offsets (last call) after every record.
            pipe = self.redis.pipeline(transaction=False)
            for call_keys, call_args in calls:
                await self._record_script(keys=call_keys, args=call_args, client=pipe)
            await pipe.execute()

    async def applied_before(
        self, commands: Sequence[PurgeCommand], positions: Mapping[str, Position]
    ) -> dict[str, Applied]:
        if not commands:
            return {}
        partitions = sorted({(p.topic, p.partition) for p in positions.values()})
        offset_keys = [keys.applied_offset(self.sink, t, p) for t, p in partitions]
        per = COMMANDS_PER_CALL
        starts = range(0, len(commands), per)
        args: list[list[str | bytes]] = [
            [self._marker_prefix, pack(c.command_id for c in commands[i : i + per])] for i in starts
        ]
        with redis_errors(f"{self.sink} {self.region}: reading applied markers and offsets"):
            if len(args) == 1:
                replies = [await self._applied_script(keys=offset_keys, args=args[0])]
            else:
                pipe = self.redis.pipeline(transaction=False)
                for call_args in args:
                    await self._applied_script(keys=offset_keys, args=call_args, client=pipe)
                replies = await pipe.execute()
        width = 3 * len(partitions)
        head = replies[0][:width]
        by_partition = {tp: head[3 * i : 3 * i + 3] for i, tp in enumerate(partitions)}
        markers: dict[int, Any] = {}
        for start, reply in zip(starts, replies, strict=True):
            found = reply[width:]
            for j in range(0, len(found), 2):
                markers[start + int(found[j]) - 1] = found[j + 1]
        out: dict[str, Applied] = {}
        for i, cmd in enumerate(commands):
            marker = markers.get(i)
            if marker is not None:
                out[cmd.command_id] = Applied(applied_at(marker))
                continue
            p = positions.get(cmd.command_id)
            if p is not None and covers(by_partition[p.topic, p.partition], p):
                out[cmd.command_id] = Applied(
                    applied_at(by_partition[p.topic, p.partition][2]), exact=False
                )
        return out
