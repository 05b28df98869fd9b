"""Each cache tier's own hit and miss counts, read where the tier keeps them.

- Redis: `INFO stats` of each region's Redis (`keyspace_hits`, `keyspace_misses`,
  `evicted_keys`, `expired_keys`), counters since the server started. They count every key
  lookup on that server, cachesync's own markers included.
- Varnish: `varnishstat -j` of the varnishd behind each region's edge (`MAIN.cache_hit`,
  `cache_miss`, `cache_hitpass`, `n_purges`, `n_obj_purged`, `backend_req`), counters since
  it started. Regions whose edges are one varnishd read the same counters.
- Cloudflare: the GraphQL Analytics API, requests by cache status per zone over a time range
  (`httpRequestsAdaptiveGroups`). `hit`, `stale`, `updating` and `revalidated` were served
  from the cache; `miss` and `expired` went to the origin; the rest (`bypass`, `dynamic`)
  was never cacheable and is counted apart.
- CloudFront: CloudWatch `GetMetricData`, `Requests` (Sum) and `CacheHitRate` (Average, %)
  per distribution and minute, in us-east-1 where CloudFront's metrics live.

Counters that only grow (Redis, Varnish) are read as totals and turned into an interval's
figures by difference; ranged sources (Cloudflare, CloudWatch) are asked for the interval.
A tier that cannot be read gives a reading with `error` set; the others are still read.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachesync.consumers.ops.effectiveness.config import EffectivenessSettings
from cachesync.consumers.settings import Settings

TIERS = ("redis", "varnish", "cloudflare", "cloudfront")
CLOUDFLARE_HIT = frozenset({"hit", "stale", "updating", "revalidated"})
CLOUDFLARE_MISS = frozenset({"miss", "expired"})
VARNISH_FIELDS = (
    "MAIN.cache_hit",
    "MAIN.cache_miss",
    "MAIN.cache_hitpass",
    "MAIN.cache_hitmiss",
    "MAIN.n_purges",
    "MAIN.n_obj_purged",
    "MAIN.backend_req",
)
ANALYTICS_QUERY = """
query Requests($zone: String!, $since: String!, $until: String!, $limit: Int!) {
  viewer {
    zones(filter: {zoneTag: $zone}) {
      httpRequestsAdaptiveGroups(
        limit: $limit, filter: {datetime_geq: $since, datetime_lt: $until}
      ) { count dimensions { %s } }
    }
  }
}
"""
ANALYTICS_LIMIT = 10_000
CLOUDWATCH_PERIOD_S = 60


@dataclass(frozen=True, slots=True)
class Reading:
    """What one tier of one region said: hits and misses (totals since it started, or over
    the interval asked for), what else it counts, and where it was read."""

    region: str
    tier: str
    instance: str
    hits: float = 0.0
    misses: float = 0.0
    extra: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None
    cumulative: bool = True


@dataclass(frozen=True, slots=True)
class Targets:
    """Which instance of each tier serves each region (what there is to read)."""

    redis: dict[str, str]
    varnish: dict[str, str]
    cloudflare: dict[str, str]  # region -> zone
    cloudfront: dict[str, str]  # region -> distribution

    @classmethod
    def from_settings(cls, settings: Settings, eff: EffectivenessSettings) -> Targets:
        return cls(
            redis=dict(settings.region_redis_urls),
            varnish=eff.varnish_instances(settings),
            cloudflare=dict(settings.region_cloudflare_zones)
            if settings.cloudflare_api_token is not None
            else {},
            cloudfront=dict(settings.region_cloudfront_distributions)
            if settings.aws_access_key_id is not None
            else {},
        )

    def of(self, tier: str) -> dict[str, str]:
        found: dict[str, str] = getattr(self, tier)
        return found

    def shared(self, tier: str, region: str) -> bool:
        """Whether another region reads the same instance of `tier`."""
        mine = self.of(tier).get(region)
        return sum(1 for v in self.of(tier).values() if v == mine) > 1


def redacted(url: str) -> str:
    """A Redis URL without its password, to name the instance in a report."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"


# -- Redis ---------------------------------------------------------------------------
async def read_redis(region: str, url: str, client: Redis | None = None) -> Reading:
    own = client is None
    redis = client if client is not None else Redis.from_url(url)
    try:
        stats = await redis.info("stats")
    except (RedisError, OSError) as exc:
        return Reading(region, "redis", redacted(url), error=f"INFO stats: {exc}")
    finally:
        if own:
            await redis.aclose()
    return Reading(
        region,
        "redis",
        redacted(url),
        hits=float(stats.get("keyspace_hits", 0)),
        misses=float(stats.get("keyspace_misses", 0)),
        extra={
            "evicted_keys": float(stats.get("evicted_keys", 0)),
            "expired_keys": float(stats.get("expired_keys", 0)),
        },
    )


# -- Varnish -------------------------------------------------------------------------
async def varnishstat(instance: str) -> dict[str, float]:
    """`varnishstat -n INSTANCE -j`, the fields cachesync reads, as name -> value."""
    binary = shutil.which("varnishstat")
    if binary is None:
        raise OSError("varnishstat is not installed (Debian's varnish package has it)")
    args = [binary, "-n", instance, "-j"]
    for name in VARNISH_FIELDS:
        args += ["-f", name]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=10)
    if proc.returncode != 0:
        raise OSError(f"varnishstat -n {instance}: {(err or out).decode().strip()[:200]}")
    data = json.loads(out)
    # Varnish 6.5+ nests the counters under "counters"; older ones do not.
    counters = data.get("counters", data)
    return {
        name: float(c["value"])
        for name, c in counters.items()
        if isinstance(c, dict) and "value" in c
    }


async def read_varnish(region: str, instance: str) -> Reading:
    try:
        c = await varnishstat(instance)
    except (OSError, TimeoutError, ValueError) as exc:
        return Reading(region, "varnish", instance, error=str(exc) or type(exc).__name__)
    return Reading(
        region,
        "varnish",
        instance,
        hits=c.get("MAIN.cache_hit", 0.0),
        misses=c.get("MAIN.cache_miss", 0.0),
        extra={
            "hitpass": c.get("MAIN.cache_hitpass", 0.0),
            "purges": c.get("MAIN.n_purges", 0.0),
            "objects_purged": c.get("MAIN.n_obj_purged", 0.0),
            "origin_requests": c.get("MAIN.backend_req", 0.0),
        },
    )


# -- Cloudflare ----------------------------------------------------------------------
def iso(ms: float) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class CloudflareAnalytics:
    """Cloudflare's GraphQL Analytics API: requests per zone, grouped by the dimensions asked."""

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = api_url.rstrip("/") + "/client/v4/graphql"
        self._http = httpx.AsyncClient(
            timeout=15.0, transport=transport, headers={"Authorization": f"Bearer {token}"}
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> CloudflareAnalytics | None:
        if settings.cloudflare_api_token is None:
            return None
        return cls(
            settings.cloudflare_api_url or settings.topology.cdn.cloudflare.api_url,
            settings.cloudflare_api_token.get_secret_value(),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def groups(
        self, zone: str, since_ms: float, until_ms: float, dimensions: Sequence[str]
    ) -> list[tuple[int, dict[str, Any]]]:
        """(count, dimensions) per group over [since, until), whole seconds. A range with more
        groups than the API returns at once is asked for in halves."""
        since_s, until_s = int(since_ms // 1000), int(until_ms // 1000)
        if until_s <= since_s:
            return []
        found = await self._query(zone, since_s, until_s, dimensions)
        if len(found) < ANALYTICS_LIMIT or until_s - since_s <= 1:
            return found
        middle = (since_s + until_s) // 2
        return [
            *await self.groups(zone, since_s * 1000, middle * 1000, dimensions),
            *await self.groups(zone, middle * 1000, until_s * 1000, dimensions),
        ]

    async def _query(
        self, zone: str, since_s: int, until_s: int, dimensions: Sequence[str]
    ) -> list[tuple[int, dict[str, Any]]]:
        body = {
            "query": ANALYTICS_QUERY % " ".join(dimensions),
            "variables": {
                "zone": zone,
                "since": iso(since_s * 1000),
                "until": iso(until_s * 1000),
                "limit": ANALYTICS_LIMIT,
            },
        }
        response = await self._http.post(self.url, json=body)
        try:
            payload = response.json()
        except ValueError:
            raise ValueError(f"analytics HTTP {response.status_code}: not JSON") from None
        if not isinstance(payload, dict):
            raise ValueError(f"analytics HTTP {response.status_code}: not a JSON object")
        if response.status_code != 200 or payload.get("errors"):
            messages = [e.get("message", "?") for e in payload.get("errors") or []]
            raise ValueError(f"analytics HTTP {response.status_code}: {'; '.join(messages)}")
        zones = ((payload.get("data") or {}).get("viewer") or {}).get("zones") or []
        return [
            (int(g["count"]), dict(g.get("dimensions") or {}))
            for z in zones
            for g in z.get("httpRequestsAdaptiveGroups") or []
        ]

    async def read(self, region: str, zone: str, since_ms: float, until_ms: float) -> Reading:
        try:
            groups = await self.groups(zone, since_ms, until_ms, ["cacheStatus"])
        except (httpx.HTTPError, ValueError) as exc:
            return Reading(region, "cloudflare", zone, error=str(exc), cumulative=False)
        by_status: Counter[str] = Counter()
        for count, dims in groups:
            by_status[str(dims.get("cacheStatus", "")).lower()] += count
        hits = sum(n for s, n in by_status.items() if s in CLOUDFLARE_HIT)
        misses = sum(n for s, n in by_status.items() if s in CLOUDFLARE_MISS)
        return Reading(
            region,
            "cloudflare",
            zone,
            hits=float(hits),
            misses=float(misses),
            extra={"uncacheable": float(sum(by_status.values()) - hits - misses)},
            cumulative=False,
        )


# -- CloudFront ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MinuteFigures:
    at_ms: int
    requests: float
    hit_rate: float | None  # percent, as CloudWatch has it


class CloudFrontMetrics:
    """CloudWatch GetMetricData for CloudFront distributions (aioboto3)."""

    def __init__(
        self,
        *,
        endpoint_url: str | None,
        access_key: str,
        secret_key: str,
        region_name: str = "us-east-1",
    ) -> None:
        import aioboto3  # only a tool that reads CloudWatch pays for importing it

        self.endpoint_url = endpoint_url
        self._session = aioboto3.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region_name,
        )
        # One CloudWatch client for as long as this lives (`aclose`): the recorder reads
        # every 5 s, and a client made per read (service model, connector, session) was
        # an eighth of an idle `run all`'s CPU.
        self._clients = contextlib.AsyncExitStack()
        self._client: Any = None
        self._opening = asyncio.Lock()

    async def _cloudwatch(self) -> Any:
        async with self._opening:  # reads run concurrently (status): one client for all
            if self._client is None:
                self._client = await self._clients.enter_async_context(
                    self._session.client("cloudwatch", endpoint_url=self.endpoint_url)
                )
        return self._client

    async def aclose(self) -> None:
        self._client = None
        await self._clients.aclose()

    @classmethod
    def from_settings(
        cls, settings: Settings, eff: EffectivenessSettings
    ) -> CloudFrontMetrics | None:
        if settings.aws_access_key_id is None or settings.aws_secret_access_key is None:
            return None
        return cls(
            endpoint_url=eff.cloudwatch_endpoint(settings),
            access_key=settings.aws_access_key_id.get_secret_value(),
            secret_key=settings.aws_secret_access_key.get_secret_value(),
        )

    async def minutes(
        self, distribution: str, since_ms: float, until_ms: float
    ) -> list[MinuteFigures]:
        """Requests and cache hit rate per minute over [since, until)."""
        dimensions = [
            {"Name": "DistributionId", "Value": distribution},
            {"Name": "Region", "Value": "Global"},
        ]

        def query(qid: str, metric: str, stat: str) -> dict[str, Any]:
            return {
                "Id": qid,
                "MetricStat": {
                    "Metric": {
                        "Namespace": "AWS/CloudFront",
                        "MetricName": metric,
                        "Dimensions": dimensions,
                    },
                    "Period": CLOUDWATCH_PERIOD_S,
                    "Stat": stat,
                },
                "ReturnData": True,
            }

        series: dict[str, dict[int, float]] = {"requests": {}, "hitrate": {}}
        cw = await self._cloudwatch()
        kwargs: dict[str, Any] = {
            "MetricDataQueries": [
                query("requests", "Requests", "Sum"),
                query("hitrate", "CacheHitRate", "Average"),
            ],
            "StartTime": dt.datetime.fromtimestamp(since_ms / 1000, dt.UTC),
            "EndTime": dt.datetime.fromtimestamp(until_ms / 1000, dt.UTC),
            "ScanBy": "TimestampAscending",
        }
        while True:
            page = await cw.get_metric_data(**kwargs)
            for result in page.get("MetricDataResults", []):
                for stamp, value in zip(result["Timestamps"], result["Values"], strict=True):
                    series[result["Id"]][int(stamp.timestamp() * 1000)] = float(value)
            if not page.get("NextToken"):
                break
            kwargs["NextToken"] = page["NextToken"]
        return [
            MinuteFigures(at, series["requests"][at], series["hitrate"].get(at))
            for at in sorted(series["requests"])
        ]

    async def read(
        self, region: str, distribution: str, since_ms: float, until_ms: float
    ) -> Reading:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            minutes = await self.minutes(distribution, since_ms, until_ms)
        except (BotoCoreError, ClientError, OSError) as exc:
            return Reading(region, "cloudfront", distribution, error=str(exc), cumulative=False)
        hits = sum(m.requests * (m.hit_rate or 0.0) / 100 for m in minutes)
        total = sum(m.requests for m in minutes)
        return Reading(
            region,
            "cloudfront",
            distribution,
            hits=hits,
            misses=total - hits,
            extra={"minutes": float(len(minutes))},
            cumulative=False,
        )
