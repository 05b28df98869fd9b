"""Everything `cachesync report` shows for a time range, read from where it is kept.

- purges: the command topics (what the mapper issued, never the sinks' word);
- purge latency per sink and warms' edge cache statuses: the audit topic;
- Redis and Varnish hit ratios, their per-request outcomes, the consistency tallies: what
  the recorder wrote to the state Redis (`store`);
- Cloudflare: its GraphQL Analytics, per request group (time, host, path, cache status,
  User-Agent); CloudFront: CloudWatch's minutes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import BadInput
from cachesync.consumers.ops.effectiveness.config import EffectivenessSettings
from cachesync.consumers.ops.effectiveness.cost import (
    Cost,
    IssuedPurge,
    TierLog,
    invalidation_cost,
)
from cachesync.consumers.ops.effectiveness.store import EffectivenessStore, Outcome, who
from cachesync.consumers.ops.effectiveness.tiers import (
    CLOUDFLARE_HIT,
    CLOUDFLARE_MISS,
    CloudflareAnalytics,
    CloudFrontMetrics,
    Targets,
)
from cachesync.consumers.ops.window import TimeWindow
from cachesync.consumers.pipeline.audit import decode_audits
from cachesync.consumers.pipeline.codecs import close_codec, codec_for, decode, start_codec
from cachesync.consumers.settings import Settings

log = logging.getLogger(__name__)

# Latency samples kept per (region, sink) for the page; beyond this, every n-th.
LATENCY_KEPT = 2000


@dataclass(frozen=True, slots=True)
class RatioPoint:
    at: int  # epoch ms, the end of the interval
    region: str
    tier: str
    hits: float
    misses: float
    instance: str = ""  # regions sharing one (a varnishd) have the same figures


@dataclass
class ReportData:
    since_ms: int
    until_ms: int
    window_s: float
    ratios: list[RatioPoint] = field(default_factory=list)
    purges: list[IssuedPurge] = field(default_factory=list)
    latency_ms: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    warm_statuses: dict[str, dict[str, int]] = field(default_factory=dict)  # region -> status
    costs: list[Cost] = field(default_factory=list)
    consistency: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(region, tier) -> hits and misses over the whole range."""
        out: dict[tuple[str, str], tuple[float, float]] = {}
        for p in self.ratios:
            h, m = out.get((p.region, p.tier), (0.0, 0.0))
            out[(p.region, p.tier)] = (h + p.hits, m + p.misses)
        return out

    def tier_totals(self) -> dict[str, tuple[float, float]]:
        """tier -> hits and misses over the whole range, an instance shared by regions once."""
        seen: set[tuple[str, str, int]] = set()
        out: dict[str, tuple[float, float]] = {}
        for p in self.ratios:
            key = (p.tier, p.instance or p.region, p.at)
            if key in seen:
                continue
            seen.add(key)
            h, m = out.get(p.tier, (0.0, 0.0))
            out[p.tier] = (h + p.hits, m + p.misses)
        return out


async def gather(
    settings: Settings, eff: EffectivenessSettings, *, since_ms: int, until_ms: int
) -> ReportData:
    data = ReportData(since_ms, until_ms, eff.window_s)
    targets = Targets.from_settings(settings, eff)
    logs: list[TierLog] = []
    await _from_store(settings, eff, data, logs)
    await _from_topics(settings, data)
    await _from_cloudflare(settings, targets, data, logs)
    await _from_cloudfront(settings, eff, targets, data)
    data.costs = invalidation_cost(data.purges, logs, window_s=eff.window_s)
    return data


async def _from_store(
    settings: Settings, eff: EffectivenessSettings, data: ReportData, logs: list[TierLog]
) -> None:
    redis = Redis.from_url(str(settings.state_redis_url))
    store = EffectivenessStore(redis, settings.group_prefix, retention_s=eff.retention_s)
    try:
        entries = await store.read(data.since_ms, data.until_ms)
    except (RedisError, OSError) as exc:
        data.notes.append(f"the recorder's data could not be read: {exc}")
        return
    finally:
        await redis.aclose()
    outcomes: dict[tuple[str, str, tuple[str, ...]], list[Outcome]] = defaultdict(list)
    for entry in entries:
        if entry.kind == "sample":
            for row in entry.data["rows"]:
                if row.get("error") is None and row["tier"] in ("redis", "varnish"):
                    data.ratios.append(
                        RatioPoint(
                            int(entry.data["at"]),
                            row["region"],
                            row["tier"],
                            row["hits"],
                            row["misses"],
                            row.get("instance", ""),
                        )
                    )
        elif entry.kind == "requests":
            key = (entry.data["tier"], entry.data["instance"], tuple(entry.data["regions"]))
            outcomes[key].extend(Outcome.from_row(r) for r in entry.data["rows"])
        elif entry.kind == "consistency":
            data.consistency = {
                (r["region"], r["sink"]): (int(r["probed"]), int(r["converged"]))
                for r in entry.data["rows"]
            }
    for (tier, instance, regions), rows in outcomes.items():
        logs.append(TierLog(tier, instance, regions, rows))
    if not entries:
        data.notes.append(
            "the recorder wrote nothing in this range (it runs in `cachesync run all`)"
        )


async def _from_topics(settings: Settings, data: ReportData) -> None:
    """Purges from the command topics; sink latencies and warm statuses from the audit topic."""
    codec = codec_for(settings)
    await start_codec(codec)
    try:
        commands = [settings.commands_topic(r) for r in settings.topology.regions]
        async with TimeWindow(
            settings,
            commands,
            since_ms=data.since_ms,
            until_ms=data.until_ms,
            client_id="cachesync-report",
        ) as window:
            async for records in window.batches():
                for record in records:
                    try:
                        decoded = await decode(codec, record.value or b"")
                    except BadInput:
                        continue
                    if decoded.type_name != "purge":
                        continue
                    c = PurgeCommand.from_record(decoded.record)
                    if c.replay:
                        continue
                    data.purges.append(
                        IssuedPurge(
                            c.issued_at,
                            c.origin_event_id,
                            c.origin_event_type,
                            c.region,
                            c.keys,
                            c.tags,
                            c.urls,
                            c.prefixes,
                        )
                    )
        latency: dict[tuple[str, str], list[float]] = defaultdict(list)
        warms: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        async with TimeWindow(
            settings,
            [settings.audit_topic],
            since_ms=data.since_ms,
            until_ms=data.until_ms,
            client_id="cachesync-report",
        ) as window:
            async for records in window.batches():
                for record in records:
                    for audit in decode_audits(codec, record.value or b""):
                        if audit.stage != "sink" or audit.region is None or audit.sink is None:
                            continue
                        if audit.kind == "purge" and audit.outcome == "applied":
                            latency[(audit.region, audit.sink)].append(float(audit.latency_ms))
                        elif audit.kind == "warm":
                            for status in audit.cache_status.values():
                                warms[audit.region][status.split()[0].upper()] += 1
        data.latency_ms = {k: _thin(v) for k, v in latency.items()}
        data.warm_statuses = {r: dict(s) for r, s in warms.items()}
    finally:
        await close_codec(codec)


def _thin(values: list[float]) -> list[float]:
    if len(values) <= LATENCY_KEPT:
        return values
    step = len(values) / LATENCY_KEPT
    return [values[int(i * step)] for i in range(LATENCY_KEPT)]


async def _from_cloudflare(
    settings: Settings, targets: Targets, data: ReportData, logs: list[TierLog]
) -> None:
    analytics = CloudflareAnalytics.from_settings(settings) if targets.cloudflare else None
    if analytics is None:
        return
    try:
        for region, zone in sorted(targets.cloudflare.items()):
            public = settings.topology.regions[region].public_url or ""
            host = urlsplit(public).netloc
            try:
                groups = await analytics.groups(
                    zone,
                    data.since_ms,
                    data.until_ms,
                    [
                        "datetime",
                        "clientRequestHTTPHost",
                        "clientRequestPath",
                        "cacheStatus",
                        "userAgent",
                    ],
                )
            except (httpx.HTTPError, ValueError) as exc:
                data.notes.append(f"Cloudflare analytics of zone {zone}: {exc}")
                continue
            rows: list[Outcome] = []
            per_minute: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for count, dims in groups:
                at = _epoch_ms(str(dims.get("datetime", "")))
                status = str(dims.get("cacheStatus", "")).lower()
                resource = str(dims.get("clientRequestHTTPHost", host)) + str(
                    dims.get("clientRequestPath", "")
                )
                agent = who(str(dims.get("userAgent", "")))
                rows.extend(Outcome(at, resource, status, agent) for _ in range(count))
                minute = at - at % 60_000 + 60_000
                if status in CLOUDFLARE_HIT:
                    per_minute[minute][0] += count
                elif status in CLOUDFLARE_MISS:
                    per_minute[minute][1] += count
            data.ratios.extend(
                RatioPoint(m, region, "cloudflare", h, x, zone)
                for m, (h, x) in sorted(per_minute.items())
            )
            logs.append(TierLog("cloudflare", zone, (region,), rows, host=host))
    finally:
        await analytics.aclose()


async def _from_cloudfront(
    settings: Settings, eff: EffectivenessSettings, targets: Targets, data: ReportData
) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    metrics = CloudFrontMetrics.from_settings(settings, eff) if targets.cloudfront else None
    if metrics is None:
        return
    try:
        for region, distribution in sorted(targets.cloudfront.items()):
            try:
                minutes = await metrics.minutes(distribution, data.since_ms, data.until_ms)
            except (BotoCoreError, ClientError, OSError) as exc:
                data.notes.append(f"CloudWatch of distribution {distribution}: {exc}")
                continue
            for m in minutes:
                hits = m.requests * (m.hit_rate or 0.0) / 100
                data.ratios.append(
                    RatioPoint(
                        m.at_ms + 60_000,
                        region,
                        "cloudfront",
                        hits,
                        m.requests - hits,
                        distribution,
                    )
                )
            if not minutes:
                data.notes.append(
                    f"CloudWatch has no CloudFront metrics for {distribution} ({region}) "
                    "in this range"
                )
    finally:
        await metrics.aclose()


def _epoch_ms(value: str) -> int:
    import datetime as dt

    return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
