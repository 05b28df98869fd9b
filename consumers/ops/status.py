"""`cachesync status`: a live terminal view for an incident, and the figures `run` prints.

Two sources, so it works even when the pipeline is down: consumer lag straight from
Kafka (committed offsets of every cachesync group against the log end), and the
pipeline's own /metrics (throughput, purge latency, hit ratios, sinks the provider
refuses as a whole), read twice to turn counters into rates.

`cachesync run` prints its progress from the same metrics, read in its own process
(`local_snapshot`: the text /metrics would serve), through the same functions
(`pipeline_figures`, `sink_figures`), so the two views always show the same numbers.
A sink is listed once it is configured in its region, whether or not it has reported
yet, so a silent warmer shows as 0 rather than not at all.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import httpx
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.table import Table

from cachesync.consumers.ops.effectiveness.status_view import hit_ratio_table, read_tiers
from cachesync.consumers.ops.effectiveness.tiers import Reading
from cachesync.consumers.ops.replication import ReplicationLag, replication_lag, replication_table
from cachesync.consumers.pipeline.kafka import (
    KafkaConnection,
    make_admin,
    make_consumer,
    regional_clusters,
)
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.registry import SINK_KINDS, available

Labels = tuple[tuple[str, str], ...]


@dataclass
class Snapshot:
    at: float
    lag: dict[str, int] = field(default_factory=dict)  # group -> messages behind
    samples: dict[str, dict[Labels, float]] = field(
        default_factory=dict
    )  # sample name -> labels -> value
    metrics_error: str | None = None
    tiers: list[Reading] = field(default_factory=list)  # each cache tier's own counters
    replication: list[ReplicationLag] = field(default_factory=list)  # regions' own clusters

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
    snap.replication = await replication_lag(settings)
    snap.tiers = await read_tiers(settings)
    if metrics_url:
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                text = (await client.get(metrics_url)).text
            _read_samples(snap, text)
        except httpx.HTTPError as exc:
            snap.metrics_error = f"{metrics_url}: {type(exc).__name__}"
    return snap


def local_snapshot() -> Snapshot:
    """This process's own metrics, as its /metrics would serve them (no lag: `run`'s
    view does not ask Kafka)."""
    snap = Snapshot(at=time.monotonic())
    # The registry's samples as they are: written out as text and parsed back, they cost
    # an idle `run all` a tenth of its CPU, each status line.
    _add_samples(snap, REGISTRY.collect())
    return snap


def _read_samples(snap: Snapshot, text: str) -> None:
    _add_samples(snap, text_string_to_metric_families(text))


def _add_samples(snap: Snapshot, families: Iterable[Metric]) -> None:
    for family in families:
        for s in family.samples:
            snap.samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value


@dataclass(frozen=True)
class PipelineFigures:
    events_in: float
    events_rate: str
    commands_out: float
    commands_rate: str
    commands_by_region: dict[str, float]
    dead_lettered: float


@dataclass(frozen=True)
class SinkFigures:
    region: str
    sink: str
    applied: float
    rate: str
    blocked: tuple[str, ...]  # why the provider refuses it, while it does


def pipeline_figures(cur: Snapshot, prev: Snapshot | None) -> PipelineFigures:
    """The mapper's side: events in, commands out (per region), dead letters."""
    then = prev or cur
    events = cur.total("cachesync_events_in_total")
    commands = cur.total("cachesync_commands_out_total")
    return PipelineFigures(
        events_in=events,
        events_rate=_rate(cur, prev, events, then.total("cachesync_events_in_total")),
        commands_out=commands,
        commands_rate=_rate(cur, prev, commands, then.total("cachesync_commands_out_total")),
        commands_by_region={
            region: n
            for (region,), n in sorted(cur.by("cachesync_commands_out_total", "region").items())
        },
        dead_lettered=cur.total("cachesync_dead_lettered_total"),
    )


def sink_figures(settings: Settings, cur: Snapshot, prev: Snapshot | None) -> list[SinkFigures]:
    """Per region and sink: commands applied and their rate, and whether it is blocked;
    every sink configured in its region, plus any the metrics or consumer groups name."""
    applied = cur.by("cachesync_commands_applied_total", "region", "sink", outcome="applied")
    applied_then = (prev or cur).by(
        "cachesync_commands_applied_total", "region", "sink", outcome="applied"
    )
    blocked = blocked_sinks(cur)
    group_prefix = settings.group_id("sink") + "."
    pairs = (
        {(r, k) for r in settings.topology.regions for k in available(settings, r, SINK_KINDS)}
        | set(applied)
        | set(cur.by("cachesync_sink_blocked", "region", "sink"))
        | {tuple(g.split(".")[-2:]) for g in cur.lag if g.startswith(group_prefix)}
    )
    order = {kind: i for i, kind in enumerate(SINK_KINDS)}
    return [
        SinkFigures(
            region=region,
            sink=sink,
            applied=applied.get((region, sink), 0.0),
            rate=_rate(
                cur, prev, applied.get((region, sink), 0), applied_then.get((region, sink), 0)
            ),
            blocked=tuple(blocked.get((region, sink), ())),
        )
        for region, sink in sorted(pairs, key=lambda p: (p[0], order.get(p[1], 99), p[1]))
    ]


def run_lines(
    settings: Settings,
    cur: Snapshot,
    prev: Snapshot | None,
    *,
    mapper: bool = True,
    sinks: Collection[tuple[str, str]] | None = None,
) -> list[str]:
    """`cachesync run`'s progress lines: the figures of `status`, in a few lines, for the
    mapper (if it runs here) and `sinks` (default: every one `status` lists)."""
    p = pipeline_figures(cur, prev)
    dlq = f" [red]dead-lettered {p.dead_lettered:.0f}[/red]" if p.dead_lettered else ""
    out = " ".join(f"{r}={n:.0f}" for r, n in p.commands_by_region.items())
    lines = (
        [f"[bold]mapper[/bold] {p.events_in:.0f} events ({p.events_rate}) -> commands {out}{dlq}"]
        if mapper
        else []
    )
    regions: dict[str, list[str]] = {}
    for f in sink_figures(settings, cur, prev):
        if sinks is not None and (f.region, f.sink) not in sinks:
            continue
        state = f" [red]BLOCKED ({', '.join(f.blocked)})[/red]" if f.blocked else ""
        regions.setdefault(f.region, []).append(f"{f.sink} {f.applied:.0f}{state}")
    for region, parts in regions.items():
        lines.append(f"  [bold]{region}[/bold] applied: " + " · ".join(parts))
    return lines


async def group_lag(settings: Settings) -> dict[str, int]:
    """Messages behind per cachesync consumer group, from committed offsets: the home
    cluster's groups, and those of each region whose sinks read a cluster of their own (a
    region's cluster that does not answer shows in the replication table instead)."""
    lag = await _group_lag(settings, KafkaConnection.of(settings))
    for kafka in regional_clusters(settings).values():
        try:
            lag.update(await _group_lag(settings, kafka))
        except (KafkaError, OSError):
            continue
    return lag


async def _group_lag(settings: Settings, kafka: KafkaConnection) -> dict[str, int]:
    admin = make_admin(kafka, client_id="cachesync-status")
    consumer = make_consumer(kafka, group_id=None, client_id="cachesync-status")
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
    p = pipeline_figures(cur, prev)
    pipeline.add_row(
        f"{p.events_in:.0f} ({p.events_rate})",
        f"{p.commands_out:.0f} ({p.commands_rate})",
        f"{p.dead_lettered:.0f}",
        str(cur.lag.get(settings.group_id("mapper"), "-")),
    )
    sinks = Table(title="sinks per region", expand=True)
    for col in ("region", "sink", "state", "applied", "rate", "lag", "purge p50", "purge p99"):
        sinks.add_column(col)
    blocked = blocked_sinks(cur)
    unknown = "-" if cur.metrics_error or not cur.samples else "ok"
    for f in sink_figures(settings, cur, prev):
        sinks.add_row(
            f.region,
            f.sink,
            f"[bold red]BLOCKED: {', '.join(f.blocked)}[/bold red]" if f.blocked else unknown,
            f"{f.applied:.0f}",
            f.rate,
            str(cur.lag.get(settings.group_id("sink", f.region, f.sink), "-")),
            _latency(cur, prev, f.region, f.sink, 0.5),
            _latency(cur, prev, f.region, f.sink, 0.99),
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
    parts.append(hit_ratio_table(cur.tiers, prev.tiers if prev else None))
    if cur.replication:
        parts.append(replication_table(cur.replication))
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
