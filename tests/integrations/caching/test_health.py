"""/healthz and /readyz of `cachesync run`, healthy and not, and the SIGTERM drain, on the real stack.

The sinks run as `cachesync run sink` processes, as Kubernetes runs them; eu-west's
Redis is a redis-server of the test's own (stopped, frozen and started again here),
never the shared stack's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from cachesync.consumers.commands import PurgeCommand, command_id
from cachesync.consumers.health import health
from cachesync.consumers.pipeline.assemble import watch_health
from cachesync.consumers.pipeline.kafka import partitions_of
from cachesync.consumers.pipeline.roles import SinkRole
from cachesync.consumers.settings import Settings, region_env_var
from cachesync.consumers.sinks.redis import RedisSink
from deploy.local.standins.serve import free_port
from tests.helpers import eventually
from tests.integrations.caching.crashes import own_topics, send_commands
from tests.integrations.caching.test_regions import RegionRedis

EU, US = "eu-west", "us-east"
CACHESYNC = str(Path(sys.executable).with_name("cachesync"))


class RunningSink:
    """`cachesync run sink --region R --sink redis` in its own process, and its endpoints."""

    def __init__(self, settings: Settings, region: str, log: Path, **env: str) -> None:
        self.region = region
        self.port = free_port()
        self.log = log
        self.name = f"sink.{region}.redis"
        self.env = {
            **os.environ,
            "CACHESYNC_TOPIC_PREFIX": settings.topic_prefix,
            "CACHESYNC_GROUP_PREFIX": settings.group_prefix,
            "CACHESYNC_METRICS_HOST": "127.0.0.1",
            "CACHESYNC_METRICS_PORT": str(self.port),
            "TERM": "dumb",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [CACHESYNC, "run", "sink", "--region", self.region, "--sink", "redis"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"http://127.0.0.1:{self.port}{path}")
        return response.status_code, response.json()

    async def answers(self, path: str, status: int) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.output()}")
        try:
            return (await self.get(path))[0] == status
        except httpx.TransportError:
            return False

    async def ready(self) -> None:
        await eventually(lambda: self.answers("/readyz", 200), within=60, what=f"{self.name} ready")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def eu_redis(tmp_path: Path) -> Iterator[RegionRedis]:
    """eu-west's Redis: a redis-server of this test's own, which it may stop and freeze."""
    server = RegionRedis(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)
        server.kill()


@pytest.fixture
async def sinks(tmp_path: Path) -> AsyncIterator[list[RunningSink]]:
    """The sink processes a test starts; killed at teardown if still running."""
    started: list[RunningSink] = []
    yield started
    for sink in started:
        sink.stop()


def purge(run: str, i: int, region: str, key: str) -> PurgeCommand:
    """A purge of one Redis key, issued long ago (0) so that no tier waits for it."""
    event = f"ev-{run}-{i}"
    return PurgeCommand(
        command_id=command_id(event, region, "purge"),
        origin_event_id=event,
        origin_event_type="photo.updated",
        origin_occurred_at=0,
        region=region,
        entity=f"wedding:w-{run}-{i}",
        version=1,
        issued_at=0,
        scope="photo",
        keys=(key,),
    )


async def committed(settings: Settings, group: str, topic: str) -> int:
    """Offsets `group` has committed on `topic`, summed over its partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


async def end_offsets(settings: Settings, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        partitions = await partitions_of(settings.kafka_bootstrap_servers, [topic])
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return sum(ends.values())


async def exits(proc: subprocess.Popen[bytes], within: float) -> tuple[int, float]:
    """Wait for `proc` to exit: its code and how long it took."""
    t0 = time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - t0 > within:
            raise AssertionError(f"still running {within}s after SIGTERM")
        await asyncio.sleep(0.05)
    return proc.returncode, time.monotonic() - t0


async def test_a_stopped_redis_fails_readyz_for_its_regions_redis_sink_only(
    settings: Settings, eu_redis: RegionRedis, sinks: list[RunningSink], tmp_path: Path
) -> None:
    """eu-west's Redis stopped: eu-west's Redis sink is not ready (and still alive), us-east's
    is ready; eu-west's is ready again once its Redis is back, and SIGTERM drains and
    commits what it applied."""
    own = await own_topics(settings, "health")
    eu = RunningSink(own, EU, tmp_path / "eu.log", **{region_env_var(EU): eu_redis.url})
    us = RunningSink(own, US, tmp_path / "us.log")
    sinks += [eu, us]
    for sink in sinks:
        sink.start()
    for sink in sinks:
        await sink.ready()
    status, body = await eu.get("/readyz")
    assert (status, body["checks"]) == (200, {eu.name: "ok"})
    assert (await eu.get("/healthz"))[0] == 200

    eu_redis.kill()
    await eventually(lambda: eu.answers("/readyz", 503), within=15, what="eu-west not ready")
    status, body = await eu.get("/readyz")
    assert status == 503 and body["status"] == "fail"
    assert "redis eu-west: ping failed" in body["checks"][eu.name], body
    assert await us.answers("/readyz", 200), (
        "us-east's Redis sink does not depend on eu-west's Redis"
    )
    assert await eu.answers("/healthz", 200), "the loop still polls: alive, only not ready"

    eu_redis.start()  # the same port: the sink's client reconnects
    await eventually(lambda: eu.answers("/readyz", 200), within=15, what="eu-west ready again")

    # Applied commands are committed by the drain that SIGTERM starts.
    run = uuid.uuid4().hex[:6]
    client = Redis.from_url(eu_redis.url)
    try:
        await client.set(f"health:{run}:0", b"stale")
        await send_commands(own, [purge(run, 0, EU, f"health:{run}:0")])

        async def purged() -> bool:
            return not await client.exists(f"health:{run}:0")

        await eventually(purged, what="the purge applied in eu-west's Redis")
    finally:
        await client.aclose()
    topic = own.commands_topic(EU)
    assert eu.proc is not None
    eu.proc.send_signal(signal.SIGTERM)
    code, took = await exits(eu.proc, within=own.shutdown_grace_s + 5)
    assert code == 0, eu.output()
    assert took < own.shutdown_grace_s, "an idle sink drains well within its grace period"
    assert await committed(own, own.group_id("sink", EU, "redis"), topic) == await end_offsets(
        own, topic
    )
    assert "stopped cleanly" in eu.output()


async def test_a_stalled_loop_fails_healthz_and_sigterm_gives_up_after_the_grace_period(
    settings: Settings, eu_redis: RegionRedis, sinks: list[RunningSink], tmp_path: Path
) -> None:
    """A frozen Redis holds the sink's flush (its client waits 5 s): with a 1 s liveness limit
    /healthz fails while the loop does not poll, and recovers once Redis thaws. Frozen
    again, a SIGTERM ends the process after its 2 s grace period, well before the
    flush would, without committing the batch it did not finish."""
    own = await own_topics(settings, "stall")
    eu = RunningSink(
        own,
        EU,
        tmp_path / "eu.log",
        **{
            region_env_var(EU): eu_redis.url,
            "CACHESYNC_LIVENESS_TIMEOUT_S": "1",
            "CACHESYNC_SHUTDOWN_GRACE_S": "2",
        },
    )
    sinks.append(eu)
    eu.start()
    await eu.ready()
    # (Joining the group can hold the first poll past this test's 1 s limit.)
    await eventually(lambda: eu.answers("/healthz", 200), within=10, what="alive once polling")
    assert eu_redis.proc is not None
    run = uuid.uuid4().hex[:6]
    client = Redis.from_url(eu_redis.url)
    topic = own.commands_topic(EU)
    group = own.group_id("sink", EU, "redis")
    try:
        await client.set(f"stall:{run}:0", b"stale")

        eu_redis.proc.send_signal(signal.SIGSTOP)
        await send_commands(own, [purge(run, 0, EU, f"stall:{run}:0")])
        await eventually(lambda: eu.answers("/healthz", 503), within=20, what="healthz fails")
        status, body = await eu.get("/healthz")
        assert status == 503 and "no poll for" in body["checks"][eu.name], body
        eu_redis.proc.send_signal(signal.SIGCONT)

        async def purged(key: str) -> bool:
            return not await client.exists(key)

        await eventually(lambda: purged(f"stall:{run}:0"), within=30, what="applied after thaw")
        await eventually(lambda: eu.answers("/healthz", 200), within=10, what="healthz recovers")
        await eventually(
            lambda: _committed_all(own, group, topic), within=10, what="first purge committed"
        )
        before = await committed(own, group, topic)

        eu_redis.proc.send_signal(signal.SIGSTOP)
        await send_commands(own, [purge(run, 1, EU, f"stall:{run}:1")])
        await eventually(lambda: eu.answers("/healthz", 503), within=20, what="flush in flight")
        assert eu.proc is not None
        eu.proc.send_signal(signal.SIGTERM)
        code, took = await exits(eu.proc, within=10)
        eu_redis.proc.send_signal(signal.SIGCONT)
        assert code != 0, "aborted by the grace period, not a clean stop"
        assert took < 4.5, f"took {took:.1f}s: the grace period (2 s) did not cut the 5 s flush"
        assert "grace" in eu.output(), eu.output()
        # (The thawed Redis may still run the script the aborted flush had sent: applied,
        # not committed, and skipped by its applied offset when re-read: at-least-once.)
        assert await committed(own, group, topic) == before, "an unfinished batch was committed"
    finally:
        eu_redis.proc.send_signal(signal.SIGCONT)
        await client.aclose()


async def _committed_all(settings: Settings, group: str, topic: str) -> bool:
    return await committed(settings, group, topic) == await end_offsets(settings, topic)


async def test_readyz_waits_for_partitions_and_says_stopping_while_draining(
    settings: Settings, telemetry: Any, run_roles_bg: Any
) -> None:
    """In one process: not ready before the group gave the loop partitions, ready with them
    and a Redis that answers, not ready again once the drain has begun."""
    own = await own_topics(settings, "readyz")
    role = SinkRole(own, RedisSink(US, own.region_redis_urls[US]))
    stop = asyncio.Event()
    url = f"http://127.0.0.1:{telemetry.metrics_port}/readyz"
    async with httpx.AsyncClient(timeout=5) as client:
        watch_health([role], stop, liveness_timeout_s=60)
        try:
            response = await client.get(url)
            assert response.status_code == 503
            assert response.json()["checks"][role.name] == "no partitions assigned"
            running = await run_roles_bg([role])
            response = await client.get(url)
            assert (response.status_code, response.json()["checks"][role.name]) == (200, "ok")
            stop.set()
            response = await client.get(url)
            assert response.status_code == 503
            assert response.json()["checks"][role.name].startswith("stopping")
            healthz = await client.get(url.replace("/readyz", "/healthz"))
            assert healthz.status_code == 200, "draining is not dying"
            running.set()
        finally:
            health.unregister([role.name])
