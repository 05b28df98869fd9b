"""What the harness and its worker processes share: stack addresses, settings, the event mix."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import typer
from aiokafka import AIOKafkaProducer

from cachesync.consumers import telemetry
from cachesync.consumers.ops.demo import DemoWorld
from cachesync.consumers.ops.publish import event_key
from cachesync.consumers.pipeline.codecs import codec_for
from cachesync.consumers.pipeline.kafka import make_producer
from cachesync.consumers.settings import Settings, load_settings, region_env_var
from cachesync.schemas import Codec

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

# The demo's ids (w-0001, v-0002, ph-000003, a-0004-1) get a per-run tag, so a run's
# relationship index and cache entries never meet another run's (or the demo's).
_ID = re.compile(r"\b(w|v|ph|a)-(\d+)")

# Every message the bench produces carries the platform's W3C trace context, sampled for
# one in PLATFORM_SAMPLED_EVERY, as a platform tracing at these rates would: the pipeline
# follows that decision (parent-based), so it makes per-event spans only for those. Without
# a context every event would start a root trace, sampled by the default always-on
# sampler: a span per event per stage, which no deployment at 1,000 events/s runs with.
PLATFORM_SAMPLED_EVERY = 100
_TRACE_SEQ = itertools.count()
_TRACE_IDS = random.SystemRandom()


def platform_trace() -> list[tuple[str, bytes]]:
    """The headers of the platform's next traced message (a fresh trace id each)."""
    return telemetry.new_trace_headers(
        _TRACE_IDS, sampled=next(_TRACE_SEQ) % PLATFORM_SAMPLED_EVERY == 0
    )


def one_command_app() -> typer.Typer:
    """The Typer app of one benchmark script, as the product's CLI is built on Typer.

    Plain tracebacks: a worker's stderr is its log, read back by the harness.
    """
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def first_line(doc: str | None) -> str:
    """A module docstring's summary line, as a script's --help."""
    return (doc or "").partition("\n")[0]


def stack_env() -> None:
    """Addresses of the local stack (started idempotently) unless the environment has them."""
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        subprocess.run(["bash", str(REPO / "deploy/local/up.sh")], check=True, capture_output=True)
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{os.environ.get('KAFKA_PORT', '19092')}"
    ports = {
        "us-east": os.environ.get("REDIS_PORT_US_EAST", "16379"),
        "eu-west": os.environ.get("REDIS_PORT_EU_WEST", "16380"),
        "ap-southeast": os.environ.get("REDIS_PORT_AP_SOUTHEAST", "16381"),
    }
    for region, port in ports.items():
        os.environ.setdefault(region_env_var(region), f"redis://127.0.0.1:{port}/0")
    state_port = os.environ.get("REDIS_PORT_STATE", "16382")
    os.environ.setdefault("CACHESYNC_STATE_REDIS_URL", f"redis://127.0.0.1:{state_port}/0")


def read_env_file(path: Path) -> dict[str, str]:
    """The KEY=value lines of a file the stack writes (such as .stack/cdn.env)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def bench_settings(prefix: str) -> Settings:
    """Settings whose topics and consumer groups belong to this bench scenario only."""
    return load_settings(topic_prefix=f"{prefix}.", group_prefix=prefix)


def tagged(value: Any, tag: str) -> Any:
    if isinstance(value, str):
        return _ID.sub(rf"\g<1>{tag}-\g<2>", value)
    if isinstance(value, list):
        return [tagged(v, tag) for v in value]
    return value


class World:
    """A DemoWorld whose ids carry a tag: the realistic event mix of `cachesync demo`."""

    def __init__(self, tag: str, *, weddings: int = 100, seed: int = 8) -> None:
        self.tag = tag
        self.demo = DemoWorld(weddings=weddings, vendors=weddings * 2, seed=seed)

    def events(self, n: int) -> list[tuple[str, dict[str, Any]]]:
        """The opening events (weddings published, vendors linked), then the mix, n in all."""
        out = self.demo.opening_events()[:n]
        while len(out) < n:
            out.append(self.demo.next_event())
        return [(t, {k: tagged(v, self.tag) for k, v in r.items()}) for t, r in out]

    def cache_entries(self) -> list[tuple[str, list[str]]]:
        """Every entry a guest's visit to each wedding leaves in a region's cache, with tags."""
        return [
            (tagged(key, self.tag), [tagged(t, self.tag) for t in tags])
            for w in self.demo.weddings
            for key, tags in self.demo.cache_entries(w)
        ]


def encode_events(
    settings: Settings, events: Iterable[tuple[str, dict[str, Any]]], codec: Codec | None = None
) -> list[tuple[str, bytes, bytes]]:
    """(topic, key, value) for each event, encoded as the platform puts it on the wire."""
    codec = codec or codec_for(settings)
    out = []
    for event_type, record in events:
        topic = settings.topic(settings.topology.content_topic_for(event_type).name)
        out.append((topic, event_key(event_type, record), codec.encode(event_type, record)))
    return out


async def produce_all(
    settings: Settings,
    messages: Sequence[tuple[str, bytes | None, bytes]],
    producer: AIOKafkaProducer | None = None,
) -> None:
    """Produce and wait for every ack (a pre-filled topic for a worker to consume)."""
    own = producer is None
    producer = producer or make_producer(
        settings.kafka_bootstrap_servers, client_id="cachesync-bench-fill", linger_ms=20
    )
    if own:
        await producer.start()
    try:
        futures = [
            await producer.send(topic, value=value, key=key, headers=platform_trace())
            for topic, key, value in messages
        ]
        for fut in futures:
            await fut
    finally:
        if own:
            await producer.stop()


# The stack's extras that `make test` starts and `make bench` does not use
# (deploy/local/up.d/secure.sh, two-clusters.sh): two more brokers and MirrorMaker 2,
# some 9 % of this 2-core machine between them, left running until `make down`.
TEST_EXTRAS = ("kafka-secure", "kafka-eu-west", "mm2")


def extras_running() -> list[str]:
    """Which of TEST_EXTRAS are running now (their PID files under .stack/run/)."""
    running = []
    for name in TEST_EXTRAS:
        try:
            os.kill(int((REPO / ".stack" / "run" / f"{name}.pid").read_text().strip()), 0)
        except (OSError, ValueError):
            continue
        running.append(name)
    return running


def measured_commit() -> str:
    """The commit a run measures: `git rev-parse --short HEAD`, plus "+dirty" when the
    tree differs from it. Read when the run starts: what it measures is the code loaded
    then (a results file written into the tree later would otherwise make it "dirty")."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain") else "")


def now_ms() -> int:
    return int(time.time() * 1000)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[rank - 1])


class Topics:
    """Creates each scenario's topics and deletes every one of them at the end."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.created: list[str] = []

    async def create(self, prefix: str) -> Settings:
        from cachesync.topology.admin import apply_topics

        settings = bench_settings(prefix)
        changes = await apply_topics(
            settings.kafka_bootstrap_servers, settings.topology, settings.topic_prefix
        )
        self.created += [c.topic for c in changes]
        return settings

    async def delete_all(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        if not self.created:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="cachesync-bench")
        await admin.start()
        try:
            await admin.delete_topics(self.created)
        finally:
            await admin.close()


def cdn_env() -> dict[str, str]:
    """What `make run` sources: the CDN stand-ins' addresses (.stack/cdn.env), if up."""
    path = REPO / ".stack/cdn.env"
    return read_env_file(path) if path.exists() else {}


def runnable_sinks(env: dict[str, str]) -> list[tuple[str, str]]:
    """The (region, sink) pairs `run all` runs with `env` (the stand-ins it can reach)."""
    from cachesync.consumers.pipeline.assemble import runnable_sinks as runnable

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return runnable(load_settings())[0]
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def stop_process(
    proc: asyncio.subprocess.Process, sig: signal.Signals = signal.SIGINT, wait_s: float = 60
) -> None:
    """`sig` (a drain), then SIGKILL if it has not exited within `wait_s`."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        await asyncio.wait_for(proc.wait(), timeout=wait_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
