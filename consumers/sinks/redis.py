"""The Redis sink: deletes a region's platform cache keys and every key under a purged tag."""

from __future__ import annotations

import time
from typing import ClassVar, Self

from redis.asyncio import Redis

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import Command, PurgeCommand
from cachesync.consumers.errors import redis_errors
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.base import FlushResult, Note, PurgeSink

# One call per command, atomic, so a crash can never leave a purge applied but not
# recorded (or the reverse):
# - a command already applied (its marker exists) is skipped: a redelivered command
#   must not delete what the platform cached again after the first, real purge;
# - the keys are deleted, and for each tag index set its members and the set itself,
#   so a key added to a tag mid-purge is either deleted now or survives, newer;
# - the applied markers (per command, per event) are set: the edges and the warmer
#   wait for them (tier order). The other purge sinks write the same keys through
#   sinks/ledger.py after their effect; here it is in the script, to be atomic with it;
# - each fence (per entity, per URL) is raised to this version if it is lower:
#   versions only grow, whatever order commands of different entities come in.
# KEYS: command marker, event marker, keys..., tag index sets..., fences...
# ARGV: how many keys, how many tag sets, version, marker TTL, fence TTL.
_PURGE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return -1
end
local nk = tonumber(ARGV[1])
local nt = tonumber(ARGV[2])
local version = tonumber(ARGV[3])
local deleted = 0
for i = 3, nk + 2 do
  deleted = deleted + redis.call('DEL', KEYS[i])
end
for i = nk + 3, nk + nt + 2 do
  local members = redis.call('SMEMBERS', KEYS[i])
  for j = 1, #members, 500 do
    deleted = deleted + redis.call('DEL', unpack(members, j, math.min(j + 499, #members)))
  end
  redis.call('DEL', KEYS[i])
end
redis.call('SET', KEYS[1], 1, 'EX', ARGV[4])
redis.call('SET', KEYS[2], 1, 'EX', ARGV[4])
for i = nk + nt + 3, #KEYS do
  local current = tonumber(redis.call('GET', KEYS[i]) or '-1')
  if version > current then
    redis.call('SET', KEYS[i], ARGV[3], 'EX', ARGV[5])
  else
    redis.call('EXPIRE', KEYS[i], ARGV[5])
  end
end
return deleted
"""


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
        if not pending:
            return FlushResult()
        with redis_errors(f"redis {self.region}: purge"):
            pipe = self.redis.pipeline(transaction=False)
            for cmd in pending:
                fences = [cmd.entity, *(keys.url_target(u) for u in cmd.urls)]
                await self._script(
                    keys=[
                        keys.applied(self.kind, cmd.command_id),
                        keys.applied_event(self.kind, cmd.origin_event_id),
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
                    ],
                    client=pipe,
                )
            results = [int(r) for r in await pipe.execute()]
        now_ms = time.time() * 1000
        attrs = {"region": self.region, "sink": self.kind}
        applied = [cmd for cmd, r in zip(pending, results, strict=True) if r >= 0]
        duplicates = {cmd.command_id for cmd, r in zip(pending, results, strict=True) if r < 0}
        telemetry.redis_keys_deleted.add(sum(r for r in results if r > 0), {"region": self.region})
        telemetry.commands_applied.add(len(applied), {**attrs, "outcome": "applied"})
        if duplicates:
            telemetry.commands_applied.add(len(duplicates), {**attrs, "outcome": "duplicate"})
        for cmd in applied:
            telemetry.purge_latency.record(now_ms - cmd.origin_occurred_at, attrs)
        note = Note(outcome="skipped", detail="duplicate: this command was already applied")
        return FlushResult(
            applied=len(applied),
            skipped=len(duplicates),
            notes={command_id: note for command_id in duplicates},
        )

    async def close(self) -> None:
        await self.redis.aclose()
