"""The benchmark harness: every figure next to a ceiling measured in the same run.

    .venv/bin/python -m bench            # the full run (`make bench`), a few minutes
    .venv/bin/python -m bench --smoke    # everything small, under a minute (`make test`)
    .venv/bin/python -m bench --only throughput   # figures 1 and 3 alone, to a temp file
    .venv/bin/python -m bench --only scale        # 1 vs 2 processes per group (scale_out.py)
    .venv/bin/python -m bench --only consistency  # the long mode (consistency_at_scale.py)

1. mapper throughput on one core vs a bare aiokafka consume -> produce -> commit loop
   sending, per event, the very messages the mapper sent, batched per partition with
   the same producer (bench/worker.py `ceiling`);
2. end-to-end latency, event produced -> purge applied in all three regions' Redis,
   at a steady rate, from the audit topic's sink records; at the plan's rate once more
   with every sink running (`latency_every_sink`, reported, not a target);
3. Redis sink apply rate vs the smallest correct sink: consume the same command topic,
   decode, delete the keys and tagged keys in one pipeline per batch, commit
   (bench/worker.py `redis-ceiling`);
4. backlog drain time and peak RSS per process, at two backlog sizes;
5. CDN efficiency, from bench/cdn_burst.py when it runs.

Each measured process is a separate `python -m bench.worker` (pinned to one core
where the figure is "on one core"), so the load generator never shares its event
loop. Every scenario has its own topic and group prefix; the topics are deleted at
the end. The smoke run fails only on errors, never on slowness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import typer

from bench import report
from bench.common import (
    REPO,
    RESULTS,
    Topics,
    World,
    cdn_env,
    encode_events,
    extras_running,
    measured_commit,
    now_ms,
    one_command_app,
    percentile,
    platform_trace,
    produce_all,
    runnable_sinks,
    stack_env,
)
from cachesync.consumers.settings import Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from aiokafka import TopicPartition
    from redis.asyncio import Redis

    from cachesync.consumers.commands import PurgeCommand


class BenchError(RuntimeError):
    """A benchmark could not run (as opposed to: it ran slowly)."""


@dataclass(frozen=True)
class Plan:
    reps: int
    mapper_warmup: int
    mapper_count: int
    sink_warmup: int
    sink_count: int
    latency_rate: int
    latency_warmup_s: float
    latency_seconds: float
    latency_reps: int
    latency_low_rate: int
    latency_low_seconds: float
    latency_every_sink: bool  # the plan's rate again, with every sink running (reported only)
    tier_seconds: float  # latency per tier (bench/tier_latency.py) at latency_low_rate:
    tier_reps: int  # runs of this long, their medians reported
    drain_cap_s: float
    backlog_sizes: tuple[int, int]
    cdn_events: int
    cdn_weddings: int
    profile: bool
    run_rate: int  # `make run`'s demo rate (bench/make_run.py); 0: not measured
    run_seconds: float


FULL = Plan(
    reps=3,
    mapper_warmup=1_000,
    mapper_count=5_000,
    sink_warmup=500,
    sink_count=5_000,
    latency_rate=1_000,
    latency_warmup_s=5,
    latency_seconds=60,
    # At each rate, the median of three runs (with their spread): one run said more about
    # the machine's minute than about the code (at 1,000/s, p99 87 ms one day, 349 the
    # next, and 119-164 in 20 s runs of the same code an hour later).
    latency_reps=3,
    latency_low_rate=100,
    latency_low_seconds=20,
    latency_every_sink=True,
    tier_seconds=20,
    tier_reps=3,
    drain_cap_s=20,
    backlog_sizes=(10_000, 100_000),
    cdn_events=10_000,
    cdn_weddings=500,
    profile=True,
    run_rate=250,  # above the 200/s target: the figure is what is kept up with
    run_seconds=30,
)
SMOKE = Plan(
    reps=1,
    mapper_warmup=200,
    mapper_count=1_000,
    sink_warmup=100,
    sink_count=1_000,
    latency_rate=50,
    latency_warmup_s=1,
    latency_seconds=3,
    latency_reps=1,
    latency_low_rate=0,
    latency_low_seconds=0,
    latency_every_sink=False,
    tier_seconds=0,
    tier_reps=1,
    drain_cap_s=15,
    backlog_sizes=(500, 2_000),
    cdn_events=0,  # the CDN burst brings up stubs and moto: too slow for the smoke run
    cdn_weddings=0,
    profile=False,
    run_rate=0,  # a whole `run all` with its demo: too slow for the smoke run
    run_seconds=0,
)


# -- worker processes ---------------------------------------------------------------


class Worker:
    """One `python -m bench.worker` process: READY when its consumers are assigned, then RESULT."""

    live: ClassVar[set[Worker]] = set()

    def __init__(
        self,
        name: str,
        *args: object,
        module: str = "bench.worker",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.module = module  # the script it runs (`python -m <module> <args>`)
        self.args = [str(a) for a in args]
        self.env = env or {}  # on top of this process's environment
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.result: dict[str, Any] | None = None
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in finish)
            prefix=f"bench-{name}-", suffix=".log", delete=False
        )
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Worker:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            *self.args,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.log,
            env={
                **os.environ,
                "OTEL_SDK_DISABLED": os.environ.get("OTEL_SDK_DISABLED", ""),
                **self.env,
            },
        )
        self._reader = asyncio.create_task(self._read())
        Worker.live.add(self)
        return self

    @classmethod
    async def reap_all(cls) -> None:
        """Stop every worker still running (before its topics go), killing the stubborn."""
        for worker in list(cls.live):
            worker.terminate()
        for worker in list(cls.live):
            assert worker.proc is not None
            try:
                await asyncio.wait_for(worker.proc.wait(), timeout=15)
            except TimeoutError:
                worker.proc.kill()
                await worker.proc.wait()
            cls.live.discard(worker)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode().strip()
            if line == "READY":
                self.ready.set()
            elif line.startswith("RESULT "):
                self.result = json.loads(line[len("RESULT ") :])

    async def wait_ready(self, wait_s: float = 60) -> None:
        assert self.proc is not None
        waiter = asyncio.create_task(self.ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        await asyncio.wait({waiter, exited}, timeout=wait_s, return_when="FIRST_COMPLETED")
        waiter.cancel()
        exited.cancel()
        if not self.ready.is_set():
            self.terminate()
            with contextlib.suppress(BenchError):
                await self.finish(wait_s=5)
            raise BenchError(f"{self.name}: not ready after {wait_s:.0f}s\n{self.stderr_tail()}")

    def terminate(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()

    async def finish(self, wait_s: float = 600) -> dict[str, Any]:
        """Wait for the process to end (after `terminate` or its own count) and return RESULT."""
        assert self.proc is not None
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=wait_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise BenchError(f"{self.name}: still running after {wait_s:.0f}s") from None
        finally:
            Worker.live.discard(self)
            if self._reader is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._reader, timeout=5)
            self.log.close()
        if self.proc.returncode != 0 or self.result is None:
            raise BenchError(
                f"{self.name}: exit {self.proc.returncode}, no result\n{self.stderr_tail()}"
            )
        os.unlink(self.log.name)
        return self.result

    def stderr_tail(self, lines: int = 30) -> str:
        # Only the worker writes to its log (this process never does): read it from disk,
        # also after `finish` closed our handle on it.
        text = Path(self.log.name).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


async def run_worker(
    name: str, *args: object, wait_s: float = 600, module: str = "bench.worker"
) -> dict[str, Any]:
    worker = await Worker(name, *args, module=module).start()
    await worker.wait_ready()
    return await worker.finish(wait_s=wait_s)


# -- kafka helpers ----------------------------------------------------------------


class Lag:
    """Committed-offset lag of consumer groups, from the broker (what a drain really means)."""

    def __init__(self, bootstrap: str) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="cachesync-lag")
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.bootstrap = bootstrap
        self._parts: dict[tuple[str, ...], list[TopicPartition]] = {}

    async def __aenter__(self) -> Lag:
        await self.admin.start()
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()
        await self.admin.close()

    async def of(self, group: str, topics: list[str]) -> int:
        return (await self.progress(group, topics))[1]

    async def progress(self, group: str, topics: list[str]) -> tuple[int, int]:
        """(records the group has committed, records it has still to) over `topics`."""
        from cachesync.consumers.pipeline.kafka import partitions_of

        key = tuple(topics)
        if key not in self._parts:
            self._parts[key] = await partitions_of(self.bootstrap, topics)
        parts = self._parts[key]
        ends = await self.consumer.end_offsets(parts)
        committed = await self.admin.list_consumer_group_offsets(group)
        done = sum(committed[tp].offset for tp in parts if tp in committed and ends[tp] > 0)
        return done, sum(ends[tp] for tp in parts if ends[tp] > 0) - done

    async def drained(self, settings: Settings, sink_regions: list[str]) -> bool:
        if await self.of(settings.group_id("mapper"), settings.content_topics) > 0:
            return False
        for region in sink_regions:
            group = settings.group_id("sink", region, "redis")
            if await self.of(group, [settings.commands_topic(region)]) > 0:
                return False
        return True


async def read_topic(settings: Settings, topic: str) -> list[dict[str, Any]]:
    """Every record of a topic from the start to its current end, decoded."""
    from aiokafka import AIOKafkaConsumer

    from cachesync.consumers.pipeline.codecs import codec_for
    from cachesync.consumers.pipeline.kafka import partitions_of

    codec = codec_for(settings)
    parts = await partitions_of(settings.kafka_bootstrap_servers, [topic])
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        left = {tp for tp in parts if ends[tp] > 0}
        while left:
            batch = await consumer.getmany(*left, timeout_ms=1000, max_records=5000)
            for tp, records in batch.items():
                out += [codec.decode(r.value).record for r in records if r.value]
                if records and records[-1].offset + 1 >= ends[tp]:
                    left.discard(tp)
    finally:
        await consumer.stop()
    return out


# -- the figures ------------------------------------------------------------------


def _cpu() -> int:
    """The core the "on one core" figures pin to (the last one this process may use)."""
    return max(os.sched_getaffinity(0))


async def bench_mapper(
    plan: Plan, run: str, topics: Topics, rep: int, profile: str = ""
) -> dict[str, Any]:
    prefix = f"bench-{run}-m{rep}"
    settings = await topics.create(prefix)
    total = plan.mapper_warmup + plan.mapper_count
    world = World(f"{run}m{rep}")
    await produce_all(settings, encode_events(settings, world.events(total)))
    common = ["--prefix", prefix, "--cpu", _cpu(), "--warmup", plan.mapper_warmup]
    mapper = await run_worker(
        "mapper",
        "roles",
        "--roles",
        "mapper",
        *common,
        "--count",
        plan.mapper_count,
        *(["--profile", profile] if profile else []),
    )
    if profile:
        return {"mapper": mapper}
    from bench.worker import output_ends

    # On the same topics, after the mapper: each reads back what the mapper sent.
    upto = ["--count", plan.mapper_count, "--upto", json.dumps(await output_ends(settings))]
    ceiling = await run_worker("kafka-ceiling", "ceiling", *common, *upto)
    # The ceiling's loop with the mapper's codec work added (bench/CEILINGS.md).
    floor = await run_worker("codec-floor", "codec-floor", *common, *upto)
    produced = sum(mapper["roles"]["mapper"]["produced"].values())
    for name, loop in (("kafka-ceiling", ceiling), ("codec-floor", floor)):
        planned = {kind: t["messages"] for kind, t in loop["planned"].items()}
        if loop["sent"] != planned or planned["commands"] != produced:
            raise BenchError(
                f"{name} sent {loop['sent']} of {planned}; the mapper sent {produced} commands"
            )
    return {
        "value": mapper["window"]["rate"],
        "ceiling": ceiling["window"]["rate"],
        "floor": floor["window"]["rate"],
        "moved": {"inputs": total, **ceiling["planned"]},
        "mapper": mapper,
        "kafka_ceiling": ceiling,
        "codec_floor": floor,
    }


async def _fill_cache(redis: Redis, entries: list[tuple[str, list[str]]]) -> None:
    from cachesync.consumers import keys

    pipe = redis.pipeline(transaction=False)
    for key, tags in entries:
        pipe.set(key, b"cached", ex=600)
        pipe.set(keys.written_at(key), now_ms(), ex=600)
        for tag in tags:
            pipe.sadd(keys.tag_index(tag), key)
            pipe.expire(keys.tag_index(tag), 600)
    await pipe.execute()


async def _purge_commands(
    settings: Settings, world: World, region: str, total: int
) -> list[PurgeCommand]:
    """The first `total` purges for `region` that the mapper makes of the world's events."""
    from redis.asyncio import Redis

    from cachesync.consumers.commands import PurgeCommand
    from cachesync.consumers.mapping.index import RelationshipIndex
    from cachesync.consumers.mapping.mapper import Mapper

    state = Redis.from_url(str(settings.state_redis_url))
    mapper = Mapper(settings.topology, RelationshipIndex(state, settings.topology))
    commands: list[PurgeCommand] = []
    try:
        for event_type, record in world.events(total * 2):
            for cmd in await mapper.map_event(event_type, record):
                if (
                    isinstance(cmd, PurgeCommand)
                    and cmd.region == region
                    and (cmd.keys or cmd.tags)
                ):
                    commands.append(cmd)
            if len(commands) >= total:
                break
    finally:
        await state.aclose()
    return commands[:total]


async def bench_sink(
    plan: Plan, run: str, topics: Topics, rep: int, region: str = "eu-west", profile: str = ""
) -> dict[str, Any]:
    from redis.asyncio import Redis

    from cachesync.consumers.pipeline.codecs import codec_for

    prefix = f"bench-{run}-s{rep}"
    settings = await topics.create(prefix)
    world = World(f"{run}s{rep}")
    commands = await _purge_commands(settings, world, region, plan.sink_warmup + plan.sink_count)
    codec = codec_for(settings)
    topic = settings.commands_topic(region)
    await produce_all(
        settings,
        [(topic, c.entity.encode(), codec.encode(c.schema_type, c.to_record())) for c in commands],
    )
    url = settings.region_redis_urls[region]
    redis = Redis.from_url(url)
    entries = world.cache_entries()
    common = ["--cpu", _cpu(), "--warmup", plan.sink_warmup, "--count", plan.sink_count]
    try:
        await _fill_cache(redis, entries)
        sink = await run_worker(
            "sink",
            "roles",
            "--prefix",
            prefix,
            "--roles",
            f"redis:{region}",
            *common,
            *(["--profile", profile] if profile else []),
        )
        if profile:
            return {"sink": sink}
        # The same cache again, and the same command topic, read in a group of its own.
        await _fill_cache(redis, entries)
        ceiling = await run_worker(
            "redis-ceiling", "redis-ceiling", "--prefix", prefix, "--region", region, *common
        )
    finally:
        await redis.aclose()
    return {
        "value": sink["window"]["rate"],
        "ceiling": ceiling["window"]["rate"],
        "sink": sink,
        "redis_ceiling": ceiling,
    }


def _pipeline(
    prefix: str, regions: list[str], *, limit_s: float = 600.0, every_sink: bool = False
) -> list[Worker]:
    """One process per role, as deployed (`cachesync run mapper`, `cachesync run sink`):
    the mapper and each region's Redis sink, and with `every_sink` each other sink `run
    all` would run against the local stack's stand-ins (.stack/cdn.env). Each stops by
    itself after `limit_s` (the worker's safety cap: a run longer than that must raise it,
    or its pipeline stops mid-run)."""
    roles = [("mapper", "mapper"), *((f"sink.{r}", f"redis:{r}") for r in regions)]
    env: dict[str, str] = {}
    if every_sink:
        env = cdn_env()
        if not env:
            raise BenchError("every sink: the CDN stand-ins are not up (no .stack/cdn.env)")
        roles += [(f"sink.{k}.{r}", f"{k}:{r}") for r, k in runnable_sinks(env) if k != "redis"]
    return [
        Worker(name, "roles", "--prefix", prefix, "--roles", spec, "--timeout", limit_s, env=env)
        for name, spec in roles
    ]


# How often the load generator sends the events that are due (bench_latency).
LOAD_TICK_S = 0.005


@dataclass
class SteadyLoad:
    """What the load generator did: when each measured event was produced, how well it kept up."""

    occurred: dict[str, int]  # the measured events, by id: when each was produced (ms)
    measured_from: int = 0  # when the first measured event was produced (ms)
    sent_seconds: float = 0.0
    behind_s: float = 0.0  # how far the generator fell behind its schedule, at worst


async def _produce_steadily(
    settings: Settings, events: list[tuple[str, dict[str, Any]]], rate: int, warmup_n: int
) -> SteadyLoad:
    """Produce `events` at `rate` per second, each stamped `occurred_at` as it goes out;
    the events after the first `warmup_n` are the measured ones."""
    from cachesync.consumers.pipeline.codecs import codec_for
    from cachesync.consumers.pipeline.kafka import make_producer

    codec = codec_for(settings)
    # No linger, as the platform's side publishes (EventPublisher says why): a lingering
    # aiokafka producer's late acks would count in the latency from `occurred_at`.
    producer = make_producer(
        settings.kafka_bootstrap_servers, client_id="cachesync-bench-load", linger_ms=0
    )
    await producer.start()
    load = SteadyLoad(occurred={})
    try:
        pending = []
        started = time.monotonic()
        i = 0
        while i < len(events):
            # Every LOAD_TICK_S, the events due by then go out together, each stamped as it
            # is sent: one produce request per tick, as a platform producer lingering that
            # long sends, rather than one per event (which cost this process 31% of a core
            # and the broker more at 1,000 events/s, on the cores the pipeline runs on).
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(max(delay, LOAD_TICK_S))
            else:
                load.behind_s = max(load.behind_s, -delay)
            due = min(len(events), int((time.monotonic() - started) * rate) + 1)
            for event_type, record in events[i:due]:
                record["occurred_at"] = now_ms()
                if i == warmup_n:
                    load.measured_from = record["occurred_at"]
                if i >= warmup_n:
                    load.occurred[str(record["event_id"])] = record["occurred_at"]
                ((topic, key, value),) = encode_events(
                    settings, [(event_type, record)], codec=codec
                )
                pending.append(
                    await producer.send(topic, value=value, key=key, headers=platform_trace())
                )
                i += 1
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        load.sent_seconds = time.monotonic() - started
    finally:
        await producer.stop()
    return load


async def _wait_drained(settings: Settings, regions: list[str], cap_s: float) -> None:
    """Until the mapper and every region's sink have committed everything, or `cap_s` passed."""
    async with Lag(settings.kafka_bootstrap_servers) as lag:
        cap = time.monotonic() + cap_s
        for _ in range(int(cap_s * 4)):
            if time.monotonic() > cap or await lag.drained(settings, regions):
                break
            await asyncio.sleep(0.25)


async def _applied_at(settings: Settings) -> dict[str, dict[str, int]]:
    """Per event id, per region: when the Redis sink applied its purge (the audit topic's ms)."""
    from cachesync.consumers.pipeline.audit import AuditRecord

    applied: dict[str, dict[str, int]] = defaultdict(dict)
    for rec in await read_topic(settings, settings.audit_topic):
        # A sink's record may stand for many commands (one per flush and outcome).
        for a in AuditRecord.from_record(rec).expand():
            if a.stage == "sink" and a.sink == "redis" and a.outcome == "applied":
                applied[a.event_id][a.region or ""] = a.recorded_at
    return applied


def _latency_series(
    load: SteadyLoad, applied: dict[str, dict[str, int]], regions: list[str]
) -> tuple[list[tuple[float, float]], int]:
    """(seconds into the window, ms until applied in the last region) per measured event,
    sorted, and how many events some region never applied."""
    series: list[tuple[float, float]] = []
    incomplete = 0
    for event_id, occurred in load.occurred.items():
        by_region = applied.get(event_id, {})
        if len(by_region) < len(regions):
            incomplete += 1
            continue
        series.append(((occurred - load.measured_from) / 1000, max(by_region.values()) - occurred))
    series.sort()
    return series, incomplete


async def bench_latency(
    plan: Plan,
    run: str,
    topics: Topics,
    rep: int,
    rate: int,
    seconds: float,
    *,
    every_sink: bool = False,
) -> dict[str, Any]:
    """Events at a steady `rate`; each one's latency is the last region's audit `recorded_at`
    (written right after that sink's flush) minus its `occurred_at` (stamped at produce).
    An event not applied in all regions within `drain_cap_s` of the end counts as infinite.
    With `every_sink`, every other sink runs too (`_pipeline`), each in its own process."""
    prefix = f"bench-{run}-l{rep}"
    settings = await topics.create(prefix)
    regions = list(settings.topology.regions)
    pipeline = _pipeline(prefix, regions, every_sink=every_sink)
    try:
        for w in pipeline:
            await w.start()
        for w in pipeline:
            await w.wait_ready()
        warmup_n = int(rate * plan.latency_warmup_s)
        events = World(f"{run}l{rep}").events(warmup_n + int(rate * seconds))
        load = await _produce_steadily(settings, events, rate, warmup_n)
        await _wait_drained(settings, regions, plan.drain_cap_s)
        for w in pipeline:
            w.terminate()
        result = {w.name: await w.finish(wait_s=60) for w in pipeline}
    finally:
        for w in pipeline:
            w.terminate()
    series, incomplete = _latency_series(load, await _applied_at(settings), regions)
    if not series:
        raise BenchError("latency: no event reached all three regions")
    latencies = [lat for _, lat in series] + [math.inf] * incomplete
    return {
        "rate": rate,
        "seconds": seconds,
        "processes": [w.name for w in pipeline],
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
        "events": len(series),
        "incomplete": incomplete,
        "send_rate": len(events) / load.sent_seconds,
        "generator_max_behind_ms": load.behind_s * 1000,
        "peak_rss_mb": {name: r["peak_rss_mb"] for name, r in result.items()},
        "timeline": _per_second(series),
    }


def _lat_line(r: dict[str, Any]) -> str:
    return (
        f"p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, max {r['max']:.0f} ms; "
        f"{r['incomplete']:,} of {r['events'] + r['incomplete']:,} events not applied in time"
    )


def _per_second(series: list[tuple[float, float]]) -> list[list[float]]:
    buckets: dict[int, list[float]] = defaultdict(list)
    for t, lat in series:
        buckets[int(t)].append(lat)
    return [
        [s, percentile(v, 0.5), percentile(v, 0.99), max(v)] for s, v in sorted(buckets.items())
    ]


async def bench_backlog(plan: Plan, run: str, topics: Topics, size: int) -> dict[str, Any]:
    import psutil

    prefix = f"bench-{run}-b{size}"
    settings = await topics.create(prefix)
    regions = list(settings.topology.regions)
    await produce_all(settings, encode_events(settings, World(f"{run}b{size}").events(size)))
    workers = _pipeline(prefix, regions)
    sampled: dict[str, float] = {}
    try:
        for w in workers:
            await w.start()
        await workers[0].wait_ready()
        started = time.monotonic()
        for w in workers[1:]:
            await w.wait_ready()
        procs = {w.name: psutil.Process(w.pid) for w in workers}
        drained_at = None
        async with Lag(settings.kafka_bootstrap_servers) as lag:
            checked = 0.0
            while time.monotonic() - started < 900:
                for name, proc in procs.items():
                    with contextlib.suppress(psutil.Error):
                        rss = proc.memory_info().rss / 2**20
                        sampled[name] = max(sampled.get(name, 0.0), rss)
                if time.monotonic() - checked > 1.0:
                    checked = time.monotonic()
                    if await lag.drained(settings, regions):
                        drained_at = time.monotonic()
                        break
                await asyncio.sleep(0.25)
        if drained_at is None:
            raise BenchError(f"backlog {size}: not drained after 900 s")
        for w in workers:
            w.terminate()
        results = {w.name: await w.finish(wait_s=60) for w in workers}
    finally:
        for w in workers:
            w.terminate()
    return {
        "size": size,
        "drain_s": drained_at - started,
        "events_per_s": size / (drained_at - started),
        "peak_rss_mb": {n: max(r["peak_rss_mb"], sampled.get(n, 0.0)) for n, r in results.items()},
    }


async def bench_cdn(plan: Plan) -> dict[str, Any]:
    """CDN API calls against the minimum, from `python -m bench.cdn_burst`'s totals."""
    if plan.cdn_events <= 0:
        return {"status": "skipped", "detail": "not part of the smoke run"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.cdn_burst",
        "--events",
        str(plan.cdn_events),
        "--weddings",
        str(plan.cdn_weddings),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=420)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"status": "error", "detail": "bench/cdn_burst.py took over 420 s"}
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(err.decode(errors="replace").splitlines()[-15:])
        return {"status": "error", "detail": f"exit {proc.returncode}:\n{tail}", "output": text}
    totals = {
        m[1]: {"calls": int(m[2]), "minimum": int(m[3]), "collateral": int(m[4] or 0)}
        for m in re.finditer(
            r"^total (\S+)\s+(\d+) calls, minimum\s+(\d+).*?(?:collateral (\d+) pages)?$",
            text,
            re.M,
        )
    }
    if not totals:
        return {
            "status": "error",
            "detail": "no 'total ... calls, minimum ...' lines",
            "output": text,
        }
    # The run's whole output (it names its commit), which the report's CDN rows point to.
    (RESULTS / "cdn_burst.txt").write_text(text)
    return {"status": "ok", "totals": totals, "output": text}


async def profile_stages(plan: Plan, run: str, topics: Topics, slowest: str) -> str:
    """pyinstrument over one more run of the mapper and the sink; the slowest stage first."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"mapper": f"{tmp}/mapper.txt", "sink": f"{tmp}/sink.txt"}
        await bench_mapper(plan, run, topics, 90, profile=paths["mapper"])
        await bench_sink(plan, run, topics, 90, profile=paths["sink"])
        order = [slowest, *(s for s in paths if s != slowest)]
        parts = [
            f"== {stage} ({'slowest stage, ' if stage == slowest else ''}pyinstrument, "
            f"{plan.mapper_count if stage == 'mapper' else plan.sink_count} records after warm-up) ==\n"
            + _read(paths[stage])
            for stage in order
        ]
    return "\n\n".join(parts)


async def cleanup_redis(run: str) -> None:
    """The run's relationship index and cache entries (tagged ids) in the state and region Redis."""
    from redis.asyncio import Redis

    from cachesync.consumers.settings import load_settings

    settings = load_settings()
    for url in [str(settings.state_redis_url), *settings.region_redis_urls.values()]:
        redis = Redis.from_url(url)
        try:
            batch = [k async for k in redis.scan_iter(match=f"*{run}*", count=1000)]
            for i in range(0, len(batch), 500):
                await redis.delete(*batch[i : i + 500])
        finally:
            await redis.aclose()


def _read(path: str) -> str:
    return Path(path).read_text()


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class Progress:
    """Prints each step of the run with the seconds since it started."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, msg: str) -> None:
        print(f"[bench {self.elapsed():6.1f}s] {msg}", flush=True)


async def _throughput(
    plan: Plan, run: str, topics: Topics, say: Progress
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The mapper's and the Redis sink's rates against their ceilings, `plan.reps` times each."""
    mapper: list[dict[str, Any]] = []
    sink: list[dict[str, Any]] = []
    for rep in range(plan.reps):
        say(f"mapper throughput, repeat {rep + 1}/{plan.reps}")
        mapper.append(await bench_mapper(plan, run, topics, rep))
        say(
            f"  mapper {mapper[-1]['value']:,.0f} ev/s, ceiling {mapper[-1]['ceiling']:,.0f} "
            f"ev/s, codec floor {mapper[-1]['floor']:,.0f} ev/s"
        )
        say(f"sink apply rate, repeat {rep + 1}/{plan.reps}")
        sink.append(await bench_sink(plan, run, topics, rep))
        say(f"  sink {sink[-1]['value']:,.0f} cmd/s, ceiling {sink[-1]['ceiling']:,.0f} cmd/s")
    return mapper, sink


async def _latency_runs(
    plan: Plan,
    run: str,
    topics: Topics,
    say: Progress,
    rate: int,
    seconds: float,
    *,
    first_rep: int = 0,
    why: str = "",
) -> list[dict[str, Any]]:
    """End-to-end latency at `rate` for `seconds`, `plan.latency_reps` times; the runs are
    numbered from `first_rep` (each run's topics are its own)."""
    runs: list[dict[str, Any]] = []
    for rep in range(plan.latency_reps):
        say(
            f"end-to-end latency at {rate:,}/s for {seconds:.0f}s{why}, "
            f"repeat {rep + 1}/{plan.latency_reps}"
        )
        runs.append(await bench_latency(plan, run, topics, first_rep + rep, rate, seconds))
        say(f"  {_lat_line(runs[-1])}")
    return runs


async def _latency_every_sink(
    plan: Plan, run: str, topics: Topics, say: Progress
) -> dict[str, Any]:
    """The plan's rate once more with every sink running, each in its own process: the
    same figure (purge applied in every region's Redis), reported, not a target."""
    say(
        f"end-to-end latency at {plan.latency_rate:,}/s for {plan.latency_seconds:.0f}s "
        "with every sink running"
    )
    r = await bench_latency(
        plan, run, topics, 60, plan.latency_rate, plan.latency_seconds, every_sink=True
    )
    say(f"  {_lat_line(r)}; {len(r['processes'])} processes")
    return r


async def _backlogs(plan: Plan, run: str, topics: Topics, say: Progress) -> list[dict[str, Any]]:
    backlog: list[dict[str, Any]] = []
    for size in plan.backlog_sizes:
        say(f"backlog of {size:,} events")
        backlog.append(await bench_backlog(plan, run, topics, size))
        say(f"  drained in {backlog[-1]['drain_s']:.1f}s, peak RSS {backlog[-1]['peak_rss_mb']}")
    return backlog


async def _profile(
    plan: Plan, run: str, topics: Topics, say: Progress, summary: dict[str, Any]
) -> dict[str, str]:
    """The profile of the stage with the lowest ratio, written to bench/results/profile.txt."""
    slowest = min(("mapper", "sink"), key=lambda s: summary[s]["ratio"]["median"])
    say(f"profiling (slowest stage: {slowest})")
    (RESULTS / "profile.txt").write_text(await profile_stages(plan, run, topics, slowest))
    return {"slowest": slowest, "file": "bench/results/profile.txt"}


@contextlib.asynccontextmanager
async def _scenarios(run: str) -> AsyncIterator[Topics]:
    """The run's topics; at the end its workers stopped, its topics and cache entries gone."""
    topics = Topics(os.environ["KAFKA_BOOTSTRAP_SERVERS"])
    try:
        yield topics
    finally:
        await Worker.reap_all()
        with contextlib.suppress(Exception):
            await topics.delete_all()
        with contextlib.suppress(Exception):
            await cleanup_redis(run)


async def run_all(plan: Plan, smoke: bool) -> dict[str, Any]:
    stack_env()
    run = uuid.uuid4().hex[:8]
    out: dict[str, Any] = {
        "commit": measured_commit(),
        "run": run,
        "smoke": smoke,
        "plan": asdict(plan),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "pinned_cpu": _cpu(), "python": sys.version.split()[0]},
        "extras_running": extras_running(),
    }
    say = Progress()
    if out["extras_running"]:
        say(
            f"the test extras are running ({', '.join(out['extras_running'])}): the figures "
            "are from a busier machine; `make down` first to measure without them"
        )
    async with _scenarios(run) as topics:
        out["mapper"], out["sink"] = await _throughput(plan, run, topics, say)
        latency = await _latency_runs(
            plan, run, topics, say, plan.latency_rate, plan.latency_seconds
        )
        if plan.latency_low_rate:
            out["latency_low"] = await _latency_runs(
                plan,
                run,
                topics,
                say,
                plan.latency_low_rate,
                plan.latency_low_seconds,
                first_rep=50,
                why=" (a rate this machine sustains)",
            )
        if plan.latency_every_sink:
            out["latency_every_sink"] = await _latency_every_sink(plan, run, topics, say)
        out["latency"] = latency
        out["backlog"] = await _backlogs(plan, run, topics, say)
        say("CDN burst (bench/cdn_burst.py)")
        out["cdn"] = await bench_cdn(plan)
        say(f"  {out['cdn']['status']}")
        say(f"latency per tier at {plan.latency_low_rate}/s (bench/tier_latency.py)")
        from bench.tier_latency import bench_tiers

        out["tiers"] = await bench_tiers(
            plan.latency_low_rate, plan.tier_seconds, reps=plan.tier_reps
        )
        say(f"  {out['tiers']['status']}")
        say("HTTP purge sink and warmer against Varnish (bench/http_purge.py)")
        from bench.http_purge import bench_http_purge

        out["http_purge"] = await bench_http_purge(topics, run, smoke=smoke, reps=plan.reps)
        say(f"make run at --rate {plan.run_rate}, one process (bench/make_run.py)")
        from bench.make_run import bench_make_run

        out["make_run"] = await bench_make_run(plan.run_rate, plan.run_seconds)
        say(f"  {out['make_run']['status']}")
        out["summary"] = summarize(out)
        if plan.profile:
            out["profile"] = await _profile(plan, run, topics, say, out["summary"])
    out["seconds"] = say.elapsed()
    return out


def codec_floor(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The mapper's codec floor, and its share of the ceiling: the highest mapper ratio
    fastavro leaves room for (bench/CEILINGS.md)."""
    return {
        "floor": _spread([r["floor"] for r in reps]),
        "floor_ratio": _spread([r["floor"] / r["ceiling"] for r in reps]),
        "of_floor": _spread([r["value"] / r["floor"] for r in reps]),
    }


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    def ratio_of(reps: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "value": _spread([r["value"] for r in reps]),
            "ceiling": _spread([r["ceiling"] for r in reps]),
            "ratio": _spread([r["value"] / r["ceiling"] for r in reps]),
        }

    lat = out["latency"]
    small, large = out["backlog"]
    return {
        "mapper": ratio_of(out["mapper"]) | codec_floor(out["mapper"]),
        "sink": ratio_of(out["sink"]),
        "latency": {k: _spread([r[k] for r in lat]) for k in ("p50", "p99", "max")},
        "backlog": {
            "sizes": [small["size"], large["size"]],
            "drain_s": [small["drain_s"], large["drain_s"]],
            "peak_rss_mb": {
                name: [small["peak_rss_mb"][name], large["peak_rss_mb"][name]]
                for name in large["peak_rss_mb"]
            },
        },
    }


def _finite(value: Any) -> Any:
    """JSON has no infinity: an event never applied within the run is null."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _plan(
    smoke: bool, latency_seconds: float | None, reps: int | None, backlog: str | None
) -> Plan:
    plan = SMOKE if smoke else FULL
    if latency_seconds is not None:
        plan = replace(plan, latency_seconds=latency_seconds)
    if backlog is not None:
        small, large = (int(x) for x in backlog.split(","))
        plan = replace(plan, backlog_sizes=(small, large))
    if reps is not None:
        plan = replace(plan, reps=reps, latency_reps=reps)
    return plan


def _write_results(out: dict[str, Any], name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = report.table(out)
    (RESULTS / f"{name}.json").write_text(json.dumps(_finite(out), indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(report.markdown(out, table))
    report.plot(out, RESULTS / f"{name}.png")
    print()
    print(report.markdown(out, table))
    print(f"written: bench/results/{name}.json, {name}.md, {name}.png ({out['seconds']:.0f}s)")


class Only(StrEnum):
    """A part of the run that can be run alone (`--only`)."""

    THROUGHPUT = "throughput"
    # Modes of their own, not part of the full run, each writing its own results file:
    SCALE = "scale"  # bench/scale_out.py: groups of 1 and 2 processes, a rebalance under load
    CONSISTENCY = "consistency"  # bench/consistency_at_scale.py, the long mode (make bench-long)


async def run_only(plan: Plan, smoke: bool, part: Only) -> dict[str, Any]:
    """One part of the run, with the same topics, workers and clean-up as the whole."""
    stack_env()
    run = uuid.uuid4().hex[:8]
    out: dict[str, Any] = {"run": run, "smoke": smoke, "only": part, "plan": asdict(plan)}
    say = Progress()
    async with _scenarios(run) as topics:
        out["mapper"], out["sink"] = await _throughput(plan, run, topics, say)
    out["seconds"] = say.elapsed()
    return out


def _write_only(out: dict[str, Any]) -> None:
    """A part run alone is not the committed results: its JSON goes to a temp file."""
    for key in ("mapper", "sink"):
        reps = out[key]
        spread = {field: _spread([r[field] for r in reps]) for field in ("value", "ceiling")} | {
            "ratio": _spread([r["value"] / r["ceiling"] for r in reps])
        }
        print(
            f"{key}: value {spread['value']['median']:,.0f} "
            f"({spread['value']['min']:,.0f}-{spread['value']['max']:,.0f}), ceiling "
            f"{spread['ceiling']['median']:,.0f} "
            f"({spread['ceiling']['min']:,.0f}-{spread['ceiling']['max']:,.0f}), ratio "
            f"{spread['ratio']['median']:.2f} "
            f"({spread['ratio']['min']:.2f}-{spread['ratio']['max']:.2f})"
        )
    floor = codec_floor(out["mapper"])
    print(
        f"mapper codec floor: {floor['floor']['median']:,.0f} "
        f"({floor['floor']['min']:,.0f}-{floor['floor']['max']:,.0f}), of the ceiling "
        f"{floor['floor_ratio']['median']:.2f} "
        f"({floor['floor_ratio']['min']:.2f}-{floor['floor_ratio']['max']:.2f}); the mapper "
        f"is {floor['of_floor']['median']:.2f} of it"
    )
    fd, path = tempfile.mkstemp(prefix=f"bench-{out['only']}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(_finite(out), f, indent=2)
    print(f"written: {path} ({out['seconds']:.0f}s)")


app = one_command_app()


@app.command(help="cachesync benchmarks (issue 8)")
def main(
    smoke: Annotated[bool, typer.Option("--smoke", help="everything small and fast")] = False,
    latency_seconds: Annotated[float | None, typer.Option()] = None,
    reps: Annotated[int | None, typer.Option()] = None,
    backlog: Annotated[str | None, typer.Option(help="two sizes, e.g. 10000,100000")] = None,
    only: Annotated[
        Only | None,
        typer.Option(
            help="run this part alone (throughput: its JSON to a temp file, not results/; "
            "scale and consistency: modes of their own, with their own results files)"
        ),
    ] = None,
    purges: Annotated[
        int | None, typer.Option(help="--only consistency: purges to judge (default 1,000,000)")
    ] = None,
) -> None:
    # A new topic's leaders take a moment: aiokafka retries and says so; that is not news.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    plan = _plan(smoke, latency_seconds, reps, backlog)
    if only in (Only.SCALE, Only.CONSISTENCY):
        from bench.consistency_at_scale import cli as consistency_cli
        from bench.scale_out import cli as scale_cli

        if only is Only.SCALE:
            ok = scale_cli(smoke=smoke, reps=reps)
        else:
            ok = consistency_cli(smoke=smoke, purges=purges)
        if not ok:
            raise typer.Exit(1)
        return
    try:
        if only is not None:
            _write_only(asyncio.run(run_only(plan, smoke, only)))
            return
        out = asyncio.run(run_all(plan, smoke))
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    _write_results(out, "smoke" if smoke else "latest")
