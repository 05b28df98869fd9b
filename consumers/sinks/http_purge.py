"""The HTTP-purge sink: a region's purges sent to a Varnish/Fastly-style edge.

- URLs: `PURGE <edge><path>`, one request each, `concurrency` at a time;
- tags: `PURGE /` with the surrogate keys in `xkey-purge` (or `xkey-softpurge`, which
  keeps serving the stale object while the origin is asked again), at most
  `max_keys_per_request` keys per request;
- prefixes: `BAN /` with `x-ban-url: ^<escaped prefix>`, matched against each cached
  object's URL.

The edge must accept these only from the purger (deploy/varnish/default.vcl allows
loopback). A 5xx or timeout is retried with jittered backoff and then becomes
`TransientError`; any other refusal (405: not allowed) is final and the commands are
returned as `Rejected`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import ClassVar

import httpx
import stamina
from redis.asyncio import Redis

from cachesync.consumers import telemetry
from cachesync.consumers.errors import TransientError
from cachesync.consumers.sinks import budget
from cachesync.consumers.sinks.base import FlushResult, PurgeSink, Rejected, ServerError
from cachesync.consumers.sinks.ledger import AckHook, PurgeLedger, record_latency
from cachesync.topology.model import CdnPolicy

log = logging.getLogger(__name__)

PROVIDER = "http_purge"


class HttpPurgeSink(PurgeSink):
    acts_on: ClassVar[tuple[str, ...]] = ("urls", "tags", "prefixes")
    kind: ClassVar[str] = "http_purge"
    is_cdn: ClassVar[bool] = True

    def __init__(
        self,
        region: str,
        *,
        edge_url: str,
        redis: Redis | str | None = None,
        policy: CdnPolicy | None = None,
        soft: bool | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_ack: AckHook | None = None,
    ) -> None:
        super().__init__(region)
        self.policy = policy or CdnPolicy()
        hp = self.policy.http_purge
        self.edge_url = edge_url.rstrip("/")
        self.soft = hp.soft if soft is None else soft
        # The region's Redis, for the warmer's fencing records; None only in unit tests.
        self.redis = Redis.from_url(redis, socket_timeout=5) if isinstance(redis, str) else redis
        self.ledger = PurgeLedger(self.redis, self.kind, region) if self.redis else None
        self.linger_ms = self.policy.window_ms
        self.max_batch_records = self.policy.max_batch_records
        self.limits = budget.Limits(
            provider=PROVIDER, max_items_per_request=hp.max_keys_per_request
        )
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._progress = budget.Progress()
        self._recent = budget.RecentPurges(
            keep_s=self.policy.remember_purged_s, skew_ms=self.policy.clock_skew_ms
        )
        self._gate = asyncio.Semaphore(hp.concurrency)
        self.on_ack = on_ack
        self.calls = 0

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.edge_url,
                transport=self._transport,
                timeout=self.policy.http_purge.timeout_s,
            )
        return self._client

    async def setup(self) -> None:
        _ = self.client

    async def flush(self) -> FlushResult:
        pending = self.take()
        if not pending:
            return FlushResult()
        self._recent.expire(time.time() * 1000)
        plan = budget.plan(pending, self.limits, progress=self._progress, recent=self._recent)
        telemetry.cdn_coalesced.add(plan.coalesced, {"provider": PROVIDER, "region": self.region})
        requests: list[budget.PurgeRequest] = []
        for request in plan.requests():
            if request.kind == "tags":
                requests.append(request)
                continue
            # One URL per PURGE, one prefix per BAN.
            for item in request.items:
                ids = frozenset(plan.items[request.kind][item])
                requests.append(budget.PurgeRequest(request.kind, (item,), ids))
        rejected: dict[str, str] = {}
        results = await asyncio.gather(
            *(self._send(r, rejected) for r in requests), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            # What was acknowledged is in self._progress; the retry sends only the rest.
            first = failures[0]
            if isinstance(first, TransientError):
                raise first
            raise TransientError(f"http_purge {self.region}: {type(first).__name__}") from first
        self._progress.clear()
        applied = [c for c in pending if c.command_id not in rejected]
        if self.ledger is not None:
            await self.ledger.record(applied)
        record_latency(PROVIDER, self.region, applied, hook=self.on_ack, ref=self.edge_url)
        return FlushResult(
            applied=len(applied),
            rejected=tuple(
                Rejected(c, rejected[c.command_id]) for c in pending if c.command_id in rejected
            ),
        )

    async def _send(self, request: budget.PurgeRequest, rejected: dict[str, str]) -> None:
        if request.kind == "tags":
            header = "xkey-softpurge" if self.soft else "xkey-purge"
            method, path, headers = "PURGE", "/", {header: " ".join(request.items)}
        elif request.kind == "prefixes":
            pattern = "^" + re.escape(request.items[0])
            method, path, headers = "BAN", "/", {"x-ban-url": pattern}
        else:
            method, path, headers = "PURGE", request.items[0], {}
        attrs = {"provider": PROVIDER, "region": self.region}
        hp = self.policy.http_purge
        sent_at = time.time() * 1000
        async with self._gate:
            try:
                async for attempt in stamina.retry_context(
                    on=(httpx.TransportError, ServerError),
                    attempts=hp.attempts,
                    timeout=hp.timeout_s * hp.attempts,
                    wait_initial=0.1,
                    wait_max=2.0,
                ):
                    with attempt:
                        self.calls += 1
                        response = await self.client.request(method, path, headers=headers)
                        if response.status_code >= 500:
                            telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "error"})
                            raise ServerError(f"HTTP {response.status_code}")
            except ServerError as exc:
                raise TransientError(f"http_purge {self.edge_url}: {method}: {exc}") from exc
            except httpx.TransportError as exc:
                telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "error"})
                raise TransientError(
                    f"http_purge {self.edge_url}: {method}: {type(exc).__name__}"
                ) from exc
        if response.status_code >= 400:
            telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "rejected"})
            message = (
                f"http_purge {self.edge_url}: {method} {path} refused: "
                f"HTTP {response.status_code} {response.reason_phrase}"
            )
            log.warning(message)
            for command_id in request.command_ids:
                rejected.setdefault(command_id, message)
            return
        telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "ok"})
        telemetry.cdn_items.add(len(request.items), {**attrs, "kind": request.kind})
        self._progress.record(request)
        self._recent.record(request.kind, request.items, sent_at)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self.redis is not None:
            await self.redis.aclose()
