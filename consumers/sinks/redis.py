"""The Redis sink: deletes a region's platform cache keys and every key under a purged tag."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import ClassVar, Self

import hiredis
from redis.asyncio import Connection, Redis
from redis.typing import EncodableT

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import Command, PurgeCommand
from cachesync.consumers.errors import TransientError, redis_errors
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.base import FlushResult, Note, Position, PurgeSink
from cachesync.consumers.sinks.ledger import Applied, applied_at, redelivered

# One call per flush (per chunk of at most MAX_KEYS_PER_CALL keys, see `_calls`), atomic,
# that applies its commands in order exactly as one call each would, so a crash can never
# leave a purge applied but not recorded (or the reverse). For each command:
# - a command already applied is skipped: a redelivered command must not delete what the
#   platform cached again after the first, real purge. It was applied if its record is at
#   or below its partition's applied offset (which covers the command topics' whole
#   retention; a record newer than any applied is not, whatever its offset: the topic was
#   made again), or if its marker exists (a copy at another offset, or the same command
#   earlier in this call). The reply says when it was applied: its marker's time, else the
#   offset's (at the latest);
# - the keys are deleted, and for each tag index set its members and the set itself,
#   so a key added to a tag mid-purge is either deleted now or survives, newer;
# - the applied markers (per command; per event at its last part) are set to the time: the edges and the
#   warmer wait for them (tier order). The other purge sinks write the same keys through
#   sinks/ledger.py after their effect; here it is in the script, to be atomic with it;
# - the partition's applied offset moves to this record (also when it is skipped for its
#   marker: it is done);
# - each fence (per entity, per URL) is raised to this version if it is lower:
#   versions only grow, whatever order commands of different entities come in.
# Offsets and fences are read once per call and written once at its end (a partition's
# offset and an entity's fence are shared by many commands of a flush); nothing else in
# the call reads them, so the end state is the one per-command calls would leave.
# KEYS: the partitions' applied offsets (ARGV[1] of them), then per command: its marker,
#       its event's marker, keys..., tag index sets..., fences...
# ARGV: how many offset keys, marker TTL, fence TTL, now (ms), offset TTL, then per
#       command: how many keys, tag sets and fences, version, which offset key (0: read
#       from nowhere known, never read nor written; negative: read, not moved), the
#       record's offset and record time, 1 if it is its event's last part (only then is
#       the event's marker set: a split purge's later tiers wait for all of its parts).
# Reply: per command, three numbers: keys deleted (-1 when skipped), when it was applied
#        (ms), 1 if exactly then (0: at the latest).
_PURGE_SCRIPT = """
local noff = tonumber(ARGV[1])
local marker_ttl, fence_ttl, now, offset_ttl = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local parts = {}
local function part(i)
  local p = parts[i]
  if p == nil then
    local v = redis.call('HMGET', KEYS[i], 'offset', 'record_ts', 'applied_at')
    p = {offset = v[1], record_ts = v[2], applied_at = v[3], dirty = false}
    parts[i] = p
  end
  return p
end
local fences = {}
local fence_order = {}
local reply = {}
local k = noff + 1
local a = 6
while a <= #ARGV do
  local nk, nt, nf = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local version, at = ARGV[a + 3], tonumber(ARGV[a + 4])
  local offset, record_ts, last_part = ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  a = a + 8
  local marker_key, event_key = KEYS[k], KEYS[k + 1]
  local first_key = k + 2
  k = first_key + nk + nt + nf
  local p = nil
  local covered = false
  if at ~= 0 then
    p = part(math.abs(at))
    covered = p.offset and p.record_ts and tonumber(offset) <= tonumber(p.offset)
      and tonumber(record_ts) <= tonumber(p.record_ts)
  end
  local marker = redis.call('GET', marker_key)
  if covered then
    if marker then
      reply[#reply + 1] = -1; reply[#reply + 1] = tonumber(marker); reply[#reply + 1] = 1
    else
      reply[#reply + 1] = -1; reply[#reply + 1] = tonumber(p.applied_at or '0'); reply[#reply + 1] = 0
    end
  else
    if marker then
      reply[#reply + 1] = -1; reply[#reply + 1] = tonumber(marker); reply[#reply + 1] = 1
    else
      local deleted = 0
      for i = first_key, first_key + nk - 1, 500 do
        deleted = deleted + redis.call('DEL', unpack(KEYS, i, math.min(i + 499, first_key + nk - 1)))
      end
      for i = first_key + nk, first_key + nk + nt - 1 do
        local members = redis.call('SMEMBERS', KEYS[i])
        for j = 1, #members, 500 do
          deleted = deleted + redis.call('DEL', unpack(members, j, math.min(j + 499, #members)))
        end
        redis.call('DEL', KEYS[i])
      end
      redis.call('SET', marker_key, now, 'EX', marker_ttl)
      if last_part == '1' then
        redis.call('SET', event_key, now, 'EX', marker_ttl)
      end
      for i = first_key + nk + nt, first_key + nk + nt + nf - 1 do
        local f = fences[KEYS[i]]
        if f == nil then
          f = {current = tonumber(redis.call('GET', KEYS[i]) or '-1'), version = nil}
          fences[KEYS[i]] = f
          fence_order[#fence_order + 1] = KEYS[i]
        end
        if tonumber(version) > f.current then
          f.current = tonumber(version); f.version = version
        end
      end
      reply[#reply + 1] = deleted; reply[#reply + 1] = tonumber(now); reply[#reply + 1] = 1
    end
    if at > 0 then
      if p.record_ts == nil or p.record_ts == false or tonumber(record_ts) > tonumber(p.record_ts) then
        p.record_ts = record_ts
      end
      p.offset = offset; p.applied_at = now; p.dirty = true
    end
  end
end
for i = 1, noff do
  local p = parts[i]
  if p ~= nil and p.dirty then
    redis.call('HSET', KEYS[i], 'offset', p.offset, 'record_ts', p.record_ts, 'applied_at', now)
    redis.call('EXPIRE', KEYS[i], offset_ttl)
  end
end
for _, key in ipairs(fence_order) do
  local f = fences[key]
  if f.version then
    redis.call('SET', key, f.version, 'EX', fence_ttl)
  else
    redis.call('EXPIRE', key, fence_ttl)
  end
end
return reply
"""
# Keys per script call: a flush is cut into calls of at most this many keys (a command is
# never split), so one call neither exceeds what Lua's unpack takes nor holds Redis for
# long (each key is a few microseconds of Redis time). Calls of one flush are pipelined.
MAX_KEYS_PER_CALL = 1_000


_Call = tuple[list[str], list[int | str]]


def _calls(
    sink: str, pending: list[PurgeCommand], positions: Mapping[str, Position], now_ms: int
) -> list[_Call]:
    """The script calls (KEYS, ARGV) that apply `pending` in order, each of at most
    MAX_KEYS_PER_CALL keys unless one command alone has more."""
    calls: list[_Call] = []
    offset_keys: dict[tuple[str, int], int] = {}  # (topic, partition) -> its KEYS index
    command_keys: list[str] = []
    command_args: list[int | str] = []

    def close() -> None:
        head = [keys.applied_offset(sink, topic, partition) for topic, partition in offset_keys]
        args: list[int | str] = [
            len(head),
            keys.APPLIED_TTL_S,
            keys.PURGE_VERSION_TTL_S,
            now_ms,
            keys.APPLIED_OFFSET_TTL_S,
        ]
        calls.append((head + command_keys, args + command_args))

    # A command read twice in the flush (a copy at a later offset) has the later position
    # (`PurgeSink.read_from`); only its last occurrence moves the offset there. Moved at
    # the first, it would cover the records in between before they are applied. The
    # first still checks whether that position is covered: if so, all of it was applied.
    last = {cmd.command_id: i for i, cmd in enumerate(pending)}
    for i, cmd in enumerate(pending):
        fences = [keys.purge_version(sink, cmd.entity)]
        fences += [keys.purge_version(sink, keys.url_target(u)) for u in cmd.urls]
        size = 2 + len(cmd.keys) + len(cmd.tags) + len(fences)
        at = positions.get(cmd.command_id)
        if command_args and len(offset_keys) + len(command_keys) + size + 1 > MAX_KEYS_PER_CALL:
            close()
            offset_keys, command_keys, command_args = {}, [], []
        index = 0
        if at is not None:
            index = offset_keys.setdefault((at.topic, at.partition), len(offset_keys) + 1)
            if last[cmd.command_id] != i:
                index = -index
        command_keys += [
            keys.applied(sink, cmd.command_id),
            keys.applied_event(sink, cmd.origin_event_id),
            *cmd.keys,
            *(keys.tag_index(t) for t in cmd.tags),
            *fences,
        ]
        command_args += [
            len(cmd.keys),
            len(cmd.tags),
            len(fences),
            cmd.version,
            index,
            at.offset if at is not None else -1,
            at.timestamp if at is not None else -1,
            1 if cmd.parts_after == 0 else 0,
        ]
    close()
    return calls


class _HiredisPacked(Connection):
    """A connection that packs commands with hiredis, in C: redis-py's asyncio connection
    packs them in Python, some 1.7 us per argument, and a flush's script call has ~17
    arguments per command (0.26 us each with hiredis; the bytes are the same). Anything
    but str, bytes and int (floats, bools, buffers) is left to redis-py's packer and
    encoder, whose rules they follow."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        if not all(type(a) in _PACKED_TYPES for a in args):
            return super().pack_command(*args)
        # As redis-py does: a command name given with its subcommand ("SCRIPT LOAD") is
        # sent as two arguments.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif isinstance(args[0], bytes) and b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # its stub says one item
        return [packed]


_PACKED_TYPES = frozenset((str, bytes, int))


class RedisSink(PurgeSink):
    kind: ClassVar[str] = "redis"

    def __init__(self, region: str, url: str, *, client: Redis | None = None) -> None:
        super().__init__(region)
        self.url = url
        # (A rediss:// or unix:// URL keeps redis-py's own connection class.)
        self.redis = client or Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=3, connection_class=_HiredisPacked
        )
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
        calls = _calls(self.kind, pending, positions, now_ms)
        with redis_errors(f"redis {self.region}: purge"):
            if len(calls) == 1:
                replies = await self._script(keys=calls[0][0], args=calls[0][1])
            else:
                # In order on one connection: a later call sees what an earlier one recorded.
                pipe = self.redis.pipeline(transaction=False)
                for call_keys, call_args in calls:
                    await self._script(keys=call_keys, args=call_args, client=pipe)
                replies = [r for reply in await pipe.execute() for r in reply]
        attrs = {"region": self.region, "sink": self.kind}
        applied: list[PurgeCommand] = []
        # Applied before this delivery: audited as applied, with when (the first record
        # may never have been written: a crash between the effect and the commit).
        notes: dict[str, Note] = {}
        deleted = 0
        for i, cmd in enumerate(pending):
            count, at, exact = int(replies[3 * i]), int(replies[3 * i + 1]), replies[3 * i + 2]
            if count >= 0:
                deleted += count
                applied.append(cmd)
            else:
                notes[cmd.command_id] = redelivered(Applied(applied_at(at), bool(exact)))
        # The same command twice in one flush: applied once, and audited once, as applied.
        for cmd in applied:
            notes.pop(cmd.command_id, None)
        telemetry.redis_keys_deleted.add(deleted, {"region": self.region})
        telemetry.commands_applied.add(len(applied), {**attrs, "outcome": "applied"})
        if notes:
            telemetry.commands_applied.add(len(notes), {**attrs, "outcome": "duplicate"})
        telemetry.record_purge_latencies([now_ms - c.origin_occurred_at for c in applied], attrs)
        return FlushResult(applied=len(applied), skipped=len(notes), notes=notes)

    async def ready(self) -> str | None:
        # A PING, not a TCP connect: a frozen Redis still accepts connections.
        try:
            with redis_errors(f"redis {self.region}: ping"):
                await self.redis.ping()
        except TransientError as exc:
            return str(exc)
        return None

    async def close(self) -> None:
        await self.redis.aclose()
