"""`cachesync status`: a live terminal view for an incident.

Two sources, so it works even when the pipeline is down: consumer lag straight from
Kafka (committed offsets of every cachesync group against the log end), and the
pipeline's own /metrics (throughput, purge latency, hit ratios, sinks the provider
refuses as a whole), read twice to turn counters into rates.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.table import Table

from cachesync.consumers.settings import Settings

Labels = tuple[tuple[str, str], ...]


@dataclass
class Snapshot:
    at: float
    lag: dict[str, int] = field(default_factory=dict)  # group -> messages behind
    samples: dict[str, dict[Labels, float]] = field(
        default_factory=dict
    )  # sample name -> labels -> value
    metrics_error: str | None = None

    def total(self, name: str, **match: str) -> float:
        return sum(
            v
            for labels, v in self.samples.get(name, {}).items()
            if all(dict(labels).get(k) == want for k, want in match.items())
        )

    def by(self, name: str, *keys: str, **match: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = defaultdict(float)
        for labels, v in self.samples.get(name, {}).items():
            d = dict(labels)
            if all(d.get(k) == want for k, want in match.items()):
                out[tuple(d.get(k, "") for k in keys)] += v
        return out


async def collect(settings: Settings, metrics_url: str | None) -> Snapshot:
    snap = Snapshot(at=time.monotonic())
    snap.lag = await group_lag(settings)
    if metrics_url:
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                text = (await client.get(metrics_url)).text
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    snap.samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        except httpx.HTTPError as exc:
            snap.metrics_error = f"{metrics_url}: {type(exc).__name__}"
    return snap


async def group_lag(settings: Settings) -> dict[str, int]:
    """Messages behind per cachesync consumer group, from committed offsets."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None)
    await admin.start()
    await consumer.start()
    try:
        groups = [
            g[0]
            for g in await admin.list_consumer_groups()
            if g[0].startswith(settings.group_prefix + ".")
        ]
        lag: dict[str, int] = {}
        for group in sorted(groups):
            offsets = await admin.list_consumer_group_offsets(group)
            tps = [tp for tp in offsets if isinstance(tp, TopicPartition)]
            if not tps:
                continue
            ends = await consumer.end_offsets(tps)
            lag[group] = sum(max(0, ends[tp] - offsets[tp].offset) for tp in tps)
        return lag
    finally:
        await consumer.stop()
        await admin.close()


def _rate(cur: Snapshot, prev: Snapshot | None, value_now: float, value_then: float) -> str:
    if prev is None:
        return "-"
    dt = cur.at - prev.at
    return f"{max(0.0, value_now - value_then) / dt:.1f}/s" if dt > 0 else "-"


def _quantile(buckets: dict[float, float], q: float) -> float | None:
    """Quantile from cumulative histogram buckets (upper bound -> count)."""
    if not buckets:
        return None
    total = max(buckets.values())
    if total <= 0:
        return None
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            return bound
    return None


def _latency(snap: Snapshot, prev: Snapshot | None, region: str, sink: str, q: float) -> str:
    buckets: dict[float, float] = defaultdict(float)
    for labels, v in snap.samples.get("cachesync_purge_latency_milliseconds_bucket", {}).items():
        d = dict(labels)
        if d.get("region") == region and d.get("sink") == sink:
            before = (
                prev.samples.get("cachesync_purge_latency_milliseconds_bucket", {}).get(labels, 0.0)
                if prev
                else 0.0
            )
            buckets[float(d["le"])] += v - before
    value = _quantile(buckets, q)
    return "-" if value is None else ("> max" if value == float("inf") else f"<= {value:g} ms")


def render(settings: Settings, cur: Snapshot, prev: Snapshot | None) -> Group:
    pipeline = Table(title="pipeline", expand=True)
    for col in ("events in", "commands out", "dead-lettered", "mapper lag"):
        pipeline.add_column(col)
    then = prev or cur
    pipeline.add_row(
        f"{cur.total('cachesync_events_in_total'):.0f} ({_rate(cur, prev, cur.total('cachesync_events_in_total'), then.total('cachesync_events_in_total'))})",
        f"{cur.total('cachesync_commands_out_total'):.0f} ({_rate(cur, prev, cur.total('cachesync_commands_out_total'), then.total('cachesync_commands_out_total'))})",
        f"{cur.total('cachesync_dead_lettered_total'):.0f}",
        str(cur.lag.get(settings.group_id("mapper"), "-")),
    )
    sinks = Table(title="sinks per region", expand=True)
    for col in ("region", "sink", "state", "applied", "rate", "lag", "purge p50", "purge p99"):
        sinks.add_column(col)
    applied = cur.by("cachesync_commands_applied_total", "region", "sink")
    applied_then = then.by("cachesync_commands_applied_total", "region", "sink")
    blocked = blocked_sinks(cur)
    unknown = "-" if cur.metrics_error or not cur.samples else "ok"
    pairs = (
        set(applied)
        | set(cur.by("cachesync_sink_blocked", "region", "sink"))
        | {
            tuple(g.split(".")[-2:])
            for g in cur.lag
            if g.startswith(settings.group_id("sink") + ".")
        }
    )
    for region, sink in sorted(pairs):
        reasons = blocked.get((region, sink))
        sinks.add_row(
            region,
            sink,
            f"[bold red]BLOCKED: {', '.join(reasons)}[/bold red]" if reasons else unknown,
            f"{applied.get((region, sink), 0):.0f}",
            _rate(cur, prev, applied.get((region, sink), 0), applied_then.get((region, sink), 0)),
            str(cur.lag.get(settings.group_id("sink", region, sink), "-")),
            _latency(cur, prev, region, sink, 0.5),
            _latency(cur, prev, region, sink, 0.99),
        )
    caches = Table(title="cache effectiveness", expand=True)
    for col in ("what", "hits", "misses", "hit ratio", "other"):
        caches.add_column(col)
    warms = cur.by("cachesync_warm_fetches_total", "cache_status")
    hit, miss = warms.get(("HIT",), 0.0), warms.get(("MISS",), 0.0)
    caches.add_row("edge after warming", f"{hit:.0f}", f"{miss:.0f}", _ratio(hit, miss), "")
    v_hit = cur.total("cachesync_vendor_api_hits_total")
    v_miss = cur.total("cachesync_vendor_api_misses_total")
    caches.add_row(
        "vendor API cache",
        f"{v_hit:.0f}",
        f"{v_miss:.0f}",
        _ratio(v_hit, v_miss),
        f"stale {cur.total('cachesync_vendor_api_stale_served_total'):.0f}, "
        f"304 {cur.total('cachesync_vendor_api_revalidations_total', outcome='not_modified'):.0f}",
    )
    cdn = cur.by("cachesync_cdn_api_calls_total", "provider")
    for (provider,), calls in sorted(cdn.items()):
        caches.add_row(
            f"CDN {provider}",
            "",
            "",
            "",
            f"calls {calls:.0f}, 429s {cur.total('cachesync_cdn_throttled_total', provider=provider):.0f}, "
            f"escalations {cur.total('cachesync_cdn_escalations_total', provider=provider):.0f}",
        )
    parts: list[Table | str] = [pipeline, sinks, caches]
    for (region, sink), reasons in sorted(blocked.items()):
        parts.append(
            f"[bold red]{sink} in {region} is blocked: the provider refuses its "
            f"{' and '.join(reasons)}; its batches wait, uncommitted, and resume when the "
            f"provider accepts it again (a new secret takes a restart)[/bold red]"
        )
    if cur.metrics_error:
        parts.append(
            f"[yellow]metrics unavailable ({cur.metrics_error}); lag is read from Kafka[/yellow]"
        )
    return Group(*parts)


def blocked_sinks(snap: Snapshot) -> dict[tuple[str, str], list[str]]:
    """(region, sink) -> why the provider refuses it (credentials, configuration), from the
    `cachesync_sink_blocked` gauge; only sinks blocked now."""
    out: dict[tuple[str, str], list[str]] = {}
    for (region, sink, reason), value in sorted(
        snap.by("cachesync_sink_blocked", "region", "sink", "reason").items()
    ):
        if value > 0:
            out.setdefault((region, sink), []).append(reason)
    return out


def _ratio(hit: float, miss: float) -> str:
    return f"{hit / (hit + miss):.1%}" if hit + miss else "-"
