"""The Cloudflare sink: a region's purges as `POST /client/v4/zones/{zone}/purge_cache` calls.

Each flush coalesces its window's commands through the purge budget, then sends one
purge type per request (files, tags, prefixes, or hosts when escalation reached the
host root), at most `max_items_per_request` items each, paced by a token bucket per
zone. A 429 becomes `RetryAfter` (the runner pauses the partition for Retry-After);
5xx and timeouts are retried with jittered backoff (stamina) and then become
`TransientError`; a 4xx is final: the commands of that request are returned as
`Rejected` with the API's errors (a 400 is bisected first, so one bad item does not
take a hundred good ones with it). The API token is a `SecretStr` and appears only
in the Authorization header, never in a log line or an error message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
import stamina
from pydantic import SecretStr
from redis.asyncio import Redis

from cachesync.consumers import telemetry
from cachesync.consumers.errors import RetryAfter, TransientError
from cachesync.consumers.sinks import budget
from cachesync.consumers.sinks.base import FlushResult, PurgeSink, Rejected, ServerError
from cachesync.consumers.sinks.ledger import AckHook, PurgeLedger, record_latency
from cachesync.topology.model import CdnPolicy

log = logging.getLogger(__name__)

PROVIDER = "cloudflare"
# Our own pacing may sleep this long for a token; longer waits pause the partition.
_MAX_PACING_SLEEP_S = 1.0


class TokenBucket:
    """`rate` tokens per second, up to `burst`; one token per API call."""

    def __init__(self, rate: float, burst: int, *, clock: Any = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()
        self.blocked_until = 0.0

    def _refill(self) -> float:
        now = float(self.clock())
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return now

    def take(self) -> float:
        """Take a token and return 0, or return how long until one is free (taking none)."""
        now = self._refill()
        if now < self.blocked_until:
            return self.blocked_until - now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def block(self, seconds: float) -> None:
        """The provider said 429: nobody on this zone calls before `seconds` pass."""
        now = self._refill()
        self.tokens = 0.0
        self.blocked_until = max(self.blocked_until, now + seconds)


class CloudflareSink(PurgeSink):
    acts_on: ClassVar[tuple[str, ...]] = ("urls", "tags", "prefixes")
    kind: ClassVar[str] = "cloudflare"
    is_cdn: ClassVar[bool] = True
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
        policy: CdnPolicy | None = None,
        api_url: str | None = None,
        rate_per_s: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_ack: AckHook | None = None,
    ) -> None:
        super().__init__(region)
        self.policy = policy or CdnPolicy()
        cf = self.policy.cloudflare
        self.zone = zone
        self._token = token
        self.public_url = public_url.rstrip("/")
        self.host = urlsplit(self.public_url).netloc
        self.api_url = (api_url or cf.api_url).rstrip("/")
        # The region's Redis, for the warmer's fencing records; None only in unit tests.
        self.redis = Redis.from_url(redis, socket_timeout=5) if isinstance(redis, str) else redis
        self.ledger = PurgeLedger(self.redis, self.kind, region) if self.redis else None
        self.linger_ms = self.policy.window_ms
        self.max_batch_records = self.policy.max_batch_records
        self.limits = budget.Limits(
            provider=PROVIDER,
            max_items_per_request=cf.max_items_per_request,
            escalate_urls_over=cf.escalate_urls_over,
            max_requests=cf.max_requests_per_flush,
            root_depth=self.policy.root_depth,
        )
        key = (self.api_url, zone)
        if key not in self._buckets:
            self._buckets[key] = TokenBucket(rate_per_s or cf.rate_per_s, cf.burst)
        self.bucket = self._buckets[key]
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._progress = budget.Progress()
        self._recent = budget.RecentPurges(
            keep_s=self.policy.remember_purged_s, skew_ms=self.policy.clock_skew_ms
        )
        self.on_ack = on_ack
        self.calls = 0  # API calls made, for the CLI's status and the benchmark
        self.throttled = 0

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.api_url,
                transport=self._transport,
                timeout=self.policy.cloudflare.timeout_s,
                headers={"Authorization": f"Bearer {self._token.get_secret_value()}"},
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
        attrs = {"provider": PROVIDER, "region": self.region}
        telemetry.cdn_coalesced.add(plan.coalesced, attrs)
        for esc in plan.escalations:
            telemetry.cdn_escalations.add(1, {**attrs, "reason": esc.reason})
            log.info(
                "cloudflare %s: %d items escalated to prefix %s (%s)",
                self.zone,
                esc.replaced,
                esc.prefix,
                esc.reason,
            )
        rejected: dict[str, str] = {}
        for request in plan.requests():
            if request.command_ids <= rejected.keys():
                continue
            await self._apply(request, plan, rejected)  # raises TransientError / RetryAfter
        self._progress.clear()
        applied = [c for c in pending if c.command_id not in rejected]
        if self.ledger is not None:
            await self.ledger.record(applied)
        record_latency(PROVIDER, self.region, applied, hook=self.on_ack, ref=self.zone)
        return FlushResult(
            applied=len(applied),
            rejected=tuple(
                Rejected(c, rejected[c.command_id]) for c in pending if c.command_id in rejected
            ),
        )

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
        self._progress.record(request)
        self._recent.record(request.kind, request.items, sent_at)

    async def _purge(self, body: dict[str, Any]) -> tuple[int, str] | None:
        """Send one purge; None when applied, (status, message) when permanently refused."""
        await self._pace()
        kind, items = next(iter(body.items()))
        attrs = {"provider": PROVIDER, "region": self.region}
        path = f"/client/v4/zones/{self.zone}/purge_cache"
        cf = self.policy.cloudflare
        try:
            async for attempt in stamina.retry_context(
                on=(httpx.TransportError, ServerError),
                attempts=cf.attempts,
                timeout=cf.timeout_s * cf.attempts,
                wait_initial=0.2,
                wait_max=5.0,
            ):
                with attempt:
                    self.calls += 1
                    response = await self.client.post(path, json=body)
                    if response.status_code >= 500:
                        telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "error"})
                        raise ServerError(f"HTTP {response.status_code}: {_errors(response)}")
        except ServerError as exc:
            raise TransientError(f"cloudflare zone {self.zone}: {exc}") from exc
        except httpx.TransportError as exc:
            telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "error"})
            raise TransientError(
                f"cloudflare zone {self.zone}: {type(exc).__name__} after {cf.attempts} attempts"
            ) from exc
        if response.status_code == 429:
            retry_after = _retry_after(response)
            self.bucket.block(retry_after)
            self.throttled += 1
            telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "throttled"})
            telemetry.cdn_throttled.add(1, attrs)
            raise RetryAfter(f"cloudflare zone {self.zone}: 429 rate limited", retry_after)
        envelope = _json(response)
        if response.status_code >= 400 or not envelope.get("success", False):
            telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "rejected"})
            message = (
                f"cloudflare zone {self.zone}: HTTP {response.status_code}: {_errors(response)}"
            )
            log.warning("%s (%d %s)", message, len(items), kind)
            return response.status_code, message
        telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "ok"})
        telemetry.cdn_items.add(len(items), {**attrs, "kind": kind})
        telemetry.cdn_cost_units.add(1, attrs)
        return None

    async def _pace(self) -> None:
        while (wait := self.bucket.take()) > 0:
            if wait > _MAX_PACING_SLEEP_S:
                raise RetryAfter(f"cloudflare zone {self.zone}: rate budget spent", wait)
            await asyncio.sleep(wait)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self.redis is not None:
            await self.redis.aclose()


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


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
