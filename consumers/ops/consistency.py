"""The consistency checker: did every purge the mapper issued take effect? (what Polaris does for TAO)

What is expected comes from what the mapper issued, never from the sinks' reports: the
checker tails each region's command topic, so a purge that no sink ever applied (a
consumer group moved past it, a sink that never ran) is seen as missing. For each
(sampled) purge, and each purge sink that runs in its region (`sinks/registry.py`:
Redis always, the CDNs and the edge where configured) and has something to do with it,
the checker waits until `window_s` after the purge was issued, then judges it:

- the sink must have reported it applied (its audit record: applied, or skipped as a
  duplicate of an earlier apply) within the window; and
- nothing stale may be read back:
  - Redis sink: every key the purge named, and every key now under its tags. A key
    whose write stamp (`keys.WRITTEN_AT`) is older than the purged event is a stale
    copy; a newer one is a legitimate refill. Unstamped keys cannot be judged and are
    counted apart.
  - HTTP edge (http_purge sink): a GET of each purged URL through the region's edge. A
    HIT whose `Age` reaches back before the event means the edge still serves its old copy.
  - Cloudflare and CloudFront cannot be read back from here: their report decides alone.

A purge that passes both at that first judgement is *converged*. Any other is listed
as stale, with the keys found stale (or, when none was found, the items the sink should
have purged) and why, and judged again every `recheck_s` until it passes (*recovered
later*) or `give_up_s` after its window has passed (*still stale*). Staleness is the
time from the event until the sink applied it (for purges that passed at the first
judgement) or until a later judgement passed. A row exists for every (region, sink)
from the start, so a sink that never reports shows 0 %, not an absent row.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import COMMAND_TYPES, Command, PurgeCommand
from cachesync.consumers.errors import BadInput
from cachesync.consumers.ops.window import TimeWindow
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.audit import AuditRecord
from cachesync.consumers.pipeline.codecs import close_codec, codec_for, decode, start_codec
from cachesync.consumers.pipeline.kafka import Record
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks import registry
from cachesync.consumers.sinks.base import PurgeSink
from cachesync.consumers.sinks.edge_http import EdgeError, EdgeHttp, EdgeRequest, edge_client
from cachesync.schemas import Codec

log = logging.getLogger(__name__)

# Stale purges listed per (region, sink), with their keys; beyond this only counted.
STALE_KEPT = 1000
# How long after a purge's window the checker waits before judging it, so that a report
# written just inside the window has been read from the audit topic (polled every 200 ms).
REPORT_GRACE_S = 0.5
_POLL_MS = 200
# Read-backs in flight at once: a Redis round trip or an edge GET each, mostly waiting.
_READ_BACKS_AT_ONCE = 64


def _now_ms() -> float:
    return time.time() * 1000


@dataclass(frozen=True)
class Report:
    """What a sink's audit record said about one command."""

    outcome: str
    detail: str
    recorded_at: int

    @property
    def applied(self) -> bool:
        # A duplicate is skipped because an earlier delivery applied it (its marker exists).
        return self.outcome == "applied" or (
            self.outcome == "skipped" and self.detail.startswith("duplicate")
        )


@dataclass(order=True)
class Probe:
    """One expected purge in one (region, sink), waiting for its judgement."""

    due: float
    seq: int
    region: str = field(compare=False)
    sink: str = field(compare=False)
    event_id: str = field(compare=False)
    command_id: str = field(compare=False)
    occurred_at: int = field(compare=False)
    # When the sink reported it applied; None until an applied report is read.
    applied_at: int | None = field(compare=False, default=None)
    keys: list[str] = field(compare=False, default_factory=list)
    tags: list[str] = field(compare=False, default_factory=list)
    urls: list[str] = field(compare=False, default_factory=list)
    first: bool = field(compare=False, default=True)
    issued_at: int = field(compare=False, default=0)
    prefixes: list[str] = field(compare=False, default_factory=list)
    # What the sink said instead of applied (rejected, fenced...), if anything.
    refused: str | None = field(compare=False, default=None)
    counted_unapplied: bool = field(compare=False, default=False)
    found: list[str] = field(compare=False, default_factory=list)  # stale at the last read-back

    def take(self, report: Report) -> None:
        if report.applied:
            if self.applied_at is None or report.recorded_at < self.applied_at:
                self.applied_at = report.recorded_at
        elif self.applied_at is None:
            self.refused = f"{report.outcome}: {report.detail}" if report.detail else report.outcome

    @property
    def items(self) -> list[str]:
        """What this sink was to purge, as the stale listing names it."""
        named = [*self.keys, *self.urls]
        named += [f"tag:{t}" for t in self.tags] + [f"prefix:{p}" for p in self.prefixes]
        return named


@dataclass(frozen=True)
class StalePurge:
    """A purge that did not converge in its window: which, why, and what is stale."""

    event_id: str
    command_id: str
    reason: str
    keys: tuple[str, ...]


@dataclass
class Tally:
    probed: int = 0  # expected purges judged (at the end of their window)
    converged: int = 0  # applied in the window and nothing stale at the first judgement
    recovered: int = 0  # not converged at first, converged later
    gave_up: int = 0  # still not converged give_up_s after the window
    unapplied: int = 0  # not converged and never reported applied by the sink (so far)
    unjudged_keys: int = 0
    staleness_ms: list[float] = field(default_factory=list)
    # The purges not converged (and not recovered), by command id; at most STALE_KEPT
    # of them are listed, `stale_count` counts them all.
    stale: dict[str, StalePurge] = field(default_factory=dict)
    stale_count: int = 0

    @property
    def share(self) -> float:
        """The converged share; nothing judged yet is 0: nothing was seen to converge."""
        return self.converged / self.probed if self.probed else 0.0

    @property
    def nines(self) -> float:
        """-log10(stale share); with none stale, the bound that N clean probes support."""
        stale = 1 - self.share
        if self.probed == 0:
            return 0.0
        return -math.log10(stale) if stale > 0 else math.log10(self.probed)

    @property
    def stale_examples(self) -> list[str]:
        return [
            f"{s.event_id}: {', '.join(s.keys[:3])}"
            for s in itertools.islice(self.stale.values(), 5)
        ]

    def quantile(self, q: float) -> float | None:
        if not self.staleness_ms:
            return None
        ordered = sorted(self.staleness_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def mark_stale(self, probe: Probe, stale_keys: Sequence[str]) -> None:
        """Record (or update, on a later judgement) a purge as not converged."""
        entry = StalePurge(
            event_id=probe.event_id,
            command_id=probe.command_id,
            reason=_reason(probe, stale_keys),
            keys=tuple(stale_keys or probe.items),
        )
        if probe.first:
            self.stale_count += 1
        if probe.command_id in self.stale or len(self.stale) < STALE_KEPT:
            self.stale[probe.command_id] = entry

    def mark_recovered(self, probe: Probe) -> None:
        self.recovered += 1
        self.stale_count -= 1
        self.stale.pop(probe.command_id, None)


def _reason(probe: Probe, stale_keys: Sequence[str]) -> str:
    if probe.applied_at is None:
        said = f"the sink said {probe.refused}" if probe.refused else "no report from the sink"
        return f"never applied ({said})" + ("; stale copy left" if stale_keys else "")
    if stale_keys:
        return "stale copy left, though the sink reported it applied"
    return "applied after its window"


class ConsistencyChecker:
    """Judges the purges issued from `since_ms` (or from now) while `run` runs.

    `sinks` says which sinks to expect per region (default: every purge sink the
    registry says can run there); `stop_expecting` ends the set of purges to judge, and
    `settled` says when every one of them has been judged for good.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        window_s: float = 5.0,
        sample: float = 1.0,
        recheck_s: float = 1.0,
        give_up_s: float = 60.0,
        edge_urls: dict[str, str] | None = None,
        since_ms: int | None = None,
        event_ids: set[str] | None = None,
        sinks: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.window_s = window_s
        self.sample = sample
        self.recheck_s = recheck_s
        self.give_up_s = give_up_s
        self.edge_urls = dict(edge_urls if edge_urls is not None else _edges(settings))
        # Also judge purges issued since this time; None: only those from now on.
        self.since_ms = since_ms
        self.event_ids = event_ids
        self.sinks = {
            region: tuple(kinds)
            for region, kinds in (sinks if sinks is not None else expected_sinks(settings)).items()
        }
        self.tallies: dict[tuple[str, str], Tally] = {
            (region, kind): Tally() for region, kinds in self.sinks.items() for kind in kinds
        }
        self.expected = 0  # purges (commands) expected so far, each in one or more sinks
        self.finished = 0  # read-backs (a purge in one sink) judged for good
        self._queue: list[Probe] = []
        self._probes: dict[tuple[str, str], Probe] = {}  # (command id, sink) -> its probe
        self._early: dict[tuple[str, str], list[Report]] = {}  # reports read before their command
        self._seq = itertools.count()
        self._until_ms: float | None = None
        # How far the command topics have been read: per partition, the newest record's
        # time, and the last time a poll found every partition at its end.
        self._commands_read: dict[tuple[str, int], int] = {}
        self._commands_caught_up_ms = 0.0
        self._redis = {r: Redis.from_url(u) for r, u in settings.region_redis_urls.items()}
        # The edges' read-backs through the HTTP purge sink's lean client: pipelined GETs
        # on kept-alive connections (through httpx, a probe's GETs were a tenth of `run all`).
        self._edges: dict[str, EdgeHttp] = {}
        self.ready = asyncio.Event()
        self.all_judged = asyncio.Event()  # set once `settled`

    # -- running ----------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Tail the command topics and the audit topic (from `since_ms`, or now) and judge
        each expected purge after its window, until `stop`."""
        codec = codec_for(self.settings)
        await start_codec(codec)
        started_ms = int(_now_ms())
        try:
            if self.since_ms is not None:
                # The reports already written, before the commands they are for are read.
                async with TimeWindow(
                    self.settings,
                    [self.settings.audit_topic],
                    since_ms=self.since_ms,
                    client_id="cachesync-consistency",
                ) as backlog:
                    async for records in backlog.batches():
                        await self._read_reports(codec, records)
            async with (
                TimeWindow(
                    self.settings,
                    [self.settings.commands_topic(r) for r in self.sinks],
                    since_ms=self.since_ms if self.since_ms is not None else started_ms,
                    follow=stop,
                    client_id="cachesync-consistency",
                    poll_ms=_POLL_MS,
                ) as commands,
                TimeWindow(
                    self.settings,
                    [self.settings.audit_topic],
                    since_ms=started_ms,
                    follow=stop,
                    client_id="cachesync-consistency",
                    poll_ms=_POLL_MS,
                ) as audit,
            ):
                self.ready.set()
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._follow_commands(codec, commands))
                    tasks.create_task(self._follow_reports(codec, audit))
                    tasks.create_task(self._judge_loop(stop))
        finally:
            await close_codec(codec)

    def stop_expecting(self) -> None:
        """Purges issued from now on are not judged (a bounded run's end)."""
        self._until_ms = _now_ms()

    @property
    def settled(self) -> bool:
        """Expecting nothing more, the command topics read up to that end, every purge judged."""
        return (
            self._until_ms is not None
            and self._commands_read_past(self._until_ms)
            and not self._queue
        )

    async def drain(self, timeout_s: float) -> None:
        """Wait (while `run` runs) until every purge expected so far is judged for good."""
        if self._until_ms is None:
            self.stop_expecting()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_judged.wait(), timeout=timeout_s)

    async def close(self) -> None:
        for edge in self._edges.values():
            await edge.aclose()
        for client in self._redis.values():
            await client.aclose()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def waiting_for(self) -> str:
        """What the checker is waiting for, in a line (the CLI's status)."""
        in_window = {p.command_id for p in self._queue if p.first}
        again = {p.command_id for p in self._queue if not p.first}
        parts = []
        if in_window:
            parts.append(
                f"waiting for {len(in_window)} purges to pass their {self.window_s:g} s window"
            )
        if again:
            parts.append(
                f"re-reading {len(again)} not converged "
                f"(for up to {self.give_up_s:g} s after their window)"
            )
        if not parts and self._until_ms is not None:
            parts.append("reading the command topics up to the end of the run")
        return "; ".join(parts) or "waiting for purges"

    # -- reading ----------------------------------------------------------------
    async def _follow_commands(self, codec: Codec, window: TimeWindow) -> None:
        async for records in window.batches():
            if not records:
                self._commands_caught_up_ms = _now_ms() - _POLL_MS
            for record in records:
                self._commands_read[(record.topic, record.partition)] = record.timestamp
                command = await _decode_command(codec, record)
                if isinstance(command, PurgeCommand):
                    self._expect(record, command)

    async def _follow_reports(self, codec: Codec, window: TimeWindow) -> None:
        async for records in window.batches():
            await self._read_reports(codec, records)

    async def _read_reports(self, codec: Codec, records: list[Record]) -> None:
        for record in records:
            for audit in await _decode_audits(codec, record, self._wanted):
                self._on_report(audit)

    def _commands_read_past(self, ms: float) -> bool:
        if self._commands_caught_up_ms >= ms:
            return True
        return bool(self._commands_read) and min(self._commands_read.values()) >= ms

    def _wanted(self, command_id: str, event_id: str) -> bool:
        # Sampled by command id, so that a command's report is kept or dropped the same way.
        if self.event_ids is not None and event_id not in self.event_ids:
            return False
        return self.sample >= 1.0 or zlib.crc32(command_id.encode()) < self.sample * 2**32

    def _expect(self, record: Record, command: PurgeCommand) -> None:
        """A purge the mapper issued: one probe per sink of its region that should apply it."""
        if not self._wanted(command.command_id, command.origin_event_id):
            return
        if self._until_ms is not None and record.timestamp > self._until_ms:
            return
        kinds = [k for k in self.sinks.get(command.region, ()) if _concerns(k, command, record)]
        new = [k for k in kinds if (command.command_id, k) not in self._probes]
        if not new:
            return  # none for this region's sinks, or the same command again (a mapper retry)
        self.expected += 1
        due = time.monotonic() + max(
            0.0, (command.issued_at + self.window_s * 1000 - _now_ms()) / 1000
        )
        for kind in new:
            probe = Probe(
                due=due + REPORT_GRACE_S,
                seq=next(self._seq),
                region=command.region,
                sink=kind,
                event_id=command.origin_event_id,
                command_id=command.command_id,
                occurred_at=command.origin_occurred_at,
                issued_at=command.issued_at,
                keys=list(command.keys),
                tags=list(command.tags),
                urls=list(command.urls),
                prefixes=list(command.prefixes),
            )
            for report in self._early.pop((command.command_id, kind), []):
                probe.take(report)
            self._probes[(command.command_id, kind)] = probe
            heapq.heappush(self._queue, probe)

    def _on_report(self, audit: AuditRecord) -> None:
        """A sink's purge report the checker follows (`_decode_audits` kept only those)."""
        if audit.command_id is None or audit.sink is None:
            return
        report = Report(audit.outcome, audit.detail, audit.recorded_at)
        key = (audit.command_id, audit.sink)
        probe = self._probes.get(key)
        if probe is not None:
            probe.take(report)
        elif audit.region in self.sinks:
            self._early.setdefault(key, []).append(report)

    def _forget_early_reports(self) -> None:
        """Drop reports whose command is behind the command topics' read position by more
        than any probe lives: that command was issued before the run (or not sampled)."""
        if not self._early:
            return
        read_to = max(
            self._commands_caught_up_ms,
            min(self._commands_read.values()) if self._commands_read else 0,
        )
        horizon = read_to - (self.window_s + self.give_up_s + 60) * 1000
        for key in [k for k, rs in self._early.items() if rs[-1].recorded_at < horizon]:
            del self._early[key]

    # -- judging ----------------------------------------------------------------
    async def _judge_loop(self, stop: asyncio.Event) -> None:
        pruned = time.monotonic()
        while not stop.is_set():
            await self._probe_due()
            if self.settled:
                self.all_judged.set()
            if time.monotonic() - pruned > 5:
                self._forget_early_reports()
                pruned = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.05)

    async def _probe_due(self) -> None:
        """Read back every probe that is due, `_READ_BACKS_AT_ONCE` at a time, and judge each."""
        while self._queue and self._queue[0].due <= time.monotonic():
            due = []
            while self._queue and self._queue[0].due <= time.monotonic():
                due.append(heapq.heappop(self._queue))
                if len(due) == _READ_BACKS_AT_ONCE:
                    break
            found = await asyncio.gather(*(self._read_back(p) for p in due))
            for probe, stale in zip(due, found, strict=True):
                if stale is None:
                    probe.due = time.monotonic() + self.recheck_s
                    heapq.heappush(self._queue, probe)
                else:
                    self._judge(probe, self._tally(probe), stale)

    async def _read_back(self, probe: Probe) -> list[str] | None:
        """The stale keys or URLs found; None when the read-back could not read."""
        if not probe.first and probe.applied_at is None:
            # Nothing can converge before the sink reports: no read-back until it has
            # (what the first one found still names the stale keys).
            return probe.found
        try:
            # The read-backs belong to no event: no library spans, each a trace of its own.
            with telemetry.untraced():
                probe.found = await self._stale(probe, self._tally(probe))
        except (RedisError, OSError, EdgeError) as exc:
            # A read-back that cannot read proves nothing either way: try again later.
            log.debug("consistency probe of %s failed: %s", probe.command_id, exc)
            return None
        return probe.found

    def _tally(self, probe: Probe) -> Tally:
        return self.tallies.setdefault((probe.region, probe.sink), Tally())

    def _judge(self, probe: Probe, tally: Tally, stale: list[str]) -> None:
        now_ms = _now_ms()
        attrs = {"region": probe.region, "sink": probe.sink}
        first = probe.first
        applied = probe.applied_at is not None
        clean = applied and not stale
        if first:
            tally.probed += 1
            in_window = (
                clean
                and probe.applied_at is not None
                and (probe.applied_at <= probe.issued_at + self.window_s * 1000)
            )
            telemetry.record_consistency(
                probe.region, probe.sink, (tally.converged + in_window) / tally.probed
            )
            if in_window:
                assert probe.applied_at is not None
                tally.converged += 1
                self._staleness(tally, attrs, probe.applied_at - probe.occurred_at)
                telemetry.consistency_probes.add(1, {**attrs, "result": "converged"})
                self._done(probe)
                return
            telemetry.consistency_probes.add(1, {**attrs, "result": "stale"})
            tally.mark_stale(probe, stale)
            if not applied:
                probe.counted_unapplied = True
                tally.unapplied += 1
                telemetry.consistency_unapplied.add(1, attrs)
        if applied and probe.counted_unapplied:
            probe.counted_unapplied = False
            tally.unapplied -= 1
        probe.first = False
        if clean:
            assert probe.applied_at is not None
            tally.mark_recovered(probe)
            self._staleness(
                tally, attrs, (probe.applied_at if first else now_ms) - probe.occurred_at
            )
            telemetry.consistency_probes.add(1, {**attrs, "result": "recovered"})
            self._done(probe)
            return
        if not first:
            tally.mark_stale(probe, stale)
        if now_ms - probe.issued_at > (self.window_s + self.give_up_s) * 1000:
            tally.gave_up += 1
            telemetry.consistency_probes.add(1, {**attrs, "result": "gave_up"})
            self._done(probe)
            return
        probe.due = time.monotonic() + self.recheck_s
        heapq.heappush(self._queue, probe)

    def _staleness(self, tally: Tally, attrs: dict[str, str], ms: float) -> None:
        tally.staleness_ms.append(max(0.0, ms))
        telemetry.consistency_staleness.record(max(0.0, ms), attrs)

    def _done(self, probe: Probe) -> None:
        self._probes.pop((probe.command_id, probe.sink), None)
        self.finished += 1

    # -- reading back -------------------------------------------------------------
    async def _stale(self, probe: Probe, tally: Tally) -> list[str]:
        if probe.sink == "redis":
            return await self._stale_in_redis(probe, tally)
        if probe.sink == "http_purge" and probe.region in self.edge_urls:
            return await self._stale_at_edge(probe)
        return []  # a CDN the checker cannot read back: its report decides

    async def _stale_in_redis(self, probe: Probe, tally: Tally) -> list[str]:
        redis = self._redis[probe.region]
        members: list[str] = list(probe.keys)
        if probe.tags:
            pipe = redis.pipeline(transaction=False)
            for tag in probe.tags:
                pipe.smembers(keys.tag_index(tag))
            for found in await pipe.execute():
                members.extend(m.decode() if isinstance(m, bytes) else m for m in found)
        candidates = list(dict.fromkeys(members))
        if not candidates:
            return []
        pipe = redis.pipeline(transaction=False)
        for key in candidates:
            pipe.exists(key)
            pipe.get(keys.written_at(key))
        answers = await pipe.execute()
        stale = []
        for key, exists, stamp in zip(candidates, answers[::2], answers[1::2], strict=True):
            if not exists:
                continue
            if stamp is None:
                tally.unjudged_keys += 1
            elif int(stamp) < probe.occurred_at:
                stale.append(key)
        return stale

    async def _stale_at_edge(self, probe: Probe) -> list[str]:
        edge = self._edges.get(probe.region)
        if edge is None:
            edge = self._edges[probe.region] = edge_client(
                self.edge_urls[probe.region], connections=4, timeout_s=3.0
            )
        identity = (("Accept-Encoding", "identity"),)
        answers = await edge.many([EdgeRequest("GET", path, identity) for path in probe.urls])
        stale = []
        for path, answer in zip(probe.urls, answers, strict=True):
            if isinstance(answer, EdgeError):
                raise answer
            status = (answer.headers.get("x-cache") or "").upper()
            age = float(answer.headers.get("age") or 0)
            # Cached before the event happened: a copy the purge should have dropped. (Not
            # "before this purge": the budget may skip a URL another purge already dropped
            # after the event, and that later copy is fresh.) Age has whole seconds: +1.
            since_event_s = (time.time() * 1000 - probe.occurred_at) / 1000
            if "HIT" in status and age > since_event_s + 1.0:
                stale.append(path)
        return stale


def expected_sinks(settings: Settings) -> dict[str, tuple[str, ...]]:
    """Per region, the purge sinks that run there (the registry's word: Redis always,
    the CDNs and the edge where their provider is configured)."""
    return {
        region: tuple(registry.available(settings, region, registry.PURGE_KINDS))
        for region in settings.topology.regions
    }


def _concerns(kind: str, command: PurgeCommand, record: Record) -> bool:
    """Whether the sink `kind` would apply `command` (mirrors the sinks' `accepts`)."""
    cls = registry.SINKS.get(kind)
    if cls is None or not issubclass(cls, PurgeSink):
        return False
    if cls.is_cdn and headers.header(record, headers.REPLAY_CDN) == b"off":
        return False  # a replay with --no-cdn: CDN sinks skip it
    if kind == "redis":
        return True  # the Redis sink takes every purge: its markers are what tier order reads
    return any(getattr(command, f) for f in cls.acts_on)


async def _decode_command(codec: Codec, record: Record) -> Command | None:
    try:
        decoded = await decode(codec, record.value or b"")
        model = COMMAND_TYPES.get(decoded.type_name)
        return model.from_record(decoded.record) if model is not None else None
    except (BadInput, ValueError) as exc:
        log.debug("consistency: skipping an undecodable command: %s", exc)
        return None


async def _decode_audits(
    codec: Codec, record: Record, wanted: Callable[[str, str], bool]
) -> list[AuditRecord]:
    """The sinks' purge reports in a message that the checker follows (`wanted`, by
    command and event id), one per command (a sink's record about several commands of a
    flush is expanded). The rest is dropped before any `AuditRecord` is built: the
    checker samples a fifth of the purges, and building a record for every entry of every
    flush was most of its reading."""
    try:
        decoded = await decode(codec, record.value or b"")
    except BadInput:
        return []
    raw = decoded.record
    if decoded.type_name != "audit" or raw.get("stage") != "sink" or raw.get("kind") != "purge":
        return []
    if raw.get("handled"):
        handled = [h for h in raw["handled"] if wanted(h["command_id"], h["event_id"])]
        if not handled:
            return []
        raw = {**raw, "handled": handled}
    elif not wanted(raw.get("command_id") or "", raw["event_id"]):
        return []
    return AuditRecord.from_record(raw).expand()


def _edges(settings: Settings) -> dict[str, str]:
    try:
        return dict(getattr(settings, "region_edge_urls", {}))
    except Exception:  # an unconfigured edge only means there is nothing to probe there
        return {}
