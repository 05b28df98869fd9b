"""The HTTP-purge sink: a region's purges sent to a Varnish/Fastly-style edge.

- URLs: `PURGE <edge><path>`, one request each, `concurrency` at a time;
- tags: `PURGE /` with the surrogate keys in `xkey-purge` (or `xkey-softpurge`, which
  keeps serving the stale object while the origin is asked again), at most
  `max_keys_per_request` keys per request;
- prefixes: `BAN /` with `x-ban-url: ^<escaped prefix>`, matched against each cached
  object's URL.

The edge must accept these only from the purger (deploy/varnish/default.vcl allows
loopback). A 5xx or timeout is retried with jittered backoff and then becomes
`TransientError`; a 401/403 (a Fastly-style edge refusing the purger's key) refuses the
sink itself, `CredentialsRejected`: the batch waits, uncommitted (sinks/cdn.py). Any
other refusal (405: not allowed) is final and the commands are returned as `Rejected`.

The flush itself (ledger, budget plan, progress, retries) is the CDN template's
(sinks/cdn.py); this module holds the edge's requests and its concurrency.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Unpack

import httpx
from redis.asyncio import Redis

from cachesync.consumers import telemetry
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import CredentialsRejected, SinkUnavailable, TransientError
from cachesync.consumers.settings import Settings, region_var
from cachesync.consumers.sinks import budget
from cachesync.consumers.sinks.cdn import CdnOptions, CdnPurgeSink, Sent
from cachesync.consumers.sinks.retry import HttpEndpoint, Retries

log = logging.getLogger(__name__)


def edge_unavailable(settings: Settings, region: str) -> str | None:
    """Why `region` has no HTTP edge to purge or warm through, or None."""
    if region not in settings.region_edge_urls:
        var = region_var("EDGE_URL_", region)
        return f"region {region} has no edge_url ({var} or the topology)"
    return None


class HttpPurgeSink(CdnPurgeSink):
    kind: ClassVar[str] = "http_purge"
    acts_on: ClassVar[tuple[str, ...]] = ("urls", "tags", "prefixes")

    def __init__(
        self,
        region: str,
        *,
        edge_url: str,
        redis: Redis | str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        soft: bool | None = None,
        **options: Unpack[CdnOptions],
    ) -> None:
        super().__init__(region, redis=redis, **options)
        hp = self.policy.http_purge
        self.retries = Retries(hp.attempts, hp.timeout_s, wait_initial_s=0.1, wait_max_s=2.0)
        self.http = HttpEndpoint(edge_url, timeout_s=hp.timeout_s, transport=transport)
        self.edge_url = edge_url.rstrip("/")
        self.label = f"http_purge {self.edge_url}"
        self.soft = hp.soft if soft is None else soft
        self.limits = budget.Limits(
            provider=self.kind, max_items_per_request=hp.max_keys_per_request
        )
        self._gate = asyncio.Semaphore(hp.concurrency)

    @classmethod
    def unavailable(cls, settings: Settings, region: str) -> str | None:
        return edge_unavailable(settings, region)

    @classmethod
    def provider_args(cls, settings: Settings, region: str) -> dict[str, Any]:
        return {"edge_url": settings.region_edge_urls[region]}

    async def send(self, plan: budget.PurgePlan, todo: Sequence[PurgeCommand]) -> Sent:
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
            # What was acknowledged is in the progress; the retry sends only the rest. A
            # refusal of the sink itself says the most about the rest, so it goes first.
            first = next((f for f in failures if isinstance(f, SinkUnavailable)), failures[0])
            if isinstance(first, TransientError):
                raise first
            raise TransientError(f"http_purge {self.region}: {type(first).__name__}") from first
        return Sent(rejected, ref=self.edge_url)

    async def _send(self, request: budget.PurgeRequest, rejected: dict[str, str]) -> None:
        if request.kind == "tags":
            header = "xkey-softpurge" if self.soft else "xkey-purge"
            method, path, headers = "PURGE", "/", {header: " ".join(request.items)}
        elif request.kind == "prefixes":
            pattern = "^" + re.escape(request.items[0])
            method, path, headers = "BAN", "/", {"x-ban-url": pattern}
        else:
            method, path, headers = "PURGE", request.items[0], {}
        sent_at = time.time() * 1000
        async with self._gate:
            response = await self.request(
                method, path, headers=headers, what=f"{self.label}: {method}"
            )
        if response.status_code >= 400:
            message = (
                f"{self.label}: {method} {path} refused: "
                f"HTTP {response.status_code} {response.reason_phrase}"
            )
            if response.status_code in (401, 403):
                self.count_call("blocked")
                raise CredentialsRejected(message)
            self.count_call("rejected")
            log.warning(message)
            for command_id in request.command_ids:
                rejected.setdefault(command_id, message)
            return
        self.count_call("ok")
        telemetry.cdn_items.add(len(request.items), {**self.attrs, "kind": request.kind})
        self.acknowledged(request, sent_at)
