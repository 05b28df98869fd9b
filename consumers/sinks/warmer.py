"""The warmer: fetches a wedding's pages through a region's edge once its purge is applied.

A warm command comes from the same event as a purge. Warming before that purge is
applied would put the stale page back into the edge, so the warmer follows the
region's purge sinks (`after`, every purge sink configured in the region): the runner
holds a batch of warms until they have applied its events' purges (tier order,
pipeline/roles.py), as it holds an edge's purges until Redis has applied them.

The warmer drops a warm that:

- newer purges have overtaken on every one of its URLs (version fencing, per URL):
  their own warms follow, and this one would fetch pages that are already stale (a
  warm with only some URLs overtaken fetches the others);
- is past its deadline;
- the runner handed over `overdue`: its purge was still not applied `max_wait_s` after
  it was issued (so one lost purge cannot hold the partition's other warms).

Each URL is fetched with a concurrency limit and timeouts; the edge's cache-status
header (`X-Cache`) is recorded. After a MISS the URL is fetched once more, and the
warm counts as confirmed only when the edge then says HIT.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

import httpx
from redis.asyncio import Redis

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import Command, WarmCommand
from cachesync.consumers.errors import ServerError, TransientError, redis_errors
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.base import FlushResult, Note, Sink
from cachesync.consumers.sinks.http_purge import edge_unavailable
from cachesync.consumers.sinks.retry import HttpEndpoint, Retries, redis_client, with_retries
from cachesync.topology.model import CdnPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmResult:
    """One URL fetched through the edge, and what the edge said about its cache."""

    command_id: str
    origin_event_id: str
    url: str
    status: int | None
    cache_status: str  # HIT, MISS, ... as the edge says; "error" when no answer
    confirmed: bool  # the edge now serves it from cache
    at_ms: float


# Every purge sink kind, in tier order (tests/unit/sinks/test_registry.py holds it to the registry's).
PURGE_TIERS = ("redis", "cloudflare", "cloudfront", "http_purge")


class WarmerSink(Sink):
    kind: ClassVar[str] = "warmer"
    is_cdn: ClassVar[bool] = True

    def __init__(
        self,
        region: str,
        *,
        edge_url: str,
        redis: Redis | str,
        after: Sequence[str] = ("redis", "http_purge"),
        policy: CdnPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(region)
        self.policy = policy or CdnPolicy()
        w = self.policy.warm
        self.edge_url = edge_url.rstrip("/")
        # Tier order (the runner's) and version fencing (ours) both follow these sinks.
        self.after = tuple(after)
        self.after_max_wait_s = w.max_wait_s
        self.after_retry_s = w.wait_retry_s
        self.redis = redis_client(redis)
        self.http = HttpEndpoint(
            self.edge_url,
            timeout_s=w.timeout_s,
            transport=transport,
            headers=lambda: {"User-Agent": "cachesync-warmer"},
        )
        self.retries = Retries(w.attempts, w.timeout_s, wait_initial_s=0.1, wait_max_s=2.0)
        self._pending: list[WarmCommand] = []
        self._overdue: set[str] = set()
        self._gate = asyncio.Semaphore(w.concurrency)
        self.results: deque[WarmResult] = deque(maxlen=10_000)
        self.dropped: deque[tuple[str, str]] = deque(maxlen=10_000)  # (command_id, reason)

    @classmethod
    def from_settings(cls, settings: Settings, region: str) -> Self:
        # Warm only after every purge tier has applied the event's purge; the registry
        # keeps, of these, the ones that run in the region.
        return cls(
            region,
            after=PURGE_TIERS,
            edge_url=settings.region_edge_urls[region],
            redis=settings.region_redis_urls[region],
            policy=settings.topology.cdn,
        )

    @classmethod
    def unavailable(cls, settings: Settings, region: str) -> str | None:
        return edge_unavailable(settings, region)

    @property
    def client(self) -> httpx.AsyncClient:
        return self.http.client

    async def setup(self) -> None:
        _ = self.http.client

    def accepts(self, command: Command) -> bool:
        return isinstance(command, WarmCommand) and bool(command.urls)

    def add(self, command: Command) -> None:
        if isinstance(command, WarmCommand):
            self._pending.append(command)

    def overdue(self, command: Command) -> None:
        self._overdue.add(command.command_id)

    async def flush(self) -> FlushResult:
        pending, self._pending = self._pending, []
        overdue, self._overdue = self._overdue, set()
        if not pending:
            return FlushResult()
        ready, dropped = await self._triage(pending, overdue)
        notes: dict[str, Note] = {}
        for warm, reason in dropped:
            self.dropped.append((warm.command_id, reason))
            telemetry.warm_dropped.add(1, {"region": self.region, "reason": reason})
            # Counted by the metric and written to the audit topic; a line each would flood.
            log.debug("warm %s for %s dropped: %s", warm.command_id, warm.entity, reason)
            notes[warm.command_id] = Note(
                outcome="fenced" if reason == "fenced" else "dropped", detail=reason
            )
        results = await asyncio.gather(*(self._warm(w, urls) for w, urls in ready))
        for (warm, urls), fetched in zip(ready, results, strict=True):
            # The status that counts is the last one: MISS then HIT means warmed and confirmed.
            skipped = len(warm.urls) - len(urls)
            notes[warm.command_id] = Note(
                cache_status={r.url: "HIT" if r.confirmed else r.cache_status for r in fetched},
                detail=f"{skipped} URLs left to a newer purge's warm" if skipped else "",
            )
        return FlushResult(applied=len(ready), skipped=len(pending) - len(ready), notes=notes)

    async def _triage(
        self, warms: list[WarmCommand], overdue: set[str]
    ) -> tuple[list[tuple[WarmCommand, tuple[str, ...]]], list[tuple[WarmCommand, str]]]:
        """Split into ready (with the URLs still worth fetching) and dropped with why.

        Fencing is per URL: a URL that a newer purge named has been (or will be) warmed
        by that purge's own warm, so this older warm skips it; a warm all of whose URLs
        are overtaken is dropped as fenced. (Fencing by the whole wedding starved warms:
        with a wedding changing every second, every warm had a newer purge somewhere.)
        """
        now_ms = time.time() * 1000
        with redis_errors(f"warmer {self.region}: reading purge versions"):
            pipe = self.redis.pipeline(transaction=False)
            for warm in warms:
                for sink in self.after:
                    for url in warm.urls:
                        pipe.get(keys.purge_version(sink, keys.url_target(url)))
            values = iter(await pipe.execute())
        ready: list[tuple[WarmCommand, tuple[str, ...]]] = []
        dropped: list[tuple[WarmCommand, str]] = []
        for warm in warms:
            overtaken: set[str] = set()
            for _sink in self.after:
                for url in warm.urls:
                    version = next(values)
                    if version is not None and int(version) > warm.version:
                        overtaken.add(url)
            urls = tuple(u for u in warm.urls if u not in overtaken)
            if not urls:
                dropped.append((warm, "fenced"))
            elif now_ms > warm.deadline:
                dropped.append((warm, "expired"))
            elif warm.command_id in overdue:
                dropped.append((warm, "purge_not_applied"))
            else:
                ready.append((warm, urls))
        return ready, dropped

    async def _warm(self, warm: WarmCommand, urls: Sequence[str]) -> list[WarmResult]:
        results = await asyncio.gather(*(self._fetch(warm, url) for url in urls))
        hits = sum(r.confirmed for r in results)
        log.debug("warmed %s in %s: %d/%d confirmed", warm.entity, self.region, hits, len(results))
        return list(results)

    async def _fetch(self, warm: WarmCommand, url: str) -> WarmResult:
        header = self.policy.warm.cache_status_header
        async with self._gate:
            first = await self._get(url)
            status = first.status_code
            cache_status = first.headers.get(header, "unknown").upper()
            confirmed = cache_status.startswith("HIT")
            if not confirmed and self.policy.warm.confirm and status < 400:
                again = await self._get(url)
                confirmed = again.headers.get(header, "").upper().startswith("HIT")
        telemetry.warm_fetches.add(1, {"region": self.region, "cache_status": cache_status})
        result = WarmResult(
            warm.command_id,
            warm.origin_event_id,
            url,
            status,
            cache_status,
            confirmed,
            time.time() * 1000,
        )
        self.results.append(result)
        return result

    async def _get(self, url: str) -> httpx.Response:
        async def once() -> httpx.Response:
            response = await self.client.get(url)
            if response.status_code >= 500:
                raise ServerError(f"HTTP {response.status_code}")
            return response

        try:
            return await with_retries(
                once,
                self.retries,
                network=(httpx.TransportError,),
                sink=self.kind,
                region=self.region,
                what=f"warmer {self.region}: GET {url} via {self.edge_url}",
            )
        except TransientError:
            telemetry.warm_fetches.add(1, {"region": self.region, "cache_status": "error"})
            raise

    async def close(self) -> None:
        await self.http.aclose()
        await self.redis.aclose()
