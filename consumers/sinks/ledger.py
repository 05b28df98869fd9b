"""What each sink has applied in a region, kept in that region's Redis.

Every purge sink records, after its effect is acknowledged, the newest purge version
per entity (`keys.PURGE_VERSION`) and a marker per applied command and per origin
event (`keys.APPLIED`); the Redis sink writes the same keys in its purge script.
They are read by:

- the runner, for tier order (`AppliedEvents`): a sink acts on an event only after
  the sinks it follows have applied that event's purge in the region;
- the warmer, for version fencing: it drops a warm that a newer purge has overtaken;
- the CloudFront sink, to skip commands it already turned into an invalidation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import redis_errors

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
    def __init__(self, redis: Redis, sink: str, region: str) -> None:
        self.redis = redis
        self.sink = sink
        self.region = region
        self._max_version = redis.register_script(_MAX_VERSION)

    async def queue(self, pipe: Pipeline, commands: Iterable[PurgeCommand]) -> None:
        """Add the records for `commands` to a pipeline the caller executes."""
        newest: dict[str, int] = {}
        for cmd in commands:
            newest[cmd.entity] = max(newest.get(cmd.entity, -1), cmd.version)
            # Per URL as well: the warmer fences each URL by the newest purge that named it.
            for url in cmd.urls:
                target = keys.url_target(url)
                newest[target] = max(newest.get(target, -1), cmd.version)
            pipe.set(keys.applied(self.sink, cmd.command_id), 1, ex=keys.APPLIED_TTL_S)
            pipe.set(keys.applied_event(self.sink, cmd.origin_event_id), 1, ex=keys.APPLIED_TTL_S)
        for entity, version in newest.items():
            await self._max_version(
                keys=[keys.purge_version(self.sink, entity)],
                args=[version, keys.PURGE_VERSION_TTL_S],
                client=pipe,
            )

    async def record(self, commands: Sequence[PurgeCommand]) -> None:
        if not commands:
            return
        with redis_errors(f"{self.sink} {self.region}: recording applied purges"):
            pipe = self.redis.pipeline(transaction=False)
            await self.queue(pipe, commands)
            await pipe.execute()

    async def applied_ids(self, command_ids: Sequence[str]) -> set[str]:
        """Which of these commands this sink already applied (markers live APPLIED_TTL_S)."""
        if not command_ids:
            return set()
        with redis_errors(f"{self.sink} {self.region}: reading applied markers"):
            values = await self.redis.mget([keys.applied(self.sink, c) for c in command_ids])
        return {c for c, v in zip(command_ids, values, strict=True) if v is not None}


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
    for cmd in commands:
        telemetry.purge_latency.record(now - cmd.origin_occurred_at, attrs)
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
