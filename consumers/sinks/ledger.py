"""What each sink has applied in a region, kept in that region's Redis.

Every purge sink records, with its effect (the Redis sink in its purge script, one call
per flush) or after the provider acknowledged it (the CDN sinks, through `PurgeLedger`, one script call per flush):

- the newest purge version per entity and per URL (`keys.PURGE_VERSION`);
- per (sink, command topic, partition), the offset of the last record applied, its record
  time and when it was applied (`keys.APPLIED_OFFSET`). A record read again at or below
  it (a crash before the commit, a group whose committed offsets were lost or moved
  back) is skipped: it was applied. This is what covers the command topics' whole
  retention (72 h), with one key per partition whatever the traffic. The record time
  guards against a topic deleted and made again (its offsets restart at 0 with newer
  records): a record newer than any applied is never taken as applied. So rewinding a
  sink's group no longer applies its commands again: `cachesync replay` does (new
  command ids, new offsets);
- a marker per applied command and per origin event (`keys.APPLIED`), whose value is
  when it was applied. They live `keys.APPLIED_TTL_S` (10 min), as long as anything
  waits on them: the runner's tier order (`AppliedEvents`; an edge holds a command at
  most `after_max_wait_s` after it was issued, the warmer at most until the warm's
  deadline, 300 s, after which the command is handed over or dropped whatever the
  marker says), and the copy of a command at another offset (a re-drive, a mirror's
  duplicate), which comes soon after the original. They need not cover 72 h: what a
  re-read after that finds, the applied offset covers.

A command skipped because it was applied before is audited as applied, with the time it
was (`redelivered`), so that a crash between the effect and the audit record loses no
applied record.

Memory at 1,000 events/s, 3 regions and 5 sinks per region (Redis, Cloudflare,
CloudFront, HTTP purge, warmer; the warmer writes no markers, it reads them). The
mapper makes at most one purge per event per region, so each region's four purge sinks
write at most 1,000 x 4 x 2 = 8,000 markers/s. A marker (a key of ~70 bytes, a
millisecond value, a TTL) takes ~180 bytes in Redis 7 (measured: used_memory over
400,000 of them).

- One marker per command kept for the whole retention: 8,000/s x 259,200 s = 2.07
  billion keys per region, ~373 GB per region (1.1 TB in all). The 24 h markers before
  this ledger: 691 million keys, ~124 GB per region, and they did not cover 72 h.
- This ledger: applied offsets, 4 purge sinks x 6 partitions = 24 hashes per region
  (~200 bytes each: ~5 KB), whatever the traffic and the retention; markers for 10 min,
  8,000/s x 600 s = 4.8 million keys per region, ~0.86 GB (2.6 GB in all), which scales
  with the rate only, not with the retention; CloudFront's batch references (one per
  invalidation, at most one per 10 s window, kept 7 days: ~60,000 keys, ~12 MB per
  region) and its unsettled invalidations (deleted once recorded: a few at a time).

These records are read by:

- the runner, for tier order (`AppliedEvents`): a sink acts on an event only after
  the sinks it follows have applied that event's purge in the region;
- the warmer, for version fencing (the purge versions): it drops a warm that a newer
  purge has overtaken;
- the CDN sinks, to skip commands they already applied (`PurgeLedger.applied_before`).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import redis_errors
from cachesync.consumers.sinks.base import Note, Position

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
# offset, or a record newer than any applied; the newest record time is kept); last, the
# channel to announce on and the events to announce (newline-separated, maybe none): those
# whose purge the call records in full (pipeline/tiers.py), published after their markers.
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
local channel, announced = ARGV[9 + 2 * #KEYS], ARGV[10 + 2 * #KEYS]
if announced ~= '' then
  redis.call('PUBLISH', channel, announced)
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


# A marker written before markers held the time they were applied holds "1".
_EPOCH_MS_FLOOR = 10**12


@dataclass(frozen=True)
class Applied:
    """When a command was applied before: exactly (its marker), or at the latest (the
    partition's applied offset covers it), or unknown (`at_ms` None)."""

    at_ms: int | None
    exact: bool = True


def applied_at(value: bytes | str | int | None) -> int | None:
    """A marker's or an applied offset's time (epoch ms), None when it holds none."""
    if value is None:
        return None
    at = int(value)
    return at if at >= _EPOCH_MS_FLOOR else None


def covers(offsets: Sequence[Any], position: Position) -> bool:
    """Whether a partition's applied offset (HMGET offset, record_ts) covers `position`."""
    offset, record_ts = offsets[0], offsets[1]
    if offset is None or record_ts is None:
        return False
    return position.offset <= int(offset) and position.timestamp <= int(record_ts)


def redelivered(applied: Applied) -> Note:
    """The audit note of a command skipped because it was applied before: applied."""
    if applied.at_ms is None:
        return Note(detail="redelivered; applied earlier")
    when = dt.datetime.fromtimestamp(applied.at_ms / 1000, dt.UTC)
    stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    at = "at" if applied.exact else "at or before"
    return Note(detail=f"redelivered; applied {at} {stamp}")


def offsets_to_record(
    positions: Mapping[str, Position], held: Collection[str] = ()
) -> dict[tuple[str, int], Position]:
    """Per (topic, partition), the position a flush's applied offset moves to: the last
    one read, but below the first command `held` back (rejected: it is dead-lettered
    after the ledger is written, and a crash in between must not skip it)."""
    first_held: dict[tuple[str, int], int] = {}
    for command_id in held:
        if (p := positions.get(command_id)) is not None:
            tp = (p.topic, p.partition)
            first_held[tp] = min(first_held.get(tp, p.offset), p.offset)
    last: dict[tuple[str, int], Position] = {}
    for command_id, p in positions.items():
        tp = (p.topic, p.partition)
        if command_id in held or p.offset >= first_held.get(tp, p.offset + 1):
            continue
        known = last.get(tp, p)
        # The last offset, with the newest record time of those it covers.
        offset, ts = max(p.offset, known.offset), max(p.timestamp, known.timestamp)
        last[tp] = Position(p.topic, p.partition, offset, ts)
    return last


@dataclass(frozen=True)
class PurgeAck:
    """A provider acknowledged the purges of these commands (for latency and audit)."""

    provider: str
    region: str
    commands: tuple[tuple[str, int], ...]  # (command_id, origin_occurred_at ms)
    acked_at_ms: float
    ref: str = ""  # the provider's id for it, e.g. a CloudFront invalidation id


AckHook = Callable[[PurgeAck], None]


class PurgeLedger:
    """A CDN sink's records of what it applied, written after the provider acknowledged,
    and read back before it purges: one script call per chunk of a flush.

    Markers, fences and applied offsets are handed to Redis as one call per chunk of
    `COMMANDS_PER_CALL` purges, their keys packed into one length-prefixed argument
    ("<bytes>:<item>" repeated, so that an item may hold any character) that the script
    unpacks after its kind's prefix (`cachesync:applied:<sink>:`, `cachesync:purged:
    <sink>:`, given once). At the HTTP purge sink's rate (thousands of URLs a second) a
    pipeline of two SETs per purge and a script per entity and URL cost more CPU in
    redis-py than the purges themselves (some 1.7 us per argument).

    - `record`: every marker set to now (an event's only at its last part, `parts_after`
      0), every fence raised to the flush's newest version (never lowered), then the
      partitions' applied offsets moved (in the last call of the flush: the chunks run in
      order on one connection, so an offset never covers a purge whose records are not
      written). Each call is atomic;
    - `applied_before`: the partitions' applied offsets, and only the markers that exist
      (their index in the flush and their value), not a reply per purge.
    """

    def __init__(self, redis: Redis, sink: str, region: str) -> None:
        self.redis = redis
        self.sink = sink
        self.region = region
        self._record_script = redis.register_script(_RECORD)
        self._applied_script = redis.register_script(_APPLIED_BEFORE)
        # Markers (`keys.applied`, and `keys.applied_event` under it) and fences
        # (`keys.purge_version`) travel as what follows their sink's prefix.
        self._marker_prefix = keys.prefix(lambda i: keys.applied(sink, i))
        self._event_marker = keys.APPLIED_EVENT.format(event_id="")
        self._fence_prefix = keys.prefix(lambda i: keys.purge_version(sink, i))
        # Where the sinks after this one hear what it applied (pipeline/tiers.py).
        self._channel = keys.tier_applied(region, sink)

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
            # The events this chunk's purges complete (their last parts): only they get an
            # event marker (later tiers wait for the whole purge), and are announced.
            completed = [cmd.origin_event_id for cmd in chunk if cmd.parts_after == 0]
            markers = pack([cmd.command_id for cmd in chunk] + [event + e for e in completed])
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
                        self._channel,
                        "\n".join(dict.fromkeys(completed)),
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


class AppliedEvents:
    """The runner's view of a region's applied markers, for tier order."""

    def __init__(self, redis: Redis, region: str) -> None:
        self.redis = redis
        self.region = region

    @classmethod
    def for_url(cls, url: str, region: str) -> AppliedEvents:
        return cls(Redis.from_url(url, socket_timeout=5), region)

    async def not_applied(self, sinks: Sequence[str], event_ids: Sequence[str]) -> set[str]:
        """The event ids whose purge some of `sinks` has not applied yet in this region."""
        if not sinks or not event_ids:
            return set()
        with redis_errors(f"tier order {self.region}: reading applied events"):
            values = await self.redis.mget(
                [keys.applied_event(sink, e) for e in event_ids for sink in sinks]
            )
        n = len(sinks)
        return {
            e
            for i, e in enumerate(event_ids)
            if any(v is None for v in values[i * n : (i + 1) * n])
        }

    async def close(self) -> None:
        await self.redis.aclose()


def record_latency(
    provider: str,
    region: str,
    commands: Sequence[PurgeCommand],
    acked_at_ms: float | None = None,
    *,
    hook: AckHook | None = None,
    ref: str = "",
) -> None:
    """Event time -> provider acknowledgement, as the purge latency metric and the ack hook."""
    now = acked_at_ms if acked_at_ms is not None else time.time() * 1000
    attrs: dict[str, Any] = {"region": region, "sink": provider}
    telemetry.record_purge_latencies([now - c.origin_occurred_at for c in commands], attrs)
    telemetry.commands_applied.add(len(commands), {**attrs, "outcome": "applied"})
    if hook is not None and commands:
        hook(
            PurgeAck(
                provider,
                region,
                tuple((c.command_id, c.origin_occurred_at) for c in commands),
                now,
                ref,
            )
        )
