"""The Cloudflare sink: a region's purges as `POST /client/v4/zones/{zone}/purge_cache` calls.

Each flush coalesces its window's commands through the purge budget, then sends one
purge type per request (files, tags, prefixes, or hosts when escalation reached the
host root), at most `max_items_per_request` items each, paced by a token bucket per
zone, up to CONCURRENT_REQUESTS of them in flight at once while the bucket has
tokens to spare. A 429 becomes `RetryAfter` (the runner pauses the partition for
Retry-After); 5xx and timeouts are retried with jittered backoff (stamina) and then become
`TransientError`. A refusal of the sink itself is not the commands' fault: a 401/403
or an authentication error code (a revoked, rotated or under-privileged token) raises
`CredentialsRejected`, an unknown zone (404, 7003) `SinkMisconfigured`, and the batch
waits, uncommitted, until Cloudflare accepts the sink again (sinks/cdn.py). Any other
4xx is final: the commands of that request are returned as `Rejected` with the API's
errors (a 400 is bisected first, so one bad item does not take a hundred good ones with
it). The API token is a `SecretStr` and appears only in the Authorization header, never
in a log line or an error message.

The flush itself (ledger, budget plan, progress, retries) is the CDN template's
(sinks/cdn.py); this module holds Cloudflare's request and response mapping and limits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Unpack
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr
from redis.asyncio import Redis

from cachesync.consumers import telemetry
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import (
    CredentialsRejected,
    RetryAfter,
    SinkMisconfigured,
    SinkUnavailable,
)
from cachesync.consumers.settings import Settings, region_var
from cachesync.consumers.sinks import budget
from cachesync.consumers.sinks.budget import TokenBucket
from cachesync.consumers.sinks.cdn import CdnOptions, CdnPurgeSink, Sent
from cachesync.consumers.sinks.retry import HttpEndpoint, Retries

log = logging.getLogger(__name__)

# Error codes about the sink, not the items, whatever the status: the token (10000
# authentication error, 9103/9106/9109 unknown, missing or invalid, 6003/6111 malformed
# headers) and the zone (7003 unknown object identifier, 7000 no route).
_CREDENTIAL_CODES = frozenset({10000, 9103, 9106, 9109, 6003, 6111})
_ZONE_CODES = frozenset({7000, 7003})
# A flush's requests in flight at once, when the bucket has tokens to spare (`send`). Each
# still takes its token before it goes, so the rate and the number of calls are what they
# were one at a time; only the round trips overlap. One at a time, a photo event's flush
# (its album's tag, then its pages) took two round trips before the pages were purged.
CONCURRENT_REQUESTS = 4


class CloudflareSink(CdnPurgeSink):
    kind: ClassVar[str] = "cloudflare"
    acts_on: ClassVar[tuple[str, ...]] = ("urls", "tags", "prefixes")
    # One bucket per (API, zone) in the process, shared by every sink on that zone.
    _buckets: ClassVar[dict[tuple[str, str], TokenBucket]] = {}

    def __init__(
        self,
        region: str,
        *,
        zone: str,
        token: SecretStr,
        public_url: str,
        redis: Redis | str | None = None,
        api_url: str | None = None,
        rate_per_s: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[CdnOptions],
    ) -> None:
        super().__init__(region, redis=redis, **options)
        cf = self.policy.cloudflare
        self.retries = Retries(cf.attempts, cf.timeout_s, wait_initial_s=0.2, wait_max_s=5.0)
        self.zone = zone
        self.label = f"cloudflare zone {zone}"
        self._token = token
        self.api_url = (api_url or cf.api_url).rstrip("/")
        self.http = HttpEndpoint(
            self.api_url, timeout_s=cf.timeout_s, transport=transport, headers=self._auth
        )
        self.public_url = public_url.rstrip("/")
        self.host = urlsplit(self.public_url).netloc
        self.limits = budget.Limits(
            provider=self.kind,
            max_items_per_request=cf.max_items_per_request,
            escalate_urls_over=cf.escalate_urls_over,
            max_requests=cf.max_requests_per_flush,
            root_depth=self.policy.root_depth,
        )
        key = (self.api_url, zone)
        if key not in self._buckets:
            self._buckets[key] = TokenBucket(rate_per_s or cf.rate_per_s, cf.burst)
        self.bucket = self._buckets[key]

    @classmethod
    def unavailable(cls, settings: Settings, region: str) -> str | None:
        if region not in settings.region_cloudflare_zones:
            var = region_var("CLOUDFLARE_ZONE_", region)
            return f"region {region} has no cloudflare_zone ({var} or {settings.topology_file})"
        if not settings.topology.regions[region].public_url:
            return f"region {region} has no public_url in {settings.topology_file}"
        if settings.cloudflare_api_token is None:
            return "CLOUDFLARE_API_TOKEN is not set"
        return None

    @classmethod
    def provider_args(cls, settings: Settings, region: str) -> dict[str, Any]:
        spec = settings.topology.regions[region]
        return {
            "zone": settings.region_cloudflare_zones[region],
            "token": settings.cloudflare_api_token,
            "public_url": spec.public_url,
            "api_url": settings.cloudflare_api_url,
            "rate_per_s": spec.cloudflare_rate_per_s,
        }

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.get_secret_value()}"}

    async def send(self, plan: budget.PurgePlan, todo: Sequence[PurgeCommand]) -> Sent:
        """The plan's requests, up to CONCURRENT_REQUESTS at once when the zone's bucket
        holds a token for each above its reserve (a trickle's flush); one at a time
        otherwise: in a burst the rate is the limit, and calls together only met more
        429s (the 10,000-event burst against zones allowing 4 of the plan's 10 calls a
        second: 49-61 429s per region against 6-18, acknowledged 14 s later at p50), and
        while the sink is blocked (a single probe per wait). After a failure no request
        starts, and those under way finish before it is raised: one cancelled mid-call
        could be applied by Cloudflare yet not acknowledged here, and sent again."""
        rejected: dict[str, str] = {}
        requests = plan.requests()
        together = not self.outage.blocked and (
            self.bucket is None or self.bucket.holds(len(requests))
        )
        slots = asyncio.Semaphore(CONCURRENT_REQUESTS if together else 1)
        failures: list[BaseException] = []

        async def send_one(request: budget.PurgeRequest) -> None:
            async with slots:
                if failures or request.command_ids <= rejected.keys():
                    return
                try:
                    await self._apply(request, plan, rejected)
                except Exception as exc:
                    failures.append(exc)

        await asyncio.gather(*(send_one(r) for r in requests))
        if failures:
            raise failures[0]
        return Sent(rejected, ref=self.zone)

    def payloads(self, request: budget.PurgeRequest) -> list[dict[str, Any]]:
        """The API bodies for one planned request (the host root becomes a hosts purge)."""
        if request.kind == "tags":
            return [{"tags": list(request.items)}]
        if request.kind == "urls":
            return [{"files": [self._url(p) for p in request.items]}]
        out: list[dict[str, Any]] = []
        prefixes = [self.host + p for p in request.items if p != "/"]
        if prefixes:
            out.append({"prefixes": prefixes})
        if "/" in request.items:
            out.append({"hosts": [self.host]})
        return out

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.public_url + path

    async def _apply(
        self, request: budget.PurgeRequest, plan: budget.PurgePlan, rejected: dict[str, str]
    ) -> None:
        sent_at = time.time() * 1000
        for body in self.payloads(request):
            error = await self._purge(body)
            if error is None:
                continue
            status, message = error
            if status == 400 and len(request.items) > 1:
                # One bad item must not sink the others: bisect until it is alone.
                half = len(request.items) // 2
                for part in (request.items[:half], request.items[half:]):
                    ids = frozenset().union(*(plan.items[request.kind][i] for i in part))
                    await self._apply(budget.PurgeRequest(request.kind, part, ids), plan, rejected)
                return
            for command_id in request.command_ids:
                rejected.setdefault(command_id, message)
            return
        self.acknowledged(request, sent_at)

    async def _purge(self, body: dict[str, Any]) -> tuple[int, str] | None:
        """Send one purge; None when applied, (status, message) when permanently refused."""
        await self.pace()
        kind, items = next(iter(body.items()))
        path = f"/client/v4/zones/{self.zone}/purge_cache"
        response = await self.request("POST", path, json=body, what=self.label)
        if response.status_code == 429:
            retry_after = _retry_after(response)
            if self.bucket is not None:
                self.bucket.block(retry_after)
            self.throttled += 1
            self.count_call("throttled")
            telemetry.cdn_throttled.add(1, self.attrs)
            raise RetryAfter(f"{self.label}: 429 rate limited", retry_after)
        envelope = _json(response)
        if response.status_code >= 400 or not envelope.get("success", False):
            message = f"{self.label}: HTTP {response.status_code}: {_errors(response)}"
            refusal = _sink_refusal(response)
            if refusal is not None:
                self.count_call("blocked")
                raise refusal(message)
            self.count_call("rejected")
            log.warning("%s (%d %s)", message, len(items), kind)
            return response.status_code, message
        self.count_call("ok")
        telemetry.cdn_items.add(len(items), {**self.attrs, "kind": kind})
        telemetry.cdn_cost_units.add(1, self.attrs)
        return None

    def server_error(self, response: httpx.Response) -> str:
        return f": {_errors(response)}"


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _sink_refusal(response: httpx.Response) -> type[SinkUnavailable] | None:
    """Whether an error answer refuses the sink itself (its token, its zone), and how."""
    errors: Sequence[Any] = _json(response).get("errors") or []
    codes = {e.get("code") for e in errors if isinstance(e, dict)}
    if response.status_code in (401, 403) or codes & _CREDENTIAL_CODES:
        return CredentialsRejected
    if response.status_code == 404 or codes & _ZONE_CODES:
        return SinkMisconfigured
    return None


def _errors(response: httpx.Response) -> str:
    errors: Sequence[Any] = _json(response).get("errors") or []
    parts = [
        f"{e.get('code', '?')} {e.get('message', '')}".strip()
        for e in errors
        if isinstance(e, dict)
    ]
    return "; ".join(parts) or response.reason_phrase or "no error detail"


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0
