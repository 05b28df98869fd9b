"""One trace per invalidation end to end; /metrics carries every family; `trace` reads the audit topic."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.ops.trace import read_trace
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.consumers.telemetry import inject_context
from cachesync.topology.admin import apply_topics
from tests.helpers import eventually


async def _traced_photo(settings: Settings, wedding: str) -> tuple[str, int]:
    """Publish a photo.uploaded inside a 'platform' span; return the event id and trace id."""
    event = new_event(
        "photo.uploaded",
        wedding_id=wedding,
        photo_id=f"ph-{uuid.uuid4().hex[:6]}",
        album_id=None,
        path=f"/weddings/{wedding}/photos/x.jpg",
        content_type="image/jpeg",
        size_bytes=1,
    )
    tracer = trace.get_tracer("platform")
    pub = EventPublisher(settings)
    await pub.start()
    try:
        with tracer.start_as_current_span("platform upload", kind=SpanKind.PRODUCER) as span:
            headers: list[tuple[str, bytes]] = []
            inject_context(headers)
            await pub.publish("photo.uploaded", event, headers=headers)
            trace_id = span.get_span_context().trace_id
    finally:
        await pub.stop()
    return event["event_id"], trace_id


async def test_one_trace_from_event_to_every_regions_redis(
    settings: Settings,
    topics: list[str],
    region_redis: dict[str, Redis],
    run_roles_bg,
    telemetry: Any,
) -> None:
    wedding = f"w-{uuid.uuid4().hex[:8]}"
    # Topics and groups of its own: a command another test left in the session's topics
    # would share the flush, and the flush span has one parent.
    run = uuid.uuid4().hex[:8]
    settings = settings.model_copy(
        update={
            "group_prefix": f"{settings.group_prefix}-trace-{run}",
            "topic_prefix": f"{settings.topic_prefix}trace-{run}.",
        }
    )
    await apply_topics(settings.kafka_bootstrap_servers, settings.topology, settings.topic_prefix)
    for redis in region_redis.values():
        await cache_put(redis, f"wedding:{wedding}:gallery", b"stale")
    sinks = [SinkRole(settings, RedisSink(r, u)) for r, u in settings.region_redis_urls.items()]
    await run_roles_bg([MapperRole(settings), *sinks])
    _, trace_id = await _traced_photo(settings, wedding)

    exporter = telemetry.span_exporter

    def spans() -> list[Any]:
        return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]

    async def complete() -> bool:
        applied = [s for s in spans() if s.name == "cachesync.apply redis"]
        return len({s.attributes["cachesync.region"] for s in applied}) == 3

    await eventually(complete, what="apply spans of all three regions in the event's trace")
    mine = spans()
    by_id = {s.context.span_id: s for s in mine}
    names = [s.name for s in mine]
    assert names.count("cachesync.map") == 1
    mapper = next(s for s in mine if s.name == "cachesync.map")
    assert mapper.attributes["cachesync.event_type"] == "photo.uploaded"
    for region in settings.topology.regions:
        apply = next(
            s
            for s in mine
            if s.name == "cachesync.apply redis" and s.attributes["cachesync.region"] == region
        )
        # apply <- (kafka send span) <- map: walk up to the mapper within the trace.
        node = apply
        while node.parent is not None and node.parent.span_id in by_id and node is not mapper:
            node = by_id[node.parent.span_id]
        assert node is mapper, f"{region}: apply span does not descend from the map span"
        flush = next(
            s
            for s in mine
            if s.name == "cachesync.flush redis" and s.parent.span_id == apply.context.span_id
        )
        redis_calls = [
            s for s in mine if s.parent is not None and s.parent.span_id == flush.context.span_id
        ]
        assert redis_calls, f"{region}: no Redis client span under the flush"
        assert all(s.kind == SpanKind.CLIENT for s in redis_calls)


async def test_untraced_event_starts_a_new_trace_and_trace_cli_reads_the_path(
    settings: Settings, topics: list[str], run_roles_bg, telemetry: Any
) -> None:
    sinks = [SinkRole(settings, RedisSink(r, u)) for r, u in settings.region_redis_urls.items()]
    await run_roles_bg([MapperRole(settings), *sinks])
    wedding = f"w-{uuid.uuid4().hex[:8]}"
    event = new_event(
        "wedding.updated",
        wedding_id=wedding,
        destination_country="IT",
        guest_countries=["JP"],
        changed_fields=["schedule"],
    )
    pub = EventPublisher(settings)
    await pub.start()
    try:
        await pub.publish("wedding.updated", event)
    finally:
        await pub.stop()

    async def all_applied() -> bool:
        view = await read_trace(settings, event["event_id"])
        purges = [c for c in view.commands.values() if c.kind == "purge"]
        return len(purges) == 3 and all("redis" in c.sinks for c in purges)

    await eventually(all_applied, what="audit records for the three regions' purges")
    view = await read_trace(settings, event["event_id"])
    assert view.mapper is not None and view.event_type == "wedding.updated"
    assert len(view.trace_ids) == 1, "mapper and sinks should share the new trace"
    warms = sorted(c.region for c in view.commands.values() if c.kind == "warm")
    assert warms == ["ap-southeast", "eu-west"], "warms go to the wedding's regions only"
    pending = view.pending(lambda region, kind: ["redis"] if kind == "purge" else ["warmer"])
    assert sorted(p[0] for p in pending) == ["ap-southeast", "eu-west"], (
        "no warmer ran: its warms are pending"
    )
    unknown = await read_trace(settings, "no-such-event")
    assert unknown.event_type is None


async def test_metrics_endpoint_exports_the_pipeline_families(
    settings: Settings,
    topics: list[str],
    region_redis: dict[str, Redis],
    run_roles_bg,
    telemetry: Any,
) -> None:
    sinks = [SinkRole(settings, RedisSink(r, u)) for r, u in settings.region_redis_urls.items()]
    mapper = MapperRole(settings)
    await run_roles_bg([mapper, *sinks])
    wedding = f"w-{uuid.uuid4().hex[:8]}"
    for redis in region_redis.values():
        await cache_put(redis, f"wedding:{wedding}:gallery", b"stale")
    await _traced_photo(settings, wedding)
    pub = EventPublisher(settings)
    await pub.start()
    try:
        await pub.publish_raw(pub.topic_for("photo.uploaded"), b"not avro")
    finally:
        await pub.stop()

    async def purged() -> bool:
        return all(
            [not await r.exists(f"wedding:{wedding}:gallery") for r in region_redis.values()]
        )

    await eventually(purged, what="purge applied")
    await eventually(lambda: _has(telemetry, "cachesync_dead_lettered"), what="dead letter counted")
    families = await _scrape(telemetry)
    values = {name: samples for name, samples in families.items()}
    assert _total(values, "cachesync_events_in", event_type="photo.uploaded") >= 1
    assert _total(values, "cachesync_commands_out", kind="purge") >= 3
    assert _total(values, "cachesync_dead_lettered", reason="undecodable") >= 1
    assert _total(values, "cachesync_redis_keys_deleted") >= 3
    assert _total(values, "cachesync_commands_applied", sink="redis") >= 3
    latency = [
        s for s in values["cachesync_purge_latency_milliseconds"] if s.name.endswith("_count")
    ]
    assert sum(s.value for s in latency) >= 3
    lag = values["cachesync_consumer_lag"]
    assert lag and all(s.value >= 0 for s in lag)
    assert {s.labels["group"] for s in lag} >= {settings.group_id("mapper")}


async def _scrape(telemetry: Any) -> dict[str, list[Any]]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{telemetry.metrics_port}/metrics")).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def _has(telemetry: Any, family: str) -> bool:
    return family in await _scrape(telemetry)


def _total(values: dict[str, list[Any]], family: str, **labels: str) -> float:
    samples = values.get(family, [])
    return sum(
        s.value
        for s in samples
        if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created")
    )


async def test_exported_names_match_the_declared_families(telemetry: Any) -> None:
    """What /metrics really serves is what `prometheus_families` (and so the dashboard test) assumes."""
    from cachesync.consumers.telemetry import prometheus_families

    declared = prometheus_families()
    served = [name for name in await _scrape(telemetry) if name.startswith("cachesync_")]
    assert served, "nothing exported yet"
    assert [n for n in served if n not in declared] == []
