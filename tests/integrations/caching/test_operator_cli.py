"""The operator's first day on the real stack: Ctrl-C through a pipe whose reader left, finding
an event and following it (dead-lettered ones included), publishing a hand-written event,
the demo's count, and `status` agreeing with `run`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from opentelemetry import trace
from rich.console import Console
from typer.testing import CliRunner

from cachesync.consumers import telemetry as instruments
from cachesync.consumers.cli.app import app
from cachesync.consumers.ops.demo import DemoStats, run_demo
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.ops.status import collect, local_snapshot, render, run_lines, sink_figures
from cachesync.consumers.ops.trace import find_events, read_trace
from cachesync.consumers.pipeline.codecs import codec_for
from cachesync.consumers.pipeline.kafka import partitions_of
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.consumers.telemetry import extract_context
from tests.helpers import eventually

pytestmark = pytest.mark.integration

CACHESYNC = str(Path(sys.executable).with_name("cachesync"))


def _env(settings: Settings) -> dict[str, str]:
    """A child process's environment: this session's topics and groups, no /metrics."""
    return {
        **os.environ,
        "CACHESYNC_TOPIC_PREFIX": settings.topic_prefix,
        "CACHESYNC_GROUP_PREFIX": settings.group_prefix,
        "CACHESYNC_METRICS_PORT": "0",
        "COLUMNS": "300",
    }


async def _ends(settings: Settings, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        parts = await partitions_of(settings.kafka_bootstrap_servers, topics)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(parts)
        return ends
    finally:
        await consumer.stop()


async def _read(
    settings: Settings, start: dict[TopicPartition, int], end: dict[TopicPartition, int]
) -> list[Any]:
    """The records between two sets of end offsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        parts = [tp for tp in end if end[tp] > start.get(tp, 0)]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, start.get(tp, 0))
        records: list[Any] = []
        while len(records) < _sent(start, end):
            for tp, batch in (await consumer.getmany(timeout_ms=1000)).items():
                records += [r for r in batch if r.offset < end[tp]]
        return records
    finally:
        await consumer.stop()


def _sent(before: dict[TopicPartition, int], after: dict[TopicPartition, int]) -> int:
    return sum(after[tp] - before.get(tp, 0) for tp in after)


# -- item 1 ---------------------------------------------------------------------------------
def test_ctrl_c_stops_and_drains_after_the_pipes_reader_exited(
    settings: Settings, topics: list[str]
) -> None:
    """`cachesync run mapper 2>&1 | tee`, tee gone, then Ctrl-C: the run drains and exits 0."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [CACHESYNC, "run", "mapper"], stdout=write_end, stderr=write_end, env=_env(settings)
    )
    os.close(write_end)  # the child holds the only writer now
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"running" not in seen:
            assert time.monotonic() < deadline, seen
            chunk = os.read(read_end, 4096)
            assert chunk, f"the run ended before it started: {seen!r}"
            seen += chunk
        os.close(read_end)  # the reader exits
        read_end = -1
        time.sleep(4.5)  # two progress reports meet the broken pipe
        assert proc.poll() is None, "the run died when its output went away"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=40)
        assert code == 0, "the run did not stop cleanly (drained) after Ctrl-C"
    finally:
        if read_end >= 0:
            os.close(read_end)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- item 2 ---------------------------------------------------------------------------------
async def test_trace_lists_an_entitys_events_with_ids_types_and_outcomes(
    settings: Settings, topics: list[str], run_roles_bg: object
) -> None:
    """Events about one wedding, found by its id: mapped ones with their sink steps, and a
    dead-lettered one with why; `trace ID` of that one says dead-lettered, not "no record"."""
    region = next(iter(settings.topology.regions))
    wedding = f"w-trace-{uuid.uuid4().hex[:8]}"
    since = int(time.time() * 1000) - 1000
    roles = [
        MapperRole(settings),
        SinkRole(settings, RedisSink.from_settings(settings, region)),
    ]
    await run_roles_bg(roles)  # type: ignore[operator]
    published = [
        new_event(
            "photo.uploaded",
            wedding_id=wedding,
            photo_id=f"p-{i}",
            album_id=None,
            path=f"/weddings/{wedding}/photos/p-{i}.jpg",
            content_type="image/jpeg",
            size_bytes=1000,
        )
        for i in range(3)
    ]
    bad = new_event(  # the field checks refuse a relative path: dead-lettered
        "photo.deleted", wedding_id=wedding, photo_id="p-0", album_id=None, path="relative.jpg"
    )
    other = new_event(
        "wedding.updated",
        wedding_id="w-someone-else",
        destination_country="IT",
        guest_countries=["US"],
        changed_fields=["schedule"],
    )
    publisher = EventPublisher(settings)
    await publisher.start()
    try:
        for event_type, record in [
            *(("photo.uploaded", r) for r in published),
            ("photo.deleted", bad),
            ("wedding.updated", other),
        ]:
            await publisher.publish(event_type, record)
    finally:
        await publisher.stop()

    async def all_done() -> bool:
        found = await find_events(settings, wedding=wedding, since_ms=since)
        return len(found) == 4 and all(e.dead_letters or e.reports["applied"] for e in found)

    await eventually(all_done, within=60, what="the wedding's events mapped and applied")
    found = await find_events(settings, wedding=wedding, since_ms=since)
    assert [(e.event_id, e.event_type) for e in found] == [
        *((r["event_id"], "photo.uploaded") for r in published),
        (bad["event_id"], "photo.deleted"),
    ]
    regions = len(settings.topology.regions)
    for event in found[:3]:
        # A purge per region; only this region's Redis sink runs, so 1 of the steps is done.
        assert re.fullmatch(
            rf"mapped: {regions} purge \+ \d+ warm commands, 1/{event.expected_reports} sink steps",
            event.outcome,
        ), event.outcome
    assert found[3].outcome.startswith("dead-lettered (invalid_record)"), found[3].outcome
    assert "path='relative.jpg' must start with /" in found[3].outcome

    view = await read_trace(settings, bad["event_id"], since_ms=since)
    assert view.mapper is None and [d.reason for d in view.dead_letters] == ["invalid_record"]
    env = {"CACHESYNC_TOPIC_PREFIX": settings.topic_prefix, "COLUMNS": "300"}
    shown = await asyncio.to_thread(CliRunner().invoke, app, ["trace", bad["event_id"]], env=env)
    assert shown.exit_code == 0, shown.output
    assert "dead-lettered" in shown.output and "invalid_record" in shown.output
    assert "no audit record" not in shown.output
    listed = await asyncio.to_thread(
        CliRunner().invoke, app, ["trace", "--wedding", wedding, "--since", "10m"], env=env
    )
    assert listed.exit_code == 0, listed.output
    for record in [*published, bad]:
        assert record["event_id"] in listed.output
    assert other["event_id"] not in listed.output


# -- item 3 ---------------------------------------------------------------------------------
async def test_publish_sends_one_checked_event_keyed_by_its_entity(
    settings: Settings, topics: list[str]
) -> None:
    """--dry-run sends nothing; a real publish puts exactly the filled event on its topic."""
    wedding = f"w-pub-{uuid.uuid4().hex[:8]}"
    fields = {
        "wedding_id": wedding,
        "photo_id": "p-1",
        "path": f"/weddings/{wedding}/photos/p-1.jpg",
        "content_type": "image/jpeg",
        "size_bytes": 10,
    }
    env = {"CACHESYNC_TOPIC_PREFIX": settings.topic_prefix, "COLUMNS": "300"}
    photos = settings.topic("content.photos")
    before = await _ends(settings, [photos])
    dry = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["publish", "photo.uploaded", "--json", json.dumps(fields), "--dry-run"],
        env=env,
    )
    assert dry.exit_code == 0, dry.output
    assert await _ends(settings, [photos]) == before, "a dry run sent"
    sent = await asyncio.to_thread(
        CliRunner().invoke, app, ["publish", "photo.uploaded"], input=json.dumps(fields), env=env
    )
    assert sent.exit_code == 0, sent.output
    after = await _ends(settings, [photos])
    assert _sent(before, after) == 1
    (tp,) = [tp for tp in after if after[tp] != before.get(tp, 0)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, before.get(tp, 0))
        record = (await consumer.getmany(tp, timeout_ms=5000))[tp][0]
    finally:
        await consumer.stop()
    decoded = codec_for(settings).decode(record.value or b"")
    assert record.key == wedding.encode()
    assert decoded.type_name == "photo.uploaded"
    assert decoded.record["wedding_id"] == wedding
    assert decoded.record["event_id"] in sent.output
    assert f"cachesync trace {decoded.record['event_id']}" in sent.output


# -- item 6 ---------------------------------------------------------------------------------
async def test_the_demo_limit_counts_every_event_it_produces(
    settings: Settings, topics: list[str]
) -> None:
    """--count 40 is 40 records on the content topics, the opening ones included."""
    before = await _ends(settings, settings.content_topics)
    stats = DemoStats()
    await run_demo(settings, asyncio.Event(), rate=200, weddings=20, limit=40, seed=7, stats=stats)
    after = await _ends(settings, settings.content_topics)
    assert _sent(before, after) == 40 == stats.produced
    # Twenty weddings open with more than 40 events: the limit cut the opening short.
    assert stats.traffic == 0
    more = DemoStats()
    await run_demo(
        settings, asyncio.Event(), rate=50, weddings=2, limit=30, seed=7, stats=more, sampled=0.5
    )
    end = await _ends(settings, settings.content_topics)
    assert _sent(after, end) == 30
    assert more.traffic > 0 and more.achieved_rate is not None
    # Each event starts a trace whose sampling the platform decided, at about the share
    # asked (the seed fixes the draw; any share but 0 and 1 would pass this bound).
    flags = [
        trace.get_current_span(extract_context(r.headers)).get_span_context().trace_flags
        for r in await _read(settings, after, end)
    ]
    assert len(flags) == 30
    assert 5 <= sum(f.sampled for f in flags) <= 25


# -- item 7 ---------------------------------------------------------------------------------
async def test_status_and_run_show_the_same_figures_warmer_included(
    settings: Settings, topics: list[str], telemetry: object
) -> None:
    """`run`'s lines (this process's metrics) and `status` (its /metrics over HTTP) agree."""
    region = next(iter(settings.topology.regions))
    instruments.commands_applied.add(3, {"region": region, "sink": "warmer", "outcome": "applied"})
    port = telemetry.metrics_port  # type: ignore[attr-defined]
    served = await collect(settings, f"http://127.0.0.1:{port}/metrics")
    own = local_snapshot()
    by_sink = {(f.region, f.sink): f.applied for f in sink_figures(settings, own, None)}
    assert by_sink == {(f.region, f.sink): f.applied for f in sink_figures(settings, served, None)}
    assert by_sink[(region, "warmer")] >= 3
    for other in settings.topology.regions:
        assert (other, "warmer") in by_sink, "a configured warmer missing from the view"
    line = next(line for line in run_lines(settings, own, None) if f"[bold]{region}[/bold]" in line)
    assert f"warmer {by_sink[(region, 'warmer')]:.0f}" in line
    console = Console(width=300, record=True)
    console.print(render(settings, served, None))
    table = console.export_text()
    row = next(r for r in table.splitlines() if f" {region} " in r and " warmer " in r)
    assert f" {by_sink[(region, 'warmer')]:.0f} " in row
