"""The consistency checker: are purged copies really gone? (what Polaris does for TAO)

It tails the audit topic and samples purges that a sink reported applied. A window
after each, it reads back what a guest would be served:

- Redis sink: every key the purge named, and every key now under its tags. A key
  whose write stamp (`keys.WRITTEN_AT`) is older than the purged event is a stale
  copy; a newer one is a legitimate refill. Unstamped keys cannot be judged and are
  counted apart.
- HTTP edge (http_purge sink): a GET of each purged URL through the region's edge. A
  HIT whose `Age` reaches back before the event means the edge still serves its old copy.

A purge is *converged* when nothing stale is left at the first read-back. Stale ones
are read again until they converge or `give_up_s` passes; staleness is the time from
the event until the read-back first found nothing stale (for purges converged at the
first read-back, until the sink applied them). The report gives, per region and
sink, the converged share as nines, and staleness p50/p99.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import random
import time
from dataclasses import dataclass, field

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachesync.consumers import keys, telemetry
from cachesync.consumers.ops.window import TimeWindow
from cachesync.consumers.pipeline.audit import AuditRecord, decode_audit
from cachesync.consumers.pipeline.codecs import close_codec, codec_for, start_codec
from cachesync.consumers.settings import Settings

log = logging.getLogger(__name__)

PROBED_SINKS = ("redis", "http_purge")


@dataclass(order=True)
class Probe:
    due: float
    seq: int
    region: str = field(compare=False)
    sink: str = field(compare=False)
    event_id: str = field(compare=False)
    command_id: str = field(compare=False)
    occurred_at: int = field(compare=False)
    applied_at: int = field(compare=False)
    keys: list[str] = field(compare=False, default_factory=list)
    tags: list[str] = field(compare=False, default_factory=list)
    urls: list[str] = field(compare=False, default_factory=list)
    first: bool = field(compare=False, default=True)


@dataclass
class Tally:
    probed: int = 0
    converged: int = 0  # nothing stale at the first read-back
    recovered: int = 0  # stale at first, converged later
    gave_up: int = 0  # still stale after give_up_s
    unjudged_keys: int = 0
    staleness_ms: list[float] = field(default_factory=list)
    stale_examples: list[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.converged / self.probed if self.probed else 1.0

    @property
    def nines(self) -> float:
        """-log10(stale share); with none stale, the bound that N clean probes support."""
        stale = 1 - self.share
        if self.probed == 0:
            return 0.0
        return -math.log10(stale) if stale > 0 else math.log10(self.probed)

    def quantile(self, q: float) -> float | None:
        if not self.staleness_ms:
            return None
        ordered = sorted(self.staleness_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class ConsistencyChecker:
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
    ) -> None:
        self.settings = settings
        self.window_s = window_s
        self.sample = sample
        self.recheck_s = recheck_s
        self.give_up_s = give_up_s
        self.edge_urls = dict(edge_urls if edge_urls is not None else _edges(settings))
        # Also read back purges applied since this time; None: only those from now on.
        self.since_ms = since_ms
        self.event_ids = event_ids
        self.tallies: dict[tuple[str, str], Tally] = {}
        self._queue: list[Probe] = []
        self._seq = itertools.count()
        self._rng = random.Random()
        self._redis = {r: Redis.from_url(u) for r, u in settings.region_redis_urls.items()}
        self._http = httpx.AsyncClient(timeout=3.0)
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Tail the audit topic (from `since_ms`, or now) and read back sampled purges until `stop`."""
        codec = codec_for(self.settings)
        await start_codec(codec)
        try:
            async with TimeWindow(
                self.settings,
                [self.settings.audit_topic],
                since_ms=self.since_ms if self.since_ms is not None else int(time.time() * 1000),
                follow=stop,
                client_id="cachesync-consistency",
                poll_ms=200,
            ) as audit_topic:
                self.ready.set()
                async for records in audit_topic.batches():
                    for record in records:
                        audit = decode_audit(codec, record.value or b"")
                        if audit is not None:
                            self._consider(audit)
                    await self._probe_due()
        finally:
            await close_codec(codec)

    async def drain(self, timeout_s: float) -> None:
        """Finish the probes already scheduled (for a bounded run)."""
        deadline = time.monotonic() + timeout_s
        while self._queue and time.monotonic() < deadline:
            await self._probe_due()
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self._http.aclose()
        for client in self._redis.values():
            await client.aclose()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _consider(self, audit: AuditRecord) -> None:
        if (
            audit.stage != "sink"
            or audit.kind != "purge"
            or audit.outcome != "applied"
            or audit.sink not in PROBED_SINKS
            or audit.region is None
            or (audit.sink == "http_purge" and audit.region not in self.edge_urls)
            or (self.event_ids is not None and audit.event_id not in self.event_ids)
            or self._rng.random() >= self.sample
        ):
            return
        applied_at = audit.recorded_at
        if self.since_ms is not None and applied_at < self.since_ms:
            return
        probe = Probe(
            due=time.monotonic()
            + max(0.0, self.window_s - (time.time() * 1000 - applied_at) / 1000),
            seq=next(self._seq),
            region=audit.region,
            sink=audit.sink,
            event_id=audit.event_id,
            command_id=audit.command_id or "",
            occurred_at=audit.occurred_at,
            applied_at=applied_at,
            keys=list(audit.keys),
            tags=list(audit.tags),
            urls=list(audit.urls),
        )
        heapq.heappush(self._queue, probe)

    async def _probe_due(self) -> None:
        now = time.monotonic()
        while self._queue and self._queue[0].due <= now:
            probe = heapq.heappop(self._queue)
            tally = self.tallies.setdefault((probe.region, probe.sink), Tally())
            try:
                stale = await self._stale(probe, tally)
            except (RedisError, OSError, httpx.HTTPError) as exc:
                # A read-back that cannot read proves nothing either way: try again later.
                log.debug("consistency probe of %s failed: %s", probe.command_id, exc)
                probe.due = now + self.recheck_s
                heapq.heappush(self._queue, probe)
                continue
            attrs = {"region": probe.region, "sink": probe.sink}
            if probe.first:
                tally.probed += 1
                # Counted as converged until this read-back says otherwise.
                telemetry.record_consistency(
                    probe.region, probe.sink, (tally.converged + (0 if stale else 1)) / tally.probed
                )
            if not stale:
                staleness = (
                    probe.applied_at if probe.first else time.time() * 1000
                ) - probe.occurred_at
                tally.staleness_ms.append(max(0.0, staleness))
                telemetry.consistency_staleness.record(max(0.0, staleness), attrs)
                if probe.first:
                    tally.converged += 1
                else:
                    tally.recovered += 1
                telemetry.consistency_probes.add(
                    1, {**attrs, "result": "converged" if probe.first else "recovered"}
                )
                continue
            if probe.first:
                telemetry.consistency_probes.add(1, {**attrs, "result": "stale"})
                if len(tally.stale_examples) < 5:
                    tally.stale_examples.append(f"{probe.event_id}: {', '.join(stale[:3])}")
            if time.time() * 1000 - probe.applied_at > self.give_up_s * 1000:
                tally.gave_up += 1
                telemetry.consistency_probes.add(1, {**attrs, "result": "gave_up"})
                continue
            probe.first = False
            probe.due = now + self.recheck_s
            heapq.heappush(self._queue, probe)

    async def _stale(self, probe: Probe, tally: Tally) -> list[str]:
        if probe.sink == "redis":
            return await self._stale_in_redis(probe, tally)
        return await self._stale_at_edge(probe)

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
        base = self.edge_urls[probe.region]
        stale = []
        for path in probe.urls:
            response = await self._http.get(base + path, headers={"Accept-Encoding": "identity"})
            status = (response.headers.get("x-cache") or "").upper()
            age = float(response.headers.get("age") or 0)
            # Cached before the event happened: a copy the purge should have dropped. (Not
            # "before this purge": the budget may skip a URL another purge already dropped
            # after the event, and that later copy is fresh.) Age has whole seconds: +1.
            since_event_s = (time.time() * 1000 - probe.occurred_at) / 1000
            if "HIT" in status and age > since_event_s + 1.0:
                stale.append(path)
        return stale


def _edges(settings: Settings) -> dict[str, str]:
    try:
        return dict(getattr(settings, "region_edge_urls", {}))
    except Exception:  # an unconfigured edge only means there is nothing to probe there
        return {}
