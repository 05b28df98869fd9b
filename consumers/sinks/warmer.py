"""The warmer: fetches a wedding's pages through a region's edge once its purge is applied.

A warm command comes from the same event as a purge. The warmer waits (the batch is
put back, the partition paused for `wait_retry_s`) until the purge sinks it follows
(`after`, e.g. redis and http_purge) have applied that purge in this region; warming
earlier would put the stale page back into the edge. It drops a warm that:

- newer purges have overtaken on every one of its URLs (version fencing, per URL):
  their own warms follow, and this one would fetch pages that are already stale (a
  warm with only some URLs overtaken fetches the others);
- is past its deadline, or whose purge is still not applied `max_wait_s` after it was
  issued (so one lost purge cannot hold the partition's other warms).

Each URL is fetched with a concurrency limit and timeouts; the edge's cache-status
header (`X-Cache`) is recorded. After a MISS the URL is fetched once more, and the
warm counts as confirmed only when the edge then says HIT.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import httpx
import stamina
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import Command, WarmCommand
from cachesync.consumers.errors import RetryAfter, TransientError
from cachesync.consumers.sinks.base import FlushResult, Note, ServerError, Sink
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
        self.edge_url = edge_url.rstrip("/")
        self.after = tuple(after)
        self.redis = Redis.from_url(redis, socket_timeout=5) if isinstance(redis, str) else redis
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._pending: list[WarmCommand] = []
        self._gate = asyncio.Semaphore(self.policy.warm.concurrency)
        # Warms done while others in their batch were not ready: the retried batch skips them.
        self._done: OrderedDict[str, Note] = OrderedDict()
        self.results: deque[WarmResult] = deque(maxlen=10_000)
        self.dropped: deque[tuple[str, str]] = deque(maxlen=10_000)  # (command_id, reason)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.edge_url,
                transport=self._transport,
                timeout=self.policy.warm.timeout_s,
                headers={"User-Agent": "cachesync-warmer"},
            )
        return self._client

    async def setup(self) -> None:
        _ = self.client

    def accepts(self, command: Command) -> bool:
        return isinstance(command, WarmCommand) and bool(command.urls)

    def add(self, command: Command) -> None:
        if isinstance(command, WarmCommand):
            self._pending.append(command)

    async def flush(self) -> FlushResult:
        pending, self._pending = self._pending, []
        notes: dict[str, Note] = {
            w.command_id: self._done[w.command_id] for w in pending if w.command_id in self._done
        }
        todo = [w for w in pending if w.command_id not in self._done]
        if not todo:
            self._done.clear()
            return FlushResult(skipped=len(pending), notes=notes)
        ready, waiting, dropped = await self._triage(todo)
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
        if waiting:
            for warm, _urls in ready:
                self._remember(warm.command_id, notes[warm.command_id])
            raise RetryAfter(
                f"warmer {self.region}: {len(waiting)} warms wait for their purge",
                self.policy.warm.wait_retry_s,
            )
        self._done.clear()
        return FlushResult(applied=len(ready), skipped=len(pending) - len(ready), notes=notes)

    async def _triage(
        self, warms: list[WarmCommand]
    ) -> tuple[
        list[tuple[WarmCommand, tuple[str, ...]]], list[WarmCommand], list[tuple[WarmCommand, str]]
    ]:
        """Split into ready (with the URLs still worth fetching), waiting, and dropped with why.

        Fencing is per URL: a URL that a newer purge named has been (or will be) warmed
        by that purge's own warm, so this older warm skips it; a warm all of whose URLs
        are overtaken is dropped as fenced. (Fencing by the whole wedding starved warms:
        with a wedding changing every second, every warm had a newer purge somewhere.)
        """
        now_ms = time.time() * 1000
        try:
            pipe = self.redis.pipeline(transaction=False)
            for warm in warms:
                for sink in self.after:
                    pipe.exists(keys.applied_event(sink, warm.origin_event_id))
                    for url in warm.urls:
                        pipe.get(keys.purge_version(sink, keys.url_target(url)))
            values = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise TransientError(
                f"warmer {self.region}: reading purge versions failed: {type(exc).__name__}"
            ) from exc
        ready: list[tuple[WarmCommand, tuple[str, ...]]] = []
        waiting: list[WarmCommand] = []
        dropped: list[tuple[WarmCommand, str]] = []
        position = 0
        for warm in warms:
            applied = True
            overtaken: set[str] = set()
            for _sink in self.after:
                applied = applied and bool(values[position])
                position += 1
                for url in warm.urls:
                    version = values[position]
                    position += 1
                    if version is not None and int(version) > warm.version:
                        overtaken.add(url)
            urls = tuple(u for u in warm.urls if u not in overtaken)
            if not urls:
                dropped.append((warm, "fenced"))
            elif now_ms > warm.deadline:
                dropped.append((warm, "expired"))
            elif applied:
                ready.append((warm, urls))
            elif now_ms > warm.issued_at + self.policy.warm.max_wait_s * 1000:
                dropped.append((warm, "purge_not_applied"))
            else:
                waiting.append(warm)
        return ready, waiting, dropped

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
        w = self.policy.warm
        try:
            async for attempt in stamina.retry_context(
                on=(httpx.TransportError, ServerError),
                attempts=w.attempts,
                timeout=w.timeout_s * w.attempts,
                wait_initial=0.1,
                wait_max=2.0,
            ):
                with attempt:
                    response = await self.client.get(url)
                    if response.status_code >= 500:
                        raise ServerError(f"HTTP {response.status_code}")
        except (ServerError, httpx.TransportError) as exc:
            telemetry.warm_fetches.add(1, {"region": self.region, "cache_status": "error"})
            raise TransientError(
                f"warmer {self.region}: GET {url} via {self.edge_url}: {exc or type(exc).__name__}"
            ) from exc
        return response

    def _remember(self, command_id_: str, note: Note) -> None:
        self._done[command_id_] = note
        while len(self._done) > 50_000:
            self._done.popitem(last=False)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        await self.redis.aclose()
