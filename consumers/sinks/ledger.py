"""What each sink has applied in a region, kept in that region's Redis.

Every purge sink records, with its effect (the Redis sink in its purge script, one call
per flush) or after the provider acknowledged it (the CDN sinks, through `PurgeLedger`):

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
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import redis_errors
from cachesync.consumers.sinks.base import Note, Position

# Sets KEYS[1] to ARGV[1] unless it already holds a higher version (versions only grow).
_MAX_VERSION = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Moves a partition's applied offset (KEYS[1]) to ARGV[1] if that is past it, or if the
# record (time ARGV[2]) is newer than any applied (the topic was made again). The record
# time kept is the newest applied; ARGV[3]: when (epoch ms); ARGV[4]: the key's TTL.
_ADVANCE_OFFSET = """
local cur = redis.call('HMGET', KEYS[1], 'offset', 'record_ts')
local ts = tonumber(cur[2] or '-1')
if tonumber(ARGV[1]) > tonumber(cur[1] or '-1') or tonumber(ARGV[2]) > ts then
  local newest = ARGV[2]
  if ts > tonumber(ARGV[2]) then newest = cur[2] end
  redis.call('HSET', KEYS[1], 'offset', ARGV[1], 'record_ts', newest, 'applied_at', ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 0
"""

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
    """A CDN sink's records of what it applied, written after the provider acknowledged."""

    def __init__(self, redis: Redis, sink: str, region: str) -> None:
        self.redis = redis
        self.sink = sink
        self.region = region
        self._max_version = redis.register_script(_MAX_VERSION)
        self._advance = redis.register_script(_ADVANCE_OFFSET)

    async def queue(
        self,
        pipe: Pipeline,
        commands: Iterable[PurgeCommand],
        *,
        positions: Mapping[str, Position] | None = None,
        held: Collection[str] = (),
        now_ms: int | None = None,
    ) -> None:
        """Add the records for `commands` to a pipeline the caller executes; with the flush's
        `positions` (every command it had, by id), move each partition's applied offset
        past them, short of the commands `held` back (see `offsets_to_record`)."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        newest: dict[str, int] = {}
        for cmd in commands:
            newest[cmd.entity] = max(newest.get(cmd.entity, -1), cmd.version)
            # Per URL as well: the warmer fences each URL by the newest purge that named it.
            for url in cmd.urls:
                target = keys.url_target(url)
                newest[target] = max(newest.get(target, -1), cmd.version)
            pipe.set(keys.applied(self.sink, cmd.command_id), now, ex=keys.APPLIED_TTL_S)
            if cmd.parts_after == 0:  # the event's last part: later tiers may go
                pipe.set(
                    keys.applied_event(self.sink, cmd.origin_event_id), now, ex=keys.APPLIED_TTL_S
                )
        for entity, version in newest.items():
            await self._max_version(
                keys=[keys.purge_version(self.sink, entity)],
                args=[version, keys.PURGE_VERSION_TTL_S],
                client=pipe,
            )
        for (topic, partition), p in offsets_to_record(positions or {}, held).items():
            await self._advance(
                keys=[keys.applied_offset(self.sink, topic, partition)],
                args=[p.offset, p.timestamp, now, keys.APPLIED_OFFSET_TTL_S],
                client=pipe,
            )

    async def record(
        self,
        commands: Sequence[PurgeCommand],
        *,
        positions: Mapping[str, Position] | None = None,
        held: Collection[str] = (),
    ) -> None:
        if not commands and not positions:
            return
        with redis_errors(f"{self.sink} {self.region}: recording applied purges"):
            pipe = self.redis.pipeline(transaction=False)
            await self.queue(pipe, commands, positions=positions, held=held)
            await pipe.execute()

    async def applied_before(
        self, commands: Sequence[PurgeCommand], positions: Mapping[str, Position]
    ) -> dict[str, Applied]:
        """Which of `commands` this sink applied before, and when: by their markers (which
        live APPLIED_TTL_S), else by their partition's applied offset (the retention)."""
        if not commands:
            return {}
        partitions = sorted({(p.topic, p.partition) for p in positions.values()})
        with redis_errors(f"{self.sink} {self.region}: reading applied markers and offsets"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.mget([keys.applied(self.sink, c.command_id) for c in commands])
            for topic, partition in partitions:
                pipe.hmget(
                    keys.applied_offset(self.sink, topic, partition),
                    ["offset", "record_ts", "applied_at"],
                )
            markers, *offsets = await pipe.execute()
        by_partition = dict(zip(partitions, offsets, strict=True))
        found: dict[str, Applied] = {}
        for cmd, marker in zip(commands, markers, strict=True):
            p = positions.get(cmd.command_id)
            if marker is not None:
                found[cmd.command_id] = Applied(applied_at(marker))
            elif p is not None and covers(by_partition[p.topic, p.partition], p):
                at = applied_at(by_partition[p.topic, p.partition][2])
                found[cmd.command_id] = Applied(at, exact=False)
        return found


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
