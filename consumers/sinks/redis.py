"""The Redis sink: deletes a region's platform cache keys and every key under a purged tag."""

from __future__ import annotations

import time
from typing import ClassVar, Self

from redis.asyncio import Redis

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import Command, PurgeCommand
from cachesync.consumers.errors import redis_errors
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.base import FlushResult, PurgeSink
from cachesync.consumers.sinks.ledger import Applied, applied_at, redelivered

# One call per command, atomic, so a crash can never leave a purge applied but not
# recorded (or the reverse):
# - a command already applied is skipped: a redelivered command must not delete what the
#   platform cached again after the first, real purge. It was applied if its record is at
#   or below its partition's applied offset (KEYS[3], which covers the command topics'
#   whole retention; a record newer than any applied is not, whatever its offset: the
#   topic was made again), or if its marker exists (a copy at another offset). The reply
#   says when it was applied: its marker's time, else the offset's (at the latest);
# - the keys are deleted, and for each tag index set its members and the set itself,
#   so a key added to a tag mid-purge is either deleted now or survives, newer;
# - the applied markers (per command, per event) are set to the time: the edges and the
#   warmer wait for them (tier order). The other purge sinks write the same keys through
#   sinks/ledger.py after their effect; here it is in the script, to be atomic with it;
# - the partition's applied offset moves to this record (also when it is skipped for its
#   marker: it is done);
# - each fence (per entity, per URL) is raised to this version if it is lower:
#   versions only grow, whatever order commands of different entities come in.
# KEYS: command marker, event marker, applied offset, keys..., tag index sets..., fences...
# ARGV: how many keys, how many tag sets, version, marker TTL, fence TTL, now (ms),
#       the record's offset (-1: read from nowhere known), its record time, offset TTL.
# Reply: {keys deleted, or -1 when skipped; when it was applied (ms); 1 if exactly then}.
_PURGE_SCRIPT = """
local offset = tonumber(ARGV[7])
local function advance()
  if offset < 0 then return end
  local newest = ARGV[8]
  local ts = redis.call('HGET', KEYS[3], 'record_ts')
  if ts and tonumber(ts) > tonumber(newest) then newest = ts end
  redis.call('HSET', KEYS[3], 'offset', ARGV[7], 'record_ts', newest, 'applied_at', ARGV[6])
  redis.call('EXPIRE', KEYS[3], ARGV[9])
end
local marker = redis.call('GET', KEYS[1])
if offset >= 0 then
  local done = redis.call('HMGET', KEYS[3], 'offset', 'record_ts', 'applied_at')
  if done[1] and offset <= tonumber(done[1]) and tonumber(ARGV[8]) <= tonumber(done[2]) then
    if marker then return {-1, tonumber(marker), 1} end
    return {-1, tonumber(done[3] or '0'), 0}
  end
end
if marker then
  advance()
  return {-1, tonumber(marker), 1}
end
local nk = tonumber(ARGV[1])
local nt = tonumber(ARGV[2])
local version = tonumber(ARGV[3])
local deleted = 0
for i = 4, nk + 3 do
  deleted = deleted + redis.call('DEL', KEYS[i])
end
for i = nk + 4, nk + nt + 3 do
  local members = redis.call('SMEMBERS', KEYS[i])
  for j = 1, #members, 500 do
    deleted = deleted + redis.call('DEL', unpack(members, j, math.min(j + 499, #members)))
  end
  redis.call('DEL', KEYS[i])
end
redis.call('SET', KEYS[1], ARGV[6], 'EX', ARGV[4])
redis.call('SET', KEYS[2], ARGV[6], 'EX', ARGV[4])
advance()
for i = nk + nt + 4, #KEYS do
  local current = tonumber(redis.call('GET', KEYS[i]) or '-1')
  if version > current then
    redis.call('SET', KEYS[i], ARGV[3], 'EX', ARGV[5])
  else
    redis.call('EXPIRE', KEYS[i], ARGV[5])
  end
end
return {deleted, tonumber(ARGV[6]), 1}
"""
# KEYS[3] of a command read from nowhere known (offset -1): never read nor written.
_NO_OFFSET = keys.applied_offset("redis", "none", -1)


class RedisSink(PurgeSink):
    kind: ClassVar[str] = "redis"

    def __init__(self, region: str, url: str, *, client: Redis | None = None) -> None:
        super().__init__(region)
        self.url = url
        self.redis = client or Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
        self._script = self.redis.register_script(_PURGE_SCRIPT)

    @classmethod
    def from_settings(cls, settings: Settings, region: str) -> Self:
        return cls(region, settings.region_redis_urls[region])

    def accepts(self, command: Command) -> bool:
        # Every purge, even one with no keys or tags: its applied marker is what the edges
        # and the warmer wait for (tier order), so it must be written for each event.
        return isinstance(command, PurgeCommand)

    async def flush(self) -> FlushResult:
        pending = self.take()
        positions = self.take_positions()
        if not pending:
            return FlushResult()
        now_ms = int(time.time() * 1000)
        with redis_errors(f"redis {self.region}: purge"):
            pipe = self.redis.pipeline(transaction=False)
            for cmd in pending:
                fences = [cmd.entity, *(keys.url_target(u) for u in cmd.urls)]
                at = positions.get(cmd.command_id)
                offsets = keys.applied_offset(self.kind, at.topic, at.partition) if at else None
                await self._script(
                    keys=[
                        keys.applied(self.kind, cmd.command_id),
                        keys.applied_event(self.kind, cmd.origin_event_id),
                        offsets or _NO_OFFSET,
                        *cmd.keys,
                        *(keys.tag_index(t) for t in cmd.tags),
                        *(keys.purge_version(self.kind, f) for f in fences),
                    ],
                    args=[
                        len(cmd.keys),
                        len(cmd.tags),
                        cmd.version,
                        keys.APPLIED_TTL_S,
                        keys.PURGE_VERSION_TTL_S,
                        now_ms,
                        at.offset if at else -1,
                        at.timestamp if at else -1,
                        keys.APPLIED_OFFSET_TTL_S,
                    ],
                    client=pipe,
                )
            replies = [(int(r[0]), int(r[1]), bool(r[2])) for r in await pipe.execute()]
        attrs = {"region": self.region, "sink": self.kind}
        applied = [cmd for cmd, r in zip(pending, replies, strict=True) if r[0] >= 0]
        done = {cmd.command_id for cmd in applied}
        # Applied before this delivery: audited as applied, with when (the first record
        # may never have been written: a crash between the effect and the commit).
        before = {
            cmd.command_id: Applied(applied_at(at), exact)
            for cmd, (deleted, at, exact) in zip(pending, replies, strict=True)
            if deleted < 0 and cmd.command_id not in done
        }
        deleted = sum(r[0] for r in replies if r[0] > 0)
        telemetry.redis_keys_deleted.add(deleted, {"region": self.region})
        telemetry.commands_applied.add(len(applied), {**attrs, "outcome": "applied"})
        if before:
            telemetry.commands_applied.add(len(before), {**attrs, "outcome": "duplicate"})
        for cmd in applied:
            telemetry.purge_latency.record(now_ms - cmd.origin_occurred_at, attrs)
        return FlushResult(
            applied=len(applied),
            skipped=len(before),
            notes={command_id: redelivered(a) for command_id, a in before.items()},
        )

    async def close(self) -> None:
        await self.redis.aclose()
