"""Latency per tier at a steady rate: event -> acknowledged, each tier observed from outside.

The mapper and each region's five sinks (Redis, Cloudflare, CloudFront, HTTP purge, the
warmer) run as separate processes, as in production, against the local stack's Kafka and
Redis, a Varnish edge per region (started here, on ports of its own, in front of the
local origin), the Cloudflare API stand-in and moto. `photo.uploaded` events are
published at `--rate` per second for `--seconds`, each for a wedding, a photo and an
album of its own (a wedding's pages share surrogate keys, so one event would purge
another's pages), so each tier's acknowledgement is told apart by items no other event
names. In us-east, the default region (where a wedding's warms go when its guests'
countries were never described), every event's acknowledgement is observed in the cache
or provider itself, never from the pipeline's reports:

| tier | acknowledged when |
|---|---|
| Redis | the purge's keys, written before the event, are deleted (Redis's keyspace notifications) |
| Varnish | the album page, cached before the event, is no longer served from that copy: a probe that never fills the cache (`x-cachesync-probe`: the edge answers 504 on a miss) gets 504 or another origin generation |
| Cloudflare | the stand-in's ledger holds an accepted call naming the album's tag and its page |
| CloudFront | moto holds an invalidation covering the album page (its creation time) |
| warm | the photo's page, never fetched by anyone but the warmer, is a HIT at the edge |

Latency is from the event's `occurred_at` (set as it is published), after 5 s of the same
traffic not measured (a warm-up). Events are sampled for the edge probes
(`--probe-every`); Redis, Cloudflare and CloudFront see every event. The Cloudflare
stand-in's zones and the sinks' plan are Enterprise's (50 req/s, bucket 500): its p50
target is Cloudflare's own global purge time, which a 5 req/s plan cannot approach
when each flush is up to three calls (files, tags, prefixes).

    .venv/bin/python -m bench.tier_latency [--rate 100] [--seconds 30] [--json PATH]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from redis.asyncio import Redis

from bench.common import (
    REPO,
    Topics,
    first_line,
    one_command_app,
    percentile,
    runnable_sinks,
    stack_env,
    stop_process,
)
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.settings import Settings, load_settings, region_var
from deploy.local.standins.aws import create_distribution, moto_server
from deploy.local.standins.cloudflare import CloudflareStub
from deploy.local.standins.serve import free_port, serve

# The topology's default region: the warms of a wedding whose guests were never described go
# there, so every event's warm is observed without describing its wedding first.
OBSERVED = "us-east"
TOKEN = "bench-tiers-token"
# Issue 15's targets, at 100 events/s on this machine: tier -> (p50, p99) in ms.
TARGETS: dict[str, tuple[float, float]] = {
    "redis": (20, 100),
    "varnish": (100, 300),
    "cloudflare": (150, 500),
    "cloudfront": (1000, 2000),
    "warm": (1000, 2000),
}
LABELS = {
    "redis": "Redis keys deleted",
    "varnish": "Varnish purged (next GET a MISS)",
    "cloudflare": "Cloudflare purge accepted (stand-in's ledger)",
    "cloudfront": "CloudFront invalidation created (moto)",
    "warm": "warmed page HIT at the Varnish edge",
}
# Cloudflare plan of the stand-in's zones and of the sinks: Enterprise, 50 req/s, bucket 500.
CLOUDFLARE_RATE = 50.0
CLOUDFLARE_BURST = 500
# Observed only on the events sampled for the edge probes (`--probe-every`).
PROBED_TIERS = ("varnish", "warm")
# Keyspace notifications the Redis observer needs: keyspace channels (K), generic commands
# such as DEL and UNLINK (g). Added to what the server has, and restored after the run.
KEYSPACE_FLAGS = "Kg"
# After the last event, how long observations may still come in.
GRACE_S = 15.0
# Events published at the same rate before the measured ones, not observed.
WARM_UP_S = 5.0

# The local edge's VCL, plus one rule: a request with `x-cachesync-probe` is answered from
# the cache or not at all (504), so a probe never puts a page in the cache it observes.
PROBE_VCL = """
sub vcl_miss {
    if (req.http.x-cachesync-probe) {
        return (synth(504, "Not cached"));
    }
}
"""


# -- the edges ----------------------------------------------------------------------


class Edges:
    """An origin and one Varnish per region, on free ports, under .stack/bench-tiers/<run>/."""

    def __init__(self, run: str, regions: list[str]) -> None:
        stack = Path(os.environ.get("CACHESYNC_STACK_DIR", REPO / ".stack"))
        self.dir = stack / "bench-tiers" / run
        self.regions = regions
        self.origin_port = free_port()
        self.ports = {r: free_port() for r in regions}
        self.procs: list[subprocess.Popen[bytes]] = []

    def url(self, region: str) -> str:
        return f"http://127.0.0.1:{self.ports[region]}"

    def start(self) -> None:
        if shutil.which("varnishd") is None:
            raise SystemExit("varnishd not found: make setup installs Debian's varnish")
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "edges.log", "ab")  # noqa: SIM115 (held by the children)
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "deploy.local.standins.origin", str(self.origin_port)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        vcl = (REPO / "deploy/varnish/default.vcl").read_text()
        vcl = vcl.replace('.port = "16090";', f'.port = "{self.origin_port}";') + PROBE_VCL
        (self.dir / "edge.vcl").write_text(vcl)
        for region, port in self.ports.items():
            work = self.dir / f"varnish-{region}"
            work.mkdir(exist_ok=True)
            self.procs.append(
                subprocess.Popen(
                    [
                        *("varnishd", "-j", "none", "-F", "-n", str(work)),
                        *("-a", f"127.0.0.1:{port}", "-T", "127.0.0.1:0"),
                        *("-f", str(self.dir / "edge.vcl"), "-s", "malloc,64m"),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + 30
        for port in [self.origin_port, *self.ports.values()]:
            while not _answers(port):
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    self.stop(keep_logs=True)
                    raise SystemExit(f"an edge did not come up: see {self.dir / 'edges.log'}")
                time.sleep(0.1)

    def stop(self, *, keep_logs: bool) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
        for work in self.dir.glob("varnish-*"):
            shutil.rmtree(work, ignore_errors=True)
        if not keep_logs:
            shutil.rmtree(self.dir, ignore_errors=True)


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_health", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


class Probe:
    """GETs on a few kept-alive connections to one edge, with the probe header: the page's
    cache status and origin generation, without ever filling the cache. Plain asyncio
    streams, and a pass's requests pipelined (one write per connection, the answers read
    back in order): a probe per pending event every few milliseconds must cost the
    machine little, here and at the edge."""

    def __init__(self, port: int, connections: int = 4) -> None:
        self.port = port
        self.connections = connections
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self._gate = asyncio.Semaphore(connections)

    async def get(self, path: str, *, probe: bool = True) -> tuple[int, str, str]:
        """(status, X-Cache, X-Origin-Generation) of `path`."""
        (answer,) = await self._send([path], probe=probe)
        return answer

    async def many(self, paths: list[str]) -> list[tuple[int, str, str]]:
        """What `get` says of each of `paths` (probing), spread over the connections."""
        if not paths:
            return []
        lanes = min(self.connections, len(paths))
        answers = await asyncio.gather(*(self._send(paths[i::lanes]) for i in range(lanes)))
        out: list[tuple[int, str, str]] = [(0, "", "")] * len(paths)
        for i, lane in enumerate(answers):
            out[i::lanes] = lane
        return out

    async def _send(self, paths: list[str], *, probe: bool = True) -> list[tuple[int, str, str]]:
        """`paths` pipelined on one connection; once more on a fresh one if it was closed."""
        # The Host the warmer and the purger send: the edge's cache is keyed by it.
        head = f"Host: 127.0.0.1:{self.port}\r\n" + ("x-cachesync-probe: 1\r\n" if probe else "")
        payload = "".join(f"GET {path} HTTP/1.1\r\n{head}\r\n" for path in paths).encode()
        async with self._gate:
            conn = self._idle.get_nowait() if not self._idle.empty() else None
            for attempt in (0, 1):
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", self.port)
                reader, writer = conn
                writer.write(payload)
                try:
                    await writer.drain()
                    answers = [await _read_response(reader) for _ in paths]
                except (ConnectionError, asyncio.IncompleteReadError):
                    writer.close()
                    conn = None
                    if attempt:
                        raise
                    continue
                self._idle.put_nowait(conn)
                return answers
        raise AssertionError("unreachable")

    async def close(self) -> None:
        while not self._idle.empty():
            _, writer = self._idle.get_nowait()
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, str, str]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:  # the edge closed the idle connection
            raise ConnectionResetError("connection closed") from exc
        raise
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("x-cache", ""), headers.get("x-origin-generation", "")


# -- the events and what is observed of them ------------------------------------------


@dataclass
class Tracked:
    """One published event: its unique items, when it happened, and when each tier was seen."""

    index: int
    wedding: str
    photo: str
    album: str
    probed: bool
    occurred_ms: int = 0
    published_mono: float = 0.0
    generation: str = ""  # the album page's origin generation cached before the event
    seen: dict[str, float] = field(default_factory=dict)  # tier -> wall ms

    @property
    def photo_path(self) -> str:
        return f"/weddings/{self.wedding}/photos/{self.photo}.jpg"

    @property
    def album_path(self) -> str:
        return f"/weddings/{self.wedding}/albums/{self.album}"

    @property
    def redis_keys(self) -> list[str]:
        return [f"photo:{self.photo}", f"wedding:{self.wedding}:album:{self.album}"]

    def event(self) -> dict[str, Any]:
        return new_event(
            "photo.uploaded",
            source="bench",
            wedding_id=self.wedding,
            photo_id=self.photo,
            album_id=self.album,
            path=self.photo_path,
            content_type="image/jpeg",
            size_bytes=1_000_000,
        )

    def see(self, tier: str, at_ms: float) -> None:
        self.seen.setdefault(tier, at_ms)


def now_ms() -> float:
    return time.time() * 1000


class Observers:
    """Every tier's outside observation of the published events, each in its own task.

    Each tier keeps the events it still waits for, and drops one when it is seen: a pass
    costs what is pending, not what was published, and takes few calls (one pipelined write
    per connection for the edge; none for Redis, whose deletions it is told of, nor for moto
    and the Cloudflare stand-in, whose records it reads in this process), so the observer
    takes little CPU from the pipeline it measures."""

    def __init__(self, run: Run, events: list[Tracked]) -> None:
        self.run = run
        self.events = events
        self.pending: dict[str, dict[int, Tracked]] = {tier: {} for tier in TARGETS}
        self.done = asyncio.Event()

    def published(self, e: Tracked) -> None:
        """`e` went out: every tier that observes it waits for it from now on."""
        for tier, waiting in self.pending.items():
            if e.probed or tier not in PROBED_TIERS:
                waiting[e.index] = e

    def waiting(self, tier: str) -> list[Tracked]:
        """The published events `tier` has not been seen for (a copy: seeing one drops it)."""
        return list(self.pending[tier].values())

    def saw(self, tier: str, e: Tracked, at_ms: float) -> None:
        e.see(tier, at_ms)
        self.pending[tier].pop(e.index, None)

    def outstanding(self) -> int:
        """Observations still expected from the events published so far."""
        return sum(len(waiting) for waiting in self.pending.values())

    async def redis(self, url: str, subscribed: asyncio.Event) -> None:
        """Each event's keys deleted, as Redis itself announces it: its keyspace
        notifications (`del` on `__keyspace@0__:<key>`), pushed as the sink's script
        deletes them, and stamped by a process of their own (`watch_keyspace`), not in this
        one, where the Cloudflare API's and moto's threads, the probes and the publisher
        share the GIL with the stamping (runs minutes apart: p50 31 and 29 ms either way; p99 66
        and 61 against 96 and 117). Polling EXISTS every 2 ms cost the observer and Redis
        500 calls a second on the cores the pipeline uses, and put up to 2 ms into each
        figure."""
        left = {e.index: set(e.redis_keys) for e in self.events}
        by_key = {k: e for e in self.events for k in e.redis_keys}
        patterns = {f"__keyspace@0__:{k.split(self.run.run)[0]}{self.run.run}-*" for k in by_key}
        watch = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bench.tier_latency", "--watch-redis", url),
            *(arg for pattern in sorted(patterns) for arg in ("--pattern", pattern)),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        assert watch.stdout is not None
        try:
            line = await asyncio.wait_for(watch.stdout.readline(), timeout=30)
            if line.strip() != b"READY":
                raise SystemExit("the keyspace watcher did not start")
            subscribed.set()
            while not self.done.is_set():
                try:
                    line = await asyncio.wait_for(watch.stdout.readline(), timeout=0.05)
                except TimeoutError:
                    continue
                if not line:
                    raise SystemExit("the keyspace watcher exited")
                key, at = line.decode().split()
                e = by_key.get(key)
                if e is None or e.index not in self.pending["redis"]:
                    continue
                left[e.index].discard(key)
                if not left[e.index]:
                    self.saw("redis", e, float(at))
        finally:
            if watch.returncode is None:
                watch.terminate()
            await watch.wait()

    async def edge_purges(self, probe: Probe) -> None:
        """The album page: gone from the edge (504 to a probe) or another generation."""
        while not self.done.is_set():
            waiting = self.waiting("varnish")
            answers = await probe.many([e.album_path for e in waiting])
            at = now_ms()
            for e, (status, _, generation) in zip(waiting, answers, strict=True):
                if status == 504 or generation != e.generation:
                    self.saw("varnish", e, at)
            await asyncio.sleep(0.01)

    async def edge_warms(self, probe: Probe) -> None:
        """The photo page, which only the warmer fetches: a HIT at the edge."""
        while not self.done.is_set():
            waiting = self.waiting("warm")
            answers = await probe.many([e.photo_path for e in waiting])
            at = now_ms()
            for e, (status, cache, _) in zip(waiting, answers, strict=True):
                if status == 200 and cache.startswith("HIT"):
                    self.saw("warm", e, at)
            await asyncio.sleep(0.05)

    async def cloudflare(self, stub: CloudflareStub) -> None:
        zone = self.run.zone(OBSERVED)
        public = (self.run.settings.topology.regions[OBSERVED].public_url or "").rstrip("/")
        # Each event's album tag and page: both must be in accepted calls.
        wanted: dict[str, list[tuple[Tracked, str]]] = {}
        for e in self.events:
            wanted.setdefault(f"album:{e.album}", []).append((e, "tag"))
            wanted.setdefault(public + e.album_path, []).append((e, "file"))
        parts: dict[int, set[str]] = {}
        read = 0
        # The ledger's times are the stand-in's monotonic clock, in this process.
        offset_ms = now_ms() - time.monotonic() * 1000
        while not self.done.is_set():
            calls = stub.calls[read:]
            read += len(calls)
            for call in calls:
                if call.zone != zone or call.status != 200:
                    continue
                for item in call.items:
                    for e, part in wanted.get(item, ()):
                        if e.published_mono and call.at >= e.published_mono:
                            got = parts.setdefault(e.index, set())
                            got.add(part)
                            if len(got) == 2:
                                self.saw("cloudflare", e, call.at * 1000 + offset_ms)
            await asyncio.sleep(0.005)

    async def cloudfront(self, distribution: str) -> None:
        """The invalidations moto holds for the distribution, read in this process (moto runs
        in a thread of it), every 5 ms; each seen at the time moto stamped on it.

        moto's own record, as the Cloudflare stand-in's ledger is Cloudflare's: listing
        them through the API every 50 ms made moto serve 20 requests a second for the
        observer, each some milliseconds of CPU taken from the pipeline it measures, and
        put up to 50 ms of polling into each figure."""
        backend = _moto_cloudfront()
        read = 0
        while not self.done.is_set():
            # moto appends to this list in its request thread; a slice is a consistent copy.
            new = backend.invalidations.get(distribution, [])[read:]
            read += len(new)
            for invalidation in new:
                at = invalidation.create_time.replace(tzinfo=UTC).timestamp() * 1000
                self._invalidated(list(invalidation.paths), at)
            await asyncio.sleep(0.005)

    def _invalidated(self, paths: list[str], at: float) -> None:
        """The events an invalidation of `paths`, created at `at`, covers."""
        # Only the published events still waiting can be covered for the first time.
        waiting = {e.album_path: e for e in self.waiting("cloudfront")}
        for path in paths:
            if path.endswith("*"):
                for album_path, e in waiting.items():
                    if album_path.startswith(path[:-1]):
                        self.saw("cloudfront", e, at)
            elif (named := waiting.get(path)) is not None:
                self.saw("cloudfront", named, at)


# -- the run ----------------------------------------------------------------------------


@dataclass
class Run:
    run: str
    settings: Settings
    edges: Edges
    cloudflare_url: str
    moto_url: str
    distributions: dict[str, str]
    # The regions whose sinks run (each with its edge): the observed one, or every one.
    sink_regions: list[str]

    def zone(self, region: str) -> str:
        return f"zone-{region}-{self.run}"

    def topology(self) -> Path:
        """The topology with the Cloudflare plan of the stand-in's zones (Enterprise)."""
        data = yaml.safe_load(self.settings.topology_file.read_text())
        cloudflare = data.setdefault("cdn", {}).setdefault("cloudflare", {})
        cloudflare.update(rate_per_s=CLOUDFLARE_RATE, burst=CLOUDFLARE_BURST)
        path = self.edges.dir / "topology.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def env(self) -> dict[str, str]:
        """What the pipeline's processes read: this run's topics, groups and stand-ins."""
        env = {
            **os.environ,
            "CACHESYNC_TOPOLOGY": str(self.topology()),
            "CACHESYNC_TOPIC_PREFIX": self.settings.topic_prefix,
            "CACHESYNC_GROUP_PREFIX": self.settings.group_prefix,
            "CACHESYNC_METRICS_PORT": "0",
            "CLOUDFLARE_API_URL": self.cloudflare_url,
            "CLOUDFLARE_API_TOKEN": TOKEN,
            "CLOUDFRONT_ENDPOINT_URL": self.moto_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        for region in self.settings.topology.regions:
            if region in self.sink_regions:
                env[region_var("EDGE_URL_", region)] = self.edges.url(region)
            env[region_var("CLOUDFLARE_ZONE_", region)] = self.zone(region)
            env[region_var("CLOUDFRONT_DISTRIBUTION_", region)] = self.distributions[region]
        return env


class Pipeline:
    """The mapper, and one process per sink of each region of `sink_regions` (as the chart
    deploys them: `cachesync run sink --region R --sink KIND`); each says READY on stdout
    once its consumers hold their partitions."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        sinks = [
            f"sink:{kind}:{region}"
            for region, kind in runnable_sinks(self.run.env())
            if region in self.run.sink_regions
        ]
        roles = ["mapper", *sinks]
        for role in roles:
            with (self.run.edges.dir / f"{role.replace(':', '-')}.log").open("wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "bench.tier_latency", "--role", role),
                    cwd=REPO,
                    env=self.run.env(),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                )
            self.procs.append(proc)
        for role, proc in zip(roles, self.procs, strict=True):
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), timeout=90)
            except TimeoutError:
                line = b""
            if line.strip() != b"READY":
                raise SystemExit(f"{role} did not start: see {self.run.edges.dir}")

    async def stop(self) -> None:
        await asyncio.gather(*(stop_process(proc, signal.SIGTERM) for proc in self.procs))


async def _prepare(redis: Redis, events: list[Tracked], probe: Probe) -> None:
    """The state before the events: their Redis keys written, their album pages cached."""
    pipe = redis.pipeline(transaction=False)
    for e in events:
        for key in e.redis_keys:
            pipe.set(key, "cached", ex=3600)
    await pipe.execute()
    for e in events:
        if e.probed:
            await probe.get(e.album_path, probe=False)
            status, cache, e.generation = await probe.get(e.album_path)
            if status != 200 or not cache.startswith("HIT"):
                raise SystemExit(f"{e.album_path} is not cached at the edge: {status} {cache}")


async def _publish(
    run: Run, events: list[Tracked], rate: float, observers: Observers | None
) -> tuple[float, float]:
    """Publish at `rate`, each event stamped as it goes; the achieved rate and seconds.
    Without `observers`: a warm-up, nothing observed."""
    publisher = EventPublisher(run.settings)
    await publisher.start()
    started = time.monotonic()
    try:
        for i, e in enumerate(events):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            record = e.event()
            e.occurred_ms = int(record["occurred_at"])
            e.published_mono = time.monotonic()
            if observers is not None:
                observers.published(e)
            await publisher.publish("photo.uploaded", record, wait=False)
        await publisher.flush()
    finally:
        await publisher.stop()
    seconds = time.monotonic() - started
    return len(events) / seconds, seconds


@contextlib.asynccontextmanager
async def _tasks(*coros: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result


def summarize(events: list[Tracked], rate: float, seconds: float) -> dict[str, Any]:
    tiers: dict[str, Any] = {}
    for tier in TARGETS:
        sample = [e for e in events if e.probed or tier not in PROBED_TIERS]
        values = [e.seen[tier] - e.occurred_ms for e in sample if tier in e.seen]
        p50, p99 = TARGETS[tier]
        tiers[tier] = {
            "label": LABELS[tier],
            "events": len(sample),
            "observed": len(values),
            "p50": percentile(values, 0.5),
            "p99": percentile(values, 0.99),
            "max": max(values, default=float("nan")),
            "target_p50": p50,
            "target_p99": p99,
        }
    probed = [e for e in events if e.probed]
    gaps = [
        e.seen["warm"] - e.seen["varnish"] for e in probed if {"warm", "varnish"} <= e.seen.keys()
    ]
    warmed = [e for e in probed if "warm" in e.seen]
    return {
        "region": OBSERVED,
        "rate": rate,
        "seconds": seconds,
        "events": len(events),
        "probed": len(probed),
        "tiers": tiers,
        "warm": {
            "hit_share": len(warmed) / len(probed) if probed else float("nan"),
            "after_varnish_p50": percentile(gaps, 0.5),
            "after_varnish_p99": percentile(gaps, 0.99),
            "within_2s_of_purge": (
                sum(1 for g in gaps if g <= 2000) / len(gaps) if gaps else float("nan")
            ),
        },
        "cloudflare_plan": {"rate_per_s": CLOUDFLARE_RATE, "burst": CLOUDFLARE_BURST},
    }


def render(out: dict[str, Any]) -> str:
    lines = [
        f"tier latency: {out['events']} photo.uploaded events at {out['rate']:.0f}/s for "
        f"{out['seconds']:.0f}s, observed in {out['region']} from outside the pipeline "
        f"(edge probes on {out['probed']} of them); Cloudflare plan "
        f"{out['cloudflare_plan']['rate_per_s']:g} req/s, bucket {out['cloudflare_plan']['burst']}",
        f"sinks running: {', '.join(out.get('sink_regions', []))} (the mapper writes every region's)",
        "",
        f"{'tier':<48} {'n':>10} {'p50 ms':>8} {'target':>7} {'p99 ms':>8} {'target':>7}",
    ]
    for t in out["tiers"].values():
        lines.append(
            f"{t['label']:<48} {t['observed']:>5}/{t['events']:<4} {t['p50']:>8.0f} "
            f"{'<' + format(t['target_p50'], '.0f'):>7} {t['p99']:>8.0f} "
            f"{'<' + format(t['target_p99'], '.0f'):>7}"
        )
    w = out["warm"]
    lines += [
        "",
        f"warmed pages HIT at the edge: {w['hit_share']:.1%}; warm after the Varnish purge: "
        f"p50 {w['after_varnish_p50']:.0f} ms, p99 {w['after_varnish_p99']:.0f} ms, "
        f"{w['within_2s_of_purge']:.1%} within 2 s",
    ]
    if calls := out.get("provider_calls"):
        per_s = {k: v / out["seconds"] for k, v in calls.items()}
        lines.append(
            f"provider calls while publishing, all regions: Cloudflare "
            f"{calls['cloudflare']:,} ({per_s['cloudflare']:.1f}/s), CloudFront invalidations "
            f"{calls['cloudfront']:,} ({per_s['cloudfront']:.1f}/s)"
        )
    return "\n".join(lines)


async def measure(
    rate: float, seconds: float, probe_every: int, *, all_regions: bool = False
) -> dict[str, Any]:
    stack_env()
    run_id = uuid.uuid4().hex[:8]
    topics = Topics(os.environ["KAFKA_BOOTSTRAP_SERVERS"])
    settings = await topics.create(f"tiers-{run_id}")
    regions = list(settings.topology.regions)
    # A region's sinks run on that region's machines: only the observed region's share the
    # machine with the mapper here, unless `all_regions` (the mapper still writes every
    # region's commands; the others wait in their topics).
    sink_regions = regions if all_regions else [OBSERVED]
    edges = Edges(run_id, sink_regions)
    stub = CloudflareStub(token=TOKEN, rate_per_s=CLOUDFLARE_RATE, burst=CLOUDFLARE_BURST)
    edges.start()
    ok = False
    try:
        with serve(stub.app) as cf_url, moto_server() as moto_url:
            distributions = {r: create_distribution(moto_url, f"tiers {r}") for r in regions}
            run = Run(run_id, settings, edges, cf_url, moto_url, distributions, sink_regions)
            events = [
                Tracked(
                    i, f"w{run_id}-{i}", f"p{run_id}-{i}", f"a{run_id}-{i}", i % probe_every == 0
                )
                for i in range(int(rate * seconds))
            ]
            probe = Probe(edges.ports[OBSERVED])
            redis = Redis.from_url(settings.region_redis_urls[OBSERVED])
            pipeline = Pipeline(run)
            config = await redis.config_get("notify-keyspace-events")
            flags = str(config.get("notify-keyspace-events") or "")
            await redis.config_set("notify-keyspace-events", flags + KEYSPACE_FLAGS)
            try:
                await _prepare(redis, events, probe)
                await pipeline.start()
                # A warm-up at the same rate, not measured: connections opened, caches warm.
                warm_up = [
                    Tracked(i, f"w{run_id}-warm-{i}", f"pw{run_id}-{i}", f"aw{run_id}-{i}", False)
                    for i in range(int(rate * WARM_UP_S))
                ]
                await _publish(run, warm_up, rate, None)
                observers = Observers(run, events)
                subscribed = asyncio.Event()
                async with _tasks(
                    observers.redis(settings.region_redis_urls[OBSERVED], subscribed),
                    observers.edge_purges(probe),
                    observers.edge_warms(probe),
                    observers.cloudflare(stub),
                    observers.cloudfront(distributions[OBSERVED]),
                ):
                    await asyncio.wait_for(subscribed.wait(), timeout=10)
                    calls_before = _provider_calls(stub, distributions)
                    achieved, took = await _publish(run, events, rate, observers)
                    calls = _provider_calls(stub, distributions, since=calls_before)
                    deadline = time.monotonic() + GRACE_S
                    while time.monotonic() < deadline and observers.outstanding():  # noqa: ASYNC110 (observations, not a flag)
                        await asyncio.sleep(0.2)
                    observers.done.set()
            finally:
                await pipeline.stop()
                await redis.config_set("notify-keyspace-events", flags)
                await redis.aclose()
                await probe.close()
            ok = True
            return {
                **summarize(events, achieved, took),
                "provider_calls": calls,
                "sink_regions": sink_regions,
            }
    finally:
        edges.stop(keep_logs=not ok)
        with contextlib.suppress(Exception):
            await topics.delete_all()


def _moto_cloudfront() -> Any:
    """moto's CloudFront, as it runs in this process (`moto_server`): its own records."""
    from moto.cloudfront.models import cloudfront_backends
    from moto.core.models import DEFAULT_ACCOUNT_ID

    return cloudfront_backends[DEFAULT_ACCOUNT_ID]["aws"]


def _provider_calls(
    stub: CloudflareStub, distributions: dict[str, str], since: dict[str, int] | None = None
) -> dict[str, int]:
    """Calls the providers have taken (every region), less `since`: the cost of the latency.
    Cloudflare: answered calls in the stand-in's ledger (429s too); CloudFront: the
    invalidations moto holds."""
    backend = _moto_cloudfront()
    now = {
        "cloudflare": len(stub.calls),
        "cloudfront": sum(len(backend.invalidations.get(d, [])) for d in distributions.values()),
    }
    return {k: v - (since or {}).get(k, 0) for k, v in now.items()}


async def run_role(role: str) -> None:
    """A process of the benchmark's pipeline: `mapper`, or `sink:<kind>:<region>`; READY on
    stdout once its consumers hold their partitions, until SIGTERM."""
    from cachesync.consumers.pipeline.assemble import tune_gc
    from cachesync.consumers.pipeline.roles import MapperRole, Role, SinkRole, run_roles
    from cachesync.consumers.sinks import registry

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    settings = load_settings()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    roles: list[Role]
    if role == "mapper":
        roles = [MapperRole(settings)]
    else:
        kind, region = role.removeprefix("sink:").split(":")
        sink = registry.build_sink(settings, region, kind)
        roles = [SinkRole(settings, sink, auto_offset_reset="latest")]
    tune_gc()  # as `cachesync run` does
    task = asyncio.create_task(run_roles(roles, stop))
    while not all(r.consumer.assignment() for r in roles):
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    for r in roles:
        for tp in r.consumer.assignment():
            await r.consumer.position(tp)
    print("READY", flush=True)
    await task


def watch_keyspace(url: str, patterns: list[str]) -> None:
    """Subscribe to `patterns` of keyspace notifications; print READY once subscribed,
    then `<key> <epoch ms>` for each key deleted, stamped as it arrives. Until SIGTERM."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(url)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.psubscribe(*patterns)
    confirmed = 0
    while confirmed < len(patterns):
        message = pubsub.get_message(timeout=10)
        if message is None:
            raise SystemExit("no subscription confirmed in 10 s")
        confirmed += message["type"] == "psubscribe"
    print("READY", flush=True)
    prefix = len("__keyspace@0__:")
    for message in pubsub.listen():
        if message["type"] != "pmessage" or message["data"] not in (b"del", "del"):
            continue
        at = now_ms()
        channel = message["channel"]
        key = (channel.decode() if isinstance(channel, bytes) else channel)[prefix:]
        sys.stdout.write(f"{key} {at:.3f}\n")
        sys.stdout.flush()


async def bench_tiers(rate: float, seconds: float = 30.0, reps: int = 1) -> dict[str, Any]:
    """The harness's hook (`python -m bench`): this benchmark `reps` times, each in its own
    process; their figures as one (`combine`)."""
    if rate <= 0:
        return {"status": "skipped", "detail": "not part of the smoke run"}
    runs: list[dict[str, Any]] = []
    for _ in range(reps):
        run = await _bench_tiers_once(rate, seconds)
        if run["status"] != "ok":
            return run
        runs.append(run)
    return combine(runs)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' figures as one: per tier, the median of the runs' p50s and of their
    p99s, each run's kept beside them (`per_run`). On this 2-core machine the same code's
    Redis p50 moved between 10 and 38 ms from one run to the next, minutes apart: one run
    says more about the machine's minute than about the code."""
    first = runs[0]
    if len(runs) == 1:
        return {**first, "reps": 1}
    tiers: dict[str, Any] = {}
    for tier, t in first["tiers"].items():
        each = [r["tiers"][tier] for r in runs]
        tiers[tier] = {
            **t,
            "events": sum(x["events"] for x in each),
            "observed": sum(x["observed"] for x in each),
            "p50": statistics.median(x["p50"] for x in each),
            "p99": statistics.median(x["p99"] for x in each),
            "max": max(x["max"] for x in each),
            "per_run": [[x["p50"], x["p99"]] for x in each],
        }
    warms = [r["warm"] for r in runs]
    probed = sum(r["probed"] for r in runs)
    hits = sum(w["hit_share"] * r["probed"] for w, r in zip(warms, runs, strict=True))
    return {
        **first,
        "reps": len(runs),
        "events": sum(r["events"] for r in runs),
        "probed": probed,
        "tiers": tiers,
        "warm": {
            "hit_share": hits / probed if probed else float("nan"),
            "after_varnish_p50": statistics.median(w["after_varnish_p50"] for w in warms),
            "after_varnish_p99": statistics.median(w["after_varnish_p99"] for w in warms),
            "within_2s_of_purge": statistics.median(w["within_2s_of_purge"] for w in warms),
            "hit_share_per_run": [w["hit_share"] for w in warms],
        },
        "output": "\n\n".join(r["output"] for r in runs),
    }


async def _bench_tiers_once(rate: float, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiers.json"
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bench.tier_latency", "--rate", str(rate)),
            *("--seconds", str(seconds), "--json", str(path)),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=seconds + 300)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return {"status": "error", "detail": "bench/tier_latency.py took too long"}
        if proc.returncode != 0 or not path.exists():
            tail = "\n".join(err.decode(errors="replace").splitlines()[-15:])
            return {"status": "error", "detail": f"exit {proc.returncode}:\n{tail}"}
        figures: dict[str, Any] = json.loads(path.read_text())
    return {"status": "ok", **figures, "output": out.decode(errors="replace")}


app = one_command_app()


@app.command(help=first_line(__doc__))
def main(
    rate: float = 100.0,
    seconds: float = 30.0,
    probe_every: Annotated[int, typer.Option(help="edge probes for one event in N")] = 4,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="also write the figures here")
    ] = None,
    all_regions: Annotated[
        bool,
        typer.Option(
            help="run every region's sinks on this machine, not only the observed region's"
        ),
    ] = False,
    role: Annotated[str | None, typer.Option(hidden=True)] = None,
    watch_redis: Annotated[str | None, typer.Option(hidden=True)] = None,
    pattern: Annotated[list[str] | None, typer.Option(hidden=True)] = None,
) -> None:
    if role is not None:  # one process of the pipeline this benchmark starts
        asyncio.run(run_role(role))
        return
    if watch_redis is not None:  # the Redis tier's observer (Observers.redis)
        watch_keyspace(watch_redis, pattern or [])
        return
    # moto's server logs every request.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    out = asyncio.run(measure(rate, seconds, probe_every, all_regions=all_regions))
    print(render(out))
    if json_path is not None:
        json_path.write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    app()
