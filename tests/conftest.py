"""Fixtures for the real services.

Each service comes, in this order, from an address in the environment
(`KAFKA_BOOTSTRAP_SERVERS`, `REDIS_URL_<REGION>`, `CACHESYNC_STATE_REDIS_URL`),
else from testcontainers where a Docker engine answers a ping, else from the
local stack that `deploy/local/up.sh` starts (idempotently). A missing service is
an error, never a silent skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from cachesync.consumers.settings import Settings, load_settings, region_env_var
from cachesync.topology import load_topology

REPO = Path(__file__).resolve().parent.parent
REGIONS = list(load_topology().regions)


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def services() -> Iterator[dict[str, str]]:
    """Addresses of Kafka, the regions' Redis servers and the state Redis."""
    env_vars = ["KAFKA_BOOTSTRAP_SERVERS", "CACHESYNC_STATE_REDIS_URL"] + [
        region_env_var(r) for r in REGIONS
    ]
    if all(os.environ.get(v) for v in env_vars):
        yield {v: os.environ[v] for v in env_vars}
        return
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and _docker_answers():
        yield from _containers(env_vars)
        return
    proc = subprocess.run(
        ["bash", str(REPO / "deploy/local/up.sh")], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"deploy/local/up.sh failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    ports = {
        "us-east": os.environ.get("REDIS_PORT_US_EAST", "16379"),
        "eu-west": os.environ.get("REDIS_PORT_EU_WEST", "16380"),
        "ap-southeast": os.environ.get("REDIS_PORT_AP_SOUTHEAST", "16381"),
    }
    found = {
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{os.environ.get('KAFKA_PORT', '19092')}",
        "CACHESYNC_STATE_REDIS_URL": f"redis://127.0.0.1:{os.environ.get('REDIS_PORT_STATE', '16382')}/0",
        **{region_env_var(r): f"redis://127.0.0.1:{ports[r]}/0" for r in REGIONS if r in ports},
    }
    found.update({v: os.environ[v] for v in env_vars if os.environ.get(v)})
    yield found


def _containers(env_vars: list[str]) -> Iterator[dict[str, str]]:
    from testcontainers.kafka import KafkaContainer  # type: ignore[import-untyped]
    from testcontainers.redis import RedisContainer  # type: ignore[import-untyped]

    with contextlib.ExitStack() as stack:
        kafka = stack.enter_context(KafkaContainer().with_kraft())
        found = {"KAFKA_BOOTSTRAP_SERVERS": kafka.get_bootstrap_server()}
        for var in env_vars[1:]:
            redis = stack.enter_context(RedisContainer())
            found[var] = f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0"
        yield found


@pytest.fixture(scope="session")
def settings(services: dict[str, str]) -> Iterator[Settings]:
    """Settings for this test session: its own topic and group prefix on the shared cluster."""
    saved = {k: os.environ.get(k) for k in services}
    os.environ.update(services)
    run = uuid.uuid4().hex[:8]
    try:
        yield load_settings(topic_prefix=f"test-{run}.", group_prefix=f"test-{run}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
async def topics(settings: Settings) -> AsyncIterator[list[str]]:
    """The session's topics; at its end, every topic under its prefix is deleted (the tests'
    own prefixes are under it too), so repeated runs do not pile topics on the local broker
    (1,118 had accumulated)."""
    from cachesync.topology.admin import apply_topics, delete_topics

    changes = await apply_topics(
        settings.kafka_bootstrap_servers, settings.topology, settings.topic_prefix
    )
    yield [c.topic for c in changes]
    await delete_topics(settings.kafka_bootstrap_servers, settings.topic_prefix)


@pytest.fixture
async def region_redis(settings: Settings) -> AsyncIterator[dict[str, Redis]]:
    clients = {r: Redis.from_url(u) for r, u in settings.region_redis_urls.items()}
    yield clients
    for client in clients.values():
        await client.aclose()


@pytest.fixture
async def run_roles_bg() -> AsyncIterator[Callable[[list[Any]], Awaitable[asyncio.Event]]]:
    """Start roles in the background; they are stopped (and drained) at teardown."""
    from cachesync.consumers.pipeline.roles import run_roles

    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(roles: list[Any]) -> asyncio.Event:
        stop = asyncio.Event()
        task = asyncio.create_task(run_roles(roles, stop))
        running.append((stop, task))
        # Wait until each consumer has its partitions, so nothing races the test's produce.
        for _ in range(200):
            if task.done():
                task.result()
            if all(r.consumer.assignment() for r in roles):
                # Resolve start positions now, so a "latest" consumer cannot miss what follows.
                for r in roles:
                    for tp in r.consumer.assignment():
                        await r.consumer.position(tp)
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("roles did not get partitions within 10 s")
        return stop

    yield start
    for stop, _task in running:
        stop.set()
    for _, task in running:
        await asyncio.wait_for(task, timeout=30)


@pytest.fixture(scope="session", autouse=True)
def telemetry() -> Iterator[Any]:
    """Tracing and metrics as `cachesync run` sets them up, with in-memory exporters and /metrics."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from cachesync.consumers.telemetry import setup_telemetry
    from deploy.local.standins.serve import free_port

    handle = setup_telemetry(
        "cachesync-tests",
        metrics_port=free_port(),
        span_exporter=InMemorySpanExporter(),
        metric_readers=[InMemoryMetricReader()],
    )
    yield handle
    handle.shutdown()


@pytest.fixture(scope="session")
def metric_reader(telemetry: Any) -> Any:
    """The in-memory metric reader on the global meter provider."""
    return telemetry.metric_readers[0]


def metric_points(reader: Any, name: str) -> list[Any]:
    """Every data point of the metric `name` the reader has collected so far."""
    data = reader.get_metrics_data()
    points: list[Any] = []
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    points.extend(metric.data.data_points)
    return points
