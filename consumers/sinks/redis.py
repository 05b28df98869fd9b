"""The Redis sink: deletes a region's platform cache keys and every key under a purged tag."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Self

import hiredis
from redis.asyncio import Connection, Redis
from redis.exceptions import NoScriptError
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
# - the applied markers (per command; per event at its last part) are set to the time: the
#   edges and the warmer wait for them (tier order). The other purge sinks write the same
#   keys through sinks/ledger.py after their effect; here it is in the script, to be atomic
#   with it;
# - the partition's applied offset moves to this record (also when it is skipped for its
#   marker: it is done);
# - each entity's fence is raised to this version if it is lower (no URL fences: they
#   fence warms, and warms go through a region's front tier, never Redis; writing them
#   was a fifth of the script's Redis time in the sink benchmark):
#   versions only grow, whatever order commands of different entities come in.
# The call reads and writes as few times as it can, for Redis' time is most of a flush's
# (each command it runs costs a few microseconds; the flush waits for all of them): the
# markers in one MGET; offsets once per partition at the start and once at the end; the
# keys to delete gathered, then deleted 500 at a time at the end, a tag purged twice in the
# call read once; fences in one MGET, then written once each, with the newest version
# among the call's commands.
# Nothing in the call reads what it deletes, and within the call nothing is cached again,
# so the end state is the one per-command calls would leave. A skipped command's fences
# are raised with the others': it was applied, so they are at least its version already.
# KEYS: the partitions' applied offsets (ARGV[1] of them), then per command: its marker,
#       its event's marker, keys..., tag index sets...; then the fences (ARGV[7] of them).
# ARGV: how many offset keys, marker TTL, fence TTL, now (ms), offset TTL, how many
#       commands, how many fences; then per command one argument, six numbers separated
#       by spaces: how many keys and tag sets, which offset key (0: read from nowhere
#       known, never read nor written; negative: read, not moved), the record's offset and
#       record time, 1 if it is its event's last part (only then is the event's marker
#       set: a split purge's later tiers wait for all of its parts); then each fence's
#       version. One argument per command rather than six: the client packs each argument
#       it sends.
#       After the fences: the channel to announce on (keys.tier_applied) and the length of
#       the event markers' prefix (what precedes the event id in their key).
# Then the events whose purge is applied in full (a last part: applied now or before) are
# announced on the channel (pipeline/tiers.py), in the call: after their markers, and
# without a round trip of its own.
# Reply: how many keys were deleted, then per command two numbers: when it was applied
#        (ms), 1 if it was applied in this call, 2 if before exactly then, 0 if before at
#        the latest then.
_PURGE_SCRIPT = """
local noff, ncmd, nfence = tonumber(ARGV[1]), tonumber(ARGV[6]), tonumber(ARGV[7])
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
local commands = {}
local marker_keys = {}
local k = noff + 1
for c = 1, ncmd do
  local nk, nt, at, offset, record_ts, last_part = string.match(ARGV[7 + c],
    '^(%d+) (%d+) (%-?%d+) (%-?%d+) (%-?%d+) ([01])$')
  nk, nt = tonumber(nk), tonumber(nt)
  commands[c] = {k = k, nk = nk, nt = nt, at = tonumber(at), offset = offset,
                 record_ts = record_ts, last_part = last_part}
  marker_keys[c] = KEYS[k]
  k = k + 2 + nk + nt
end
local fence_start = k
local channel, event_prefix = ARGV[8 + ncmd + nfence], tonumber(ARGV[9 + ncmd + nfence])
local announced, named = {}, {}
local markers = redis.call('MGET', unpack(marker_keys))
local set_here = {}
local purged_tags = {}
local doomed = {}
local reply = {0}
for c = 1, ncmd do
  local cmd = commands[c]
  local marker_key = KEYS[cmd.k]
  local marker = set_here[marker_key] or markers[c]
  local p = nil
  local covered = false
  if cmd.at ~= 0 then
    p = part(math.abs(cmd.at))
    covered = p.offset and p.record_ts and tonumber(cmd.offset) <= tonumber(p.offset)
      and tonumber(cmd.record_ts) <= tonumber(p.record_ts)
  end
  if marker then
    reply[#reply + 1] = tonumber(marker); reply[#reply + 1] = 2
  elseif covered then
    reply[#reply + 1] = tonumber(p.applied_at or '0'); reply[#reply + 1] = 0
  else
    local first_key = cmd.k + 2
    for i = first_key, first_key + cmd.nk - 1 do
      doomed[#doomed + 1] = KEYS[i]
    end
    for i = first_key + cmd.nk, first_key + cmd.nk + cmd.nt - 1 do
      local tag_set = KEYS[i]
      if not purged_tags[tag_set] then
        purged_tags[tag_set] = true
        for _, member in ipairs(redis.call('SMEMBERS', tag_set)) do
          doomed[#doomed + 1] = member
        end
        doomed[#doomed + 1] = tag_set
      end
    end
    redis.call('SET', marker_key, now, 'EX', marker_ttl)
    set_here[marker_key] = now
    if cmd.last_part == '1' then
      redis.call('SET', KEYS[cmd.k + 1], now, 'EX', marker_ttl)
    end
    reply[#reply + 1] = tonumber(now); reply[#reply + 1] = 1
  end
  if cmd.last_part == '1' then
    local event = string.sub(KEYS[cmd.k + 1], event_prefix + 1)
    if not named[event] then
      named[event] = true
      announced[#announced + 1] = event
    end
  end
  if not covered and cmd.at > 0 then
    if p.record_ts == nil or p.record_ts == false or tonumber(cmd.record_ts) > tonumber(p.record_ts) then
      p.record_ts = cmd.record_ts
    end
    p.offset = cmd.offset; p.applied_at = now; p.dirty = true
  end
end
local deleted = 0
for i = 1, #doomed, 500 do
  deleted = deleted + redis.call('DEL', unpack(doomed, i, math.min(i + 499, #doomed)))
end
reply[1] = deleted
if nfence > 0 then
  local current = redis.call('MGET', unpack(KEYS, fence_start, fence_start + nfence - 1))
  for i = 1, nfence do
    local key, version = KEYS[fence_start + i - 1], ARGV[7 + ncmd + i]
    if current[i] == false or tonumber(version) > tonumber(current[i]) then
      redis.call('SET', key, version, 'EX', fence_ttl)
    else
      redis.call('EXPIRE', key, fence_ttl)
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
if #announced > 0 then
  redis.call('PUBLISH', channel, table.concat(announced, '\\n'))
end
return reply
"""
# Keys per script call: a flush is cut into calls of at most this many keys (a command is
# never split), so one call neither exceeds what Lua's unpack takes nor holds Redis for
# long (each key is a few microseconds of Redis time). Calls of one flush are pipelined.
MAX_KEYS_PER_CALL = 1_000


_Call = tuple[list[str], list[int | str]]


@dataclass(frozen=True, slots=True)
class _KeyPrefixes:
    """What a sink's key names start with, taken from `keys`: each of these names is its
    prefix and one id, so a flush builds hundreds of them by concatenation (a `keys`
    function call and `str.format` each cost several times as much)."""

    applied: str  # + command id
    applied_event: str  # + event id
    fence: str  # + entity
    tag_index: str  # + tag

    @classmethod
    @functools.cache
    def of(cls, sink: str) -> _KeyPrefixes:
        return cls(
            applied=keys.prefix(lambda i: keys.applied(sink, i)),
            applied_event=keys.prefix(lambda i: keys.applied_event(sink, i)),
            fence=keys.prefix(lambda i: keys.purge_version(sink, i)),
            tag_index=keys.prefix(keys.tag_index),
        )


def _calls(
    sink: str,
    region: str,
    pending: list[PurgeCommand],
    positions: Mapping[str, Position],
    now_ms: int,
) -> list[_Call]:
    """The script calls (KEYS, ARGV) that apply `pending` in order, each of at most
    MAX_KEYS_PER_CALL keys unless one command alone has more."""
    names = _KeyPrefixes.of(sink)
    announce_on = keys.tier_applied(region, sink)
    applied, applied_event, tag_index = names.applied, names.applied_event, names.tag_index
    fence = names.fence
    calls: list[_Call] = []
    offset_keys: dict[tuple[str, int], int] = {}  # (topic, partition) -> its KEYS index
    command_keys: list[str] = []
    command_args: list[int | str] = []
    fences: dict[str, int] = {}  # fence -> the newest version among the call's commands

    def close() -> None:
        head = [keys.applied_offset(sink, topic, partition) for topic, partition in offset_keys]
        args: list[int | str] = [
            len(head),
            keys.APPLIED_TTL_S,
            keys.PURGE_VERSION_TTL_S,
            now_ms,
            keys.APPLIED_OFFSET_TTL_S,
            len(command_args),
            len(fences),
        ]
        calls.append(
            (
                head + command_keys + list(fences),
                args + command_args + [*fences.values(), announce_on, len(applied_event)],
            )
        )

    # A command read twice in the flush (a copy at a later offset) has the later position
    # (`PurgeSink.read_from`); only its last occurrence moves the offset there. Moved at
    # the first, it would cover the records in between before they are applied. The
    # first still checks whether that position is covered: if so, all of it was applied.
    last = {cmd.command_id: i for i, cmd in enumerate(pending)}
    for i, cmd in enumerate(pending):
        nk, nt = len(cmd.keys), len(cmd.tags)
        size = 2 + nk + nt + 1  # markers, keys, tag sets, and its fence if new
        if command_args and len(offset_keys) + len(command_keys) + len(fences) + size + 1 > (
            MAX_KEYS_PER_CALL
        ):
            close()
            offset_keys, command_keys, command_args, fences = {}, [], [], {}
        at = positions.get(cmd.command_id)
        if at is None:
            index, offset, record_ts = 0, -1, -1
        else:
            index = offset_keys.setdefault((at.topic, at.partition), len(offset_keys) + 1)
            if last[cmd.command_id] != i:
                index = -index
            offset, record_ts = at.offset, at.timestamp
        command_keys.append(applied + cmd.command_id)
        command_keys.append(applied_event + cmd.origin_event_id)
        command_keys += cmd.keys
        command_keys += [tag_index + t for t in cmd.tags]
        command_args.append(
            f"{nk} {nt} {index} {offset} {record_ts} {1 if cmd.parts_after == 0 else 0}"
        )
        version = cmd.version
        target = fence + cmd.entity
        if fences.get(target, -1) < version:
            fences[target] = version
    close()
    return calls


class _HiredisPacked(Connection):
    """A connection that packs commands with hiredis, in C: redis-py's asyncio connection
    packs them in Python, some 1.7 us per argument, and a flush's script call has ~8
    arguments per command (0.26 us each with hiredis; the bytes are the same). Anything
    but str, bytes and int (floats, bools, buffers) is left to redis-py's packer and
    encoder, whose rules they follow."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        if not _PACKED_TYPES.issuperset(map(type, args)):
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
        self._sha = hashlib.sha1(_PURGE_SCRIPT.encode()).hexdigest()

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
        calls = _calls(self.kind, self.region, pending, positions, now_ms)
        with redis_errors(f"redis {self.region}: purge"):
            try:
                replies = await self._run(calls)
            except NoScriptError:
                # The server lost its scripts (a restart, SCRIPT FLUSH): load it, run again.
                # A call that ran before the error is skipped by the markers it wrote.
                self._sha = await self.redis.script_load(_PURGE_SCRIPT)
                replies = await self._run(calls)
        attrs = {"region": self.region, "sink": self.kind}
        applied: list[PurgeCommand] = []
        # Applied before this delivery: audited as applied, with when (the first record
        # may never have been written: a crash between the effect and the commit).
        notes: dict[str, Note] = {}
        deleted = sum(reply[0] for reply in replies)
        outcomes = [n for reply in replies for n in reply[1:]]
        for cmd, at, how in zip(pending, outcomes[0::2], outcomes[1::2], strict=True):
            if how == 1:
                applied.append(cmd)
            else:
                notes[cmd.command_id] = redelivered(Applied(applied_at(at), how == 2))
        # The same command twice in one flush: applied once, and audited once, as applied.
        if notes:
            for cmd in applied:
                notes.pop(cmd.command_id, None)
        telemetry.redis_keys_deleted.add(deleted, {"region": self.region})
        telemetry.commands_applied.add(len(applied), {**attrs, "outcome": "applied"})
        if notes:
            telemetry.commands_applied.add(len(notes), {**attrs, "outcome": "duplicate"})
        telemetry.record_purge_latencies([now_ms - c.origin_occurred_at for c in applied], attrs)
        return FlushResult(applied=len(applied), skipped=len(notes), notes=notes)

    async def _run(self, calls: list[_Call]) -> list[list[int]]:
        """Each script call's reply, in order. By its digest (EVALSHA): redis-py's scripts
        in a pipeline would ask SCRIPT EXISTS first, a round trip per flush."""
        if len(calls) == 1:
            ((call_keys, call_args),) = calls
            reply: list[int] = await self.redis.evalsha(
                self._sha, len(call_keys), *call_keys, *call_args
            )
            return [reply]
        # In order on one connection: a later call sees what an earlier one recorded.
        pipe = self.redis.pipeline(transaction=False)
        for call_keys, call_args in calls:
            pipe.evalsha(self._sha, len(call_keys), *call_keys, *call_args)
        replies: list[list[int]] = await pipe.execute()
        return replies

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
