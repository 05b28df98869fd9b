"""The warmer: fetches a wedding's pages through a region's edge once its purge is applied.

A warm command comes from the same event as a purge. Warming before that purge is
applied would put the stale page back into the edge, so the warmer follows the tier it
warms through: the region's `front` in the topology (the HTTP edge, Cloudflare or
CloudFront), which serves the region's public URLs. The runner holds a batch of warms
until that tier has applied its events' purges (tier order, pipeline/roles.py), and
that tier's purge itself waited for the region's Redis. Through CloudFront, it waits for
the invalidation to complete (`cloudfront.COMPLETED`): warming before that is pointless.
The other tiers (a CDN the guests do not reach through this edge) are not waited for.

The warmer drops a warm that:

- newer purges have overtaken on every one of its URLs (version fencing, per URL):
  their own warms follow, and this one would fetch pages that are already stale (a
  warm with only some URLs overtaken fetches the others);
- is past its deadline;
- the runner handed over `overdue`: its purge was still not applied `max_wait_s` after
  it was issued (so one lost purge cannot hold the partition's other warms).

A flush fetches every URL its warms still want once, pipelined over at most
`warm.concurrency` connections to the edge (sinks/edge_http.py `many`), and records the
edge's cache-status header (`X-Cache`). The URLs that were a MISS are fetched once more,
pipelined the same way, and a warm counts as confirmed only when the edge then says HIT.
A write per connection and round, not a round trip per URL: with five sinks in one
process, its event loop turns every 10-20 ms under load, and fetching one URL at a time
per connection got through fewer GETs a second than 100 events/s of warms need, so the
warms fell seconds behind their purges. An answer that is a 5xx or no answer is fetched
again on its own, through the retry policy.

Each warm is counted once in the metrics (applied, dropped with its reason, latency),
however often its batch comes back: a batch is put back whole when a fetch fails, and
its warms are triaged again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Self

import httpx
from redis.asyncio import Redis

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import Command, WarmCommand
from cachesync.consumers.errors import ServerError, TransientError, redis_errors
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.base import FlushResult, Note, Sink
from cachesync.consumers.sinks.cloudflare import CloudflareSink
from cachesync.consumers.sinks.cloudfront import COMPLETED, CloudFrontSink
from cachesync.consumers.sinks.edge_http import EdgeError, EdgeRequest, EdgeResponse, edge_client
from cachesync.consumers.sinks.http_purge import edge_unavailable
from cachesync.consumers.sinks.retry import Retries, redis_client, with_retries
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


# Warms counted (applied or dropped) remembered, so a batch that comes back is not counted again.
_COUNTED_KEPT = 100_000


def front_tier(settings: Settings, region: str) -> str:
    """The tier serving `region`'s public URLs (the topology's `front`; the HTTP edge if unset)."""
    return settings.topology.regions[region].front or "http_purge"


def waits_for(front: str) -> str:
    """The tier whose applied markers a warm through `front` waits for: CloudFront's
    completed invalidations, any other front's applied purges."""
    return COMPLETED if front == "cloudfront" else front


class _Fetched(NamedTuple):
    """What the edge said of one URL a flush fetched."""

    url: str
    status: int
    cache_status: str  # what the first GET's answer said
    confirmed: bool  # the edge serves it from cache (the first GET or the one after a MISS)
    at_ms: float


def _server_error(response: EdgeResponse) -> ServerError:
    return ServerError(f"HTTP {response.status_code}")


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
        fenced_by: Sequence[str] | None = None,
        policy: CdnPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(region)
        self.policy = policy or CdnPolicy()
        w = self.policy.warm
        self.edge_url = edge_url.rstrip("/")
        # Tier order (the runner's) follows `after`; version fencing (ours) the purge
        # versions of `fenced_by` (by default the same sinks).
        self.after = tuple(after)
        self.fenced_by = tuple(
            fenced_by if fenced_by is not None else (t.split(":")[0] for t in self.after)
        )
        self.after_max_wait_s = w.max_wait_s
        self.after_retry_s = w.wait_retry_s
        self.redis = redis_client(redis)
        # The lean client's persistent connections (sinks/edge_http.py): at most
        # `concurrency` requests at the edge at once; `transport`: a unit test's
        # httpx.MockTransport.
        self.edge = edge_client(
            self.edge_url,
            connections=w.concurrency,
            timeout_s=w.timeout_s,
            headers={"User-Agent": "cachesync-warmer"},
            transport=transport,
        )
        self.retries = Retries(w.attempts, w.timeout_s, wait_initial_s=0.1, wait_max_s=2.0)
        self._pending: list[WarmCommand] = []
        self._overdue: set[str] = set()
        self.results: deque[WarmResult] = deque(maxlen=10_000)
        self.dropped: deque[tuple[str, str]] = deque(maxlen=10_000)  # (command_id, reason)
        # Command ids already in the metrics, oldest first (an OrderedDict: a dict's oldest
        # entry is found by scanning the slots its deletions left, see CommandCache).
        self._counted: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings, region: str) -> Self:
        # Warm through the region's front tier, once it has applied the event's purge.
        front = front_tier(settings, region)
        spec = settings.topology.regions[region]
        edge = settings.region_edge_urls[region] if front == "http_purge" else spec.public_url
        assert edge is not None  # `unavailable` said so
        return cls(
            region,
            after=(waits_for(front),),
            fenced_by=(front,),
            edge_url=edge,
            redis=settings.region_redis_urls[region],
            policy=settings.topology.cdn,
        )

    @classmethod
    def unavailable(cls, settings: Settings, region: str) -> str | None:
        front = front_tier(settings, region)
        if front == "http_purge":
            return edge_unavailable(settings, region)
        if not settings.topology.regions[region].public_url:
            return (
                f"region {region}: front {front} needs its public_url in {settings.topology_file}"
            )
        tier = CloudFrontSink if front == "cloudfront" else CloudflareSink
        reason = tier.unavailable(settings, region)
        return None if reason is None else f"front {front}: {reason}"

    @property
    def backend_url(self) -> str | None:
        return self.edge_url

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
            # Written to the audit topic; a line each would flood.
            log.debug("warm %s for %s dropped: %s", warm.command_id, warm.entity, reason)
            notes[warm.command_id] = Note(
                outcome="fenced" if reason == "fenced" else "dropped", detail=reason
            )
        # Raises if a fetch fails for good: the batch comes back whole (nothing counted yet).
        # Each URL once, however many of the batch's warms name it.
        fetched_urls = await self._fetch(list(dict.fromkeys(u for _, urls in ready for u in urls)))
        for warm, urls in ready:
            fetched = [self._result(warm, fetched_urls[url]) for url in urls]
            hits = sum(r.confirmed for r in fetched)
            log.debug("warmed %s in %s: %d/%d confirmed", warm.entity, self.region, hits, len(urls))
            # The status that counts is the last one: MISS then HIT means warmed and confirmed.
            skipped = len(warm.urls) - len(urls)
            notes[warm.command_id] = Note(
                cache_status={r.url: "HIT" if r.confirmed else r.cache_status for r in fetched},
                detail=f"{skipped} URLs left to a newer purge's warm" if skipped else "",
            )
        self._count(ready, dropped)
        return FlushResult(applied=len(ready), skipped=len(pending) - len(ready), notes=notes)

    def _count(
        self,
        warmed: Sequence[tuple[WarmCommand, tuple[str, ...]]],
        dropped: Sequence[tuple[WarmCommand, str]],
    ) -> None:
        """The metrics of a flush that went through, each warm once: applied (with its
        latency from the event) or dropped with why."""
        attrs = {"region": self.region, "sink": self.kind}
        now_ms = time.time() * 1000
        applied = 0
        for warm, _ in warmed:
            if self._first_count(warm.command_id):
                applied += 1
                telemetry.purge_latency.record(now_ms - warm.origin_occurred_at, attrs)
        if applied:
            telemetry.commands_applied.add(applied, {**attrs, "outcome": "applied"})
        for warm, reason in dropped:
            self.dropped.append((warm.command_id, reason))
            if self._first_count(warm.command_id):
                telemetry.warm_dropped.add(1, {"region": self.region, "reason": reason})

    def _first_count(self, command_id: str) -> bool:
        if command_id in self._counted:
            return False
        self._counted[command_id] = None
        if len(self._counted) > _COUNTED_KEPT:
            self._counted.popitem(last=False)
        return True

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
        versions = [
            keys.purge_version(sink, keys.url_target(url))
            for warm in warms
            for sink in self.fenced_by
            for url in warm.urls
        ]
        with redis_errors(f"warmer {self.region}: reading purge versions"):
            # One MGET, not a GET each: a reply to parse instead of one per URL and sink.
            values = iter(await self.redis.mget(versions) if versions else [])
        ready: list[tuple[WarmCommand, tuple[str, ...]]] = []
        dropped: list[tuple[WarmCommand, str]] = []
        for warm in warms:
            overtaken: set[str] = set()
            for _sink in self.fenced_by:
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

    async def _fetch(self, urls: Sequence[str]) -> dict[str, _Fetched]:
        """Each of `urls` (distinct) fetched through the edge, and fetched again after a
        MISS when the policy confirms: each round pipelined (see the module docstring)."""
        header = self.policy.warm.cache_status_header
        first = await self._get_all(urls)
        at_ms = time.time() * 1000
        fetched: dict[str, _Fetched] = {}
        again: list[str] = []
        statuses: Counter[str] = Counter()
        for url, response in zip(urls, first, strict=True):
            cache_status = response.headers.get(header, "unknown").upper()
            statuses[cache_status] += 1
            confirmed = cache_status.startswith("HIT")
            fetched[url] = _Fetched(url, response.status_code, cache_status, confirmed, at_ms)
            if not confirmed and self.policy.warm.confirm and response.status_code < 400:
                again.append(url)
        for cache_status, n in statuses.items():
            telemetry.warm_fetches.add(n, {"region": self.region, "cache_status": cache_status})
        if again:
            confirming = await self._get_all(again)
            at_ms = time.time() * 1000
            for url, response in zip(again, confirming, strict=True):
                hit = response.headers.get(header, "").upper().startswith("HIT")
                fetched[url] = fetched[url]._replace(confirmed=hit, at_ms=at_ms)
        return fetched

    def _result(self, warm: WarmCommand, fetched: _Fetched) -> WarmResult:
        result = WarmResult(
            warm.command_id,
            warm.origin_event_id,
            fetched.url,
            fetched.status,
            fetched.cache_status,
            fetched.confirmed,
            fetched.at_ms,
        )
        self.results.append(result)
        return result

    async def _get_all(self, urls: Sequence[str]) -> list[EdgeResponse]:
        """GET each of `urls`, pipelined; a 5xx or no answer is fetched again on its own,
        through the retry policy (TransientError when it still fails)."""
        if not urls:
            return []
        answers = await self.edge.many([EdgeRequest("GET", url) for url in urls])
        responses: dict[int, EdgeResponse] = {}
        failed: dict[int, Exception] = {}
        for i, answer in enumerate(answers):
            if isinstance(answer, EdgeError):
                failed[i] = answer
            elif answer.status_code >= 500:
                failed[i] = _server_error(answer)
            else:
                responses[i] = answer
        if failed:
            again = await asyncio.gather(
                *(self._get(urls[i], failed=exc) for i, exc in failed.items())
            )
            responses.update(zip(failed, again, strict=True))
        return [responses[i] for i in range(len(urls))]

    async def _get(self, url: str, *, failed: Exception | None = None) -> EdgeResponse:
        """GET `url`, retried by the policy; `failed`: how a first try (pipelined with
        others) already failed, which counts as the first of the attempts."""

        async def once() -> EdgeResponse:
            response = await self.edge.request("GET", url)
            if response.status_code >= 500:
                raise _server_error(response)
            return response

        # The first try goes outside the retry loop: stamina builds its state per call, which
        # cost more CPU than the fetch itself. A failed first try is replayed to the loop as
        # its first attempt, so the attempts, the backoff and the retry count stay the policy's.
        if failed is None:
            try:
                return await once()
            except (ServerError, EdgeError) as exc:
                failed = exc

        async def again() -> EdgeResponse:
            nonlocal failed
            if failed is not None:
                first, failed = failed, None
                raise first
            return await once()

        try:
            return await with_retries(
                again,
                self.retries,
                network=(EdgeError,),
                sink=self.kind,
                region=self.region,
                what=f"warmer {self.region}: GET {url} via {self.edge_url}",
            )
        except TransientError:
            telemetry.warm_fetches.add(1, {"region": self.region, "cache_status": "error"})
            raise

    async def close(self) -> None:
        await self.edge.aclose()
        await self.redis.aclose()
