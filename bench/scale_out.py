"""Scale-out: consumer groups with 1 and 2 processes, and per-entity order through a rebalance.

    .venv/bin/python -m bench --only scale            # 3 repeats, about 4 minutes
    .venv/bin/python -m bench --only scale --smoke    # small, about a minute

Kafka consumer groups are how a deployment grows past one process: this measures what a
second process in a group buys on this machine, and that a group changing under load
keeps each entity's purges in order.

1. **Throughput with 1 and 2 processes in a group**, for the mapper's group and for one
   region's Redis sink group (eu-west). Each process is a `bench.worker roles` process
   (bench/worker.py), pinned: one process to one core, two to one core each. The
   processes start on empty topics and join the group first; the backlog is produced once
   every one of them has its partitions, so no figure includes a rebalance. The rate is
   the group's, measured from outside: the committed offsets of the group (its lag, as
   the broker has it) from the end of the fill until a quarter of the backlog is left,
   and the CPU time over the same window of the processes and of the shared servers (the
   broker, the region's Redis: where a group that does not scale waits). The sink's
   backlog is the mapper's own output for that region in both mapper runs (purges and
   warms as the mapper wrote them, copied record for record with their keys and
   headers), against a cache filled with those worlds' entries.
2. **A rebalance mid-stream**: the mapper and the 3 Redis sinks run as separate processes
   at a steady rate; a second mapper and a second eu-west sink join while events flow,
   then the first of each leaves (SIGTERM: it finishes its batch and commits). Then the
   order is checked from outside, never from the processes' reports:
   - on the command topics (the mapper): for one entity, the purges of the events of one
     content partition appear, at their first occurrence, in the order of those events;
   - in each region's Redis (the sink): each purge's applied marker
     (`keys.applied`, written with the effect, the time it was applied) exists, and along
     an entity's command partition the markers' times never go back: no purge was
     applied after a later purge of its entity. And the entity's fence
     (`keys.purge_version`) holds the newest version among its purges.
   Copies of a command (a batch redone by the process that took its partition over) are
   counted: at-least-once delivery is expected; applying them again is not. The
   end-to-end latency of the events produced in each phase says what a move costs.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from bench.common import (
    Topics,
    World,
    encode_events,
    measured_commit,
    percentile,
    produce_all,
    stack_env,
)
from bench.harness import (
    BenchError,
    Lag,
    Progress,
    Worker,
    _applied_at,
    _cpu,
    _fill_cache,
    _latency_series,
    _produce_steadily,
    _scenarios,
    _wait_drained,
)
from bench.worker import PartitionBatches, _message, _read_back
from cachesync.consumers import keys

if TYPE_CHECKING:
    import psutil
    from redis.asyncio import Redis

    from cachesync.consumers.commands import PurgeCommand
    from cachesync.consumers.pipeline.kafka import Record
    from cachesync.consumers.settings import Settings

# The region whose Redis sink group is scaled (any one would do: they are alike).
SINK_REGION = "eu-west"
# After every process is READY: a moment for the group's last SyncGroup to settle.
SETTLE_S = 1.0
# The window ends when this share of the backlog is left (the processes' partitions do
# not all empty at once: the tail would measure one process) or after `measure_s`.
WINDOW_ENDS_AT_LEFT = 0.25
# The rebalance: the second processes start this share of the load's time into it, and
# the first ones leave as long after the second ones have their partitions.
REBALANCE_AFTER = 0.2


@dataclass(frozen=True)
class ScalePlan:
    reps: int
    backlog: int  # events in the mapper's backlog; its eu-west output is the sink's
    measure_s: float  # the longest measured window
    rebalance_rate: int  # events/s while the groups change
    rebalance_seconds: float
    drain_cap_s: float


FULL = ScalePlan(
    reps=3, backlog=40_000, measure_s=20, rebalance_rate=300, rebalance_seconds=60, drain_cap_s=60
)
SMOKE = ScalePlan(
    reps=1, backlog=5_000, measure_s=8, rebalance_rate=100, rebalance_seconds=40, drain_cap_s=30
)


def _cores(n: int) -> list[int]:
    """The cores n pinned processes use: one alone on the harness's core, else one each."""
    if n == 1:
        return [_cpu()]
    usable = sorted(os.sched_getaffinity(0))
    return [usable[i % len(usable)] for i in range(n)]


def _servers(settings: Settings, region: str) -> dict[str, psutil.Process]:
    """The shared servers a group works against, by the port they listen on: the Kafka
    broker and the region's Redis. Their CPU over the window says where a group that does
    not scale waits."""
    import psutil

    ports = {
        "kafka": int(settings.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[1]),
        f"redis {region}": urlsplit(settings.region_redis_urls[region]).port or 6379,
    }
    found: dict[str, psutil.Process] = {}
    for conn in psutil.net_connections(kind="tcp"):
        for name, port in ports.items():
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                found[name] = psutil.Process(conn.pid)
    return found


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


async def _group_rate(
    settings: Settings,
    workers: list[Worker],
    group: str,
    topics: list[str],
    fill: Any,
    plan: ScalePlan,
) -> dict[str, Any]:
    """Start `workers` (one group), wait until each has its partitions, run `fill()` (the
    backlog), and measure the group's rate from its committed offsets."""
    import psutil

    for w in workers:
        await w.start()
    for w in workers:
        await w.wait_ready()
    await asyncio.sleep(SETTLE_S)
    backlog = await fill()
    procs = [psutil.Process(w.pid) for w in workers]
    servers = _servers(settings, SINK_REGION)
    async with Lag(settings.kafka_bootstrap_servers) as lag:
        left0 = await lag.of(group, topics)
        t0, cpu0 = time.monotonic(), _cpu_s(procs)
        server_cpu0 = {name: _cpu_s([p]) for name, p in servers.items()}
        if left0 < backlog * 0.3:
            raise BenchError(
                f"{group}: only {left0:,} of {backlog:,} records left when the fill ended; "
                "the window would be too short (a larger backlog?)"
            )
        left, t1 = left0, t0
        while time.monotonic() - t0 < plan.measure_s and left > left0 * WINDOW_ENDS_AT_LEFT:
            await asyncio.sleep(0.5)
            left, t1 = await lag.of(group, topics), time.monotonic()
        cpu1 = _cpu_s(procs)
        server_cpu = {
            name: (_cpu_s([p]) - server_cpu0[name]) / (t1 - t0) if t1 > t0 else math.nan
            for name, p in servers.items()
        }
        drained = left
        cap = time.monotonic() + plan.drain_cap_s
        while drained > 0 and time.monotonic() < cap:
            await asyncio.sleep(0.5)
            drained = await lag.of(group, topics)
    for w in workers:
        w.terminate()
    results = {w.name: await w.finish(wait_s=60) for w in workers}
    records = left0 - left
    return {
        "processes": len(workers),
        "backlog": backlog,
        "window_s": t1 - t0,
        "records": records,
        "rate": records / (t1 - t0) if t1 > t0 else math.nan,
        "cpu_us_per_record": (cpu1 - cpu0) * 1e6 / records if records else math.nan,
        # The group's processes and the shared servers, in cores busy over the window.
        "cores_busy": {"group": (cpu1 - cpu0) / (t1 - t0) if t1 > t0 else math.nan} | server_cpu,
        "left_after_drain": drained,
        "per_process": {
            name: {"records": next(iter(r["roles"].values()))["records"], "rss": r["peak_rss_mb"]}
            for name, r in results.items()
        },
    }


def _roles(name: str, prefix: str, spec: str, cores: list[int]) -> list[Worker]:
    return [
        Worker(f"{name}.{i + 1}", "roles", "--prefix", prefix, "--roles", spec, "--cpu", core)
        for i, core in enumerate(cores)
    ]


async def _mapper_group(
    plan: ScalePlan, run: str, topics: Topics, rep: int, n: int
) -> tuple[dict[str, Any], Settings, World]:
    """The mapper's group with `n` processes on a fresh backlog; it is drained to the end,
    so its command topics hold the mapper's whole output (for the world, as it is after)."""
    prefix = f"bench-{run}-x{rep}m{n}"
    settings = await topics.create(prefix)
    world = World(f"{run}x{rep}m{n}")
    messages = encode_events(settings, world.events(plan.backlog))

    async def fill() -> int:
        await produce_all(settings, messages)
        return len(messages)

    result = await _group_rate(
        settings,
        _roles("mapper", prefix, "mapper", _cores(n)),
        settings.group_id("mapper"),
        settings.content_topics,
        fill,
        plan,
    )
    return result, settings, world


async def _sink_group(
    plan: ScalePlan,
    run: str,
    topics: Topics,
    rep: int,
    n: int,
    commands: list[Record],
    worlds: list[World],
) -> dict[str, Any]:
    """The eu-west Redis sink's group with `n` processes on a copy of the mapper's output
    for `worlds`' events, against those worlds' caches."""
    from redis.asyncio import Redis

    from cachesync.consumers.pipeline.kafka import make_producer

    prefix = f"bench-{run}-x{rep}s{n}"
    settings = await topics.create(prefix)
    topic = settings.commands_topic(SINK_REGION)
    redis = Redis.from_url(settings.region_redis_urls[SINK_REGION])

    async def fill() -> int:
        producer = make_producer(settings.kafka_bootstrap_servers, client_id="cachesync-bench-fill")
        await producer.start()
        try:
            await PartitionBatches(producer).send(
                [(topic, *_message(r)[1:]) for r in commands]  # the same record, its new topic
            )
        finally:
            await producer.stop()
        return len(commands)

    try:
        for world in worlds:
            await _fill_cache(redis, world.cache_entries())
        return await _group_rate(
            settings,
            _roles("sink", prefix, f"redis:{SINK_REGION}", _cores(n)),
            settings.group_id("sink", SINK_REGION, "redis"),
            [topic],
            fill,
            plan,
        )
    finally:
        await redis.aclose()


async def bench_groups(
    plan: ScalePlan, run: str, topics: Topics, say: Progress
) -> dict[str, list[dict[str, Any]]]:
    """Per repeat: the mapper's group with 1 then 2 processes, then the sink's."""
    out: dict[str, list[dict[str, Any]]] = {"mapper": [], "sink": []}
    for rep in range(plan.reps):
        mapper: dict[int, dict[str, Any]] = {}
        # The sink's backlog: what both mapper runs wrote for its region (distinct events,
        # so distinct commands), twice as long a window as one run's.
        commands: list[Record] = []
        worlds: list[World] = []
        for n in (1, 2):
            say(f"mapper group, {n} process(es), repeat {rep + 1}/{plan.reps}")
            mapper[n], settings, world = await _mapper_group(plan, run, topics, rep, n)
            say(f"  {_line(mapper[n], 'events')}")
            worlds.append(world)
            commands += await _read_back(settings, [settings.commands_topic(SINK_REGION)])
        out["mapper"].append({"one": mapper[1], "two": mapper[2]})
        sink: dict[int, dict[str, Any]] = {}
        for n in (1, 2):
            say(
                f"{SINK_REGION} Redis sink group, {n} process(es), {len(commands):,} commands, "
                f"repeat {rep + 1}/{plan.reps}"
            )
            sink[n] = await _sink_group(plan, run, topics, rep, n, commands, worlds)
            say(f"  {_line(sink[n], 'commands')}")
        out["sink"].append({"one": sink[1], "two": sink[2]})
    return out


def _line(r: dict[str, Any], unit: str) -> str:
    per = ", ".join(f"{k} {v['records']:,}" for k, v in r["per_process"].items())
    return (
        f"{r['rate']:,.0f} {unit}/s over {r['window_s']:.1f}s, "
        f"{r['cpu_us_per_record']:.0f} us CPU per record; records per process: {per}; "
        f"cores busy: {_cores_busy(r)}"
    )


def _cores_busy(r: dict[str, Any]) -> str:
    return ", ".join(f"{name} {cores:.2f}" for name, cores in r["cores_busy"].items())


# -- the rebalance ---------------------------------------------------------------------


@dataclass
class Step:
    at_s: float  # seconds into the load
    what: str


async def bench_rebalance(
    plan: ScalePlan, run: str, topics: Topics, say: Progress
) -> dict[str, Any]:
    """Steady load through the mapper and 3 Redis sinks; a second mapper and a second
    eu-west sink join, then the first of each leaves; then the order checks."""
    prefix = f"bench-{run}-r"
    settings = await topics.create(prefix)
    regions = list(settings.topology.regions)

    def worker(name: str, spec: str) -> Worker:
        return Worker(name, "roles", "--prefix", prefix, "--roles", spec)

    first = [worker("mapper.1", "mapper"), worker(f"sink.{SINK_REGION}.1", f"redis:{SINK_REGION}")]
    others = [worker(f"sink.{r}", f"redis:{r}") for r in regions if r != SINK_REGION]
    second = [worker("mapper.2", "mapper"), worker(f"sink.{SINK_REGION}.2", f"redis:{SINK_REGION}")]
    results: dict[str, dict[str, Any]] = {}
    steps: list[Step] = []
    for w in [*first, *others]:
        await w.start()
    for w in [*first, *others]:
        await w.wait_ready()
    rate, seconds = plan.rebalance_rate, plan.rebalance_seconds
    events = World(f"{run}r").events(int(rate * seconds))
    started = time.monotonic()

    def step(what: str) -> None:
        steps.append(Step(time.monotonic() - started, what))
        say(f"  {steps[-1].at_s:5.1f}s: {what}")

    async def choreography() -> None:
        # Fixed waits between the moves, whatever a process takes to start: each move
        # happens with events flowing, and the load lasts past the last one (checked).
        await asyncio.sleep(seconds * REBALANCE_AFTER)
        step("mapper.2 and sink.eu-west.2 start (join their groups)")
        for w in second:
            await w.start()
        for w in second:
            await w.wait_ready()
        step("mapper.2 and sink.eu-west.2 have partitions")
        await asyncio.sleep(seconds * REBALANCE_AFTER)
        step("mapper.1 and sink.eu-west.1 stop (SIGTERM: leave their groups)")
        for w in first:
            w.terminate()
        for w in first:
            results[w.name] = await w.finish(wait_s=60)
        step("mapper.1 and sink.eu-west.1 have left")

    say(f"rebalance under load: {len(events):,} events at {rate}/s")
    moves = asyncio.create_task(choreography())
    load = await _produce_steadily(settings, events, rate, 0)
    step("load done")
    await moves
    mid_stream = steps[-1].what == "load done"
    if not mid_stream:
        step("(the groups changed after the load ended: a longer --rebalance-seconds)")
    await _wait_drained(settings, regions, plan.drain_cap_s)
    step("drained" if await _is_drained(settings, regions) else "NOT drained")
    for w in [*second, *others]:
        w.terminate()
    for w in [*second, *others]:
        results[w.name] = await w.finish(wait_s=60)
    order = await check_order(settings, regions)
    handled = {name: next(iter(r["roles"].values()))["records"] for name, r in results.items()}
    series, incomplete = _latency_series(load, await _applied_at(settings), regions)
    latencies = [lat for _, lat in series] + [math.inf] * incomplete
    out = {
        "rate": rate,
        "seconds": seconds,
        "events": len(events),
        "send_rate": len(events) / load.sent_seconds,
        "steps": [asdict(s) for s in steps],
        "mid_stream": mid_stream,
        "records_per_process": handled,
        # Records handled beyond those on the topics: batches a process handled and could
        # not commit before its partitions moved, handled again by the next owner.
        "redone": {
            "mapper": sum(n for k, n in handled.items() if k.startswith("mapper")) - len(events),
            f"sink {SINK_REGION}": sum(
                n for k, n in handled.items() if k.startswith(f"sink.{SINK_REGION}.")
            )
            - order[SINK_REGION]["records"],
        },
        "latency_ms": _quantiles(latencies),
        "latency_by_phase": _phases(series, steps),
        "order": order,
    }
    say(f"  order: {_order_line(order)}")
    return out


def _quantiles(latencies: list[float]) -> dict[str, float]:
    return {
        "events": len(latencies),
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies) if latencies else math.nan,
    }


def _phases(series: list[tuple[float, float]], steps: list[Step]) -> dict[str, dict[str, float]]:
    """End-to-end latency of the events produced in each phase of the rebalance: what a
    process joining or leaving costs the events in flight (a phase runs to the next move)."""
    at = {st.what.split(" (")[0]: st.at_s for st in steps}
    bounds = [
        ("one process each", 0.0),
        ("second ones joining", at.get("mapper.2 and sink.eu-west.2 start", math.inf)),
        ("two processes each", at.get("mapper.2 and sink.eu-west.2 have partitions", math.inf)),
        ("first ones leaving", at.get("mapper.1 and sink.eu-west.1 stop", math.inf)),
        ("one process each again", at.get("mapper.1 and sink.eu-west.1 have left", math.inf)),
    ]
    out: dict[str, dict[str, float]] = {}
    for i, (name, start) in enumerate(bounds):
        end = bounds[i + 1][1] if i + 1 < len(bounds) else math.inf
        out[name] = _quantiles([lat for t, lat in series if start <= t < end])
    return out


async def _is_drained(settings: Settings, regions: list[str]) -> bool:
    async with Lag(settings.kafka_bootstrap_servers) as lag:
        return await lag.drained(settings, regions)


@dataclass
class Issued:
    """A purge at its first occurrence on its command partition."""

    command: PurgeCommand
    offset: int
    origin: tuple[str, int, int]  # its event: content topic, partition, offset


async def check_order(settings: Settings, regions: list[str]) -> dict[str, Any]:
    """Per-entity order, from the topics and the caches (see the module's docstring)."""
    from redis.asyncio import Redis

    from cachesync.consumers.commands import PurgeCommand
    from cachesync.consumers.pipeline.codecs import close_codec, codec_for, start_codec

    codec = codec_for(settings)
    await start_codec(codec)
    try:
        where: dict[str, tuple[str, int, int]] = {}
        for r in await _read_back(settings, settings.content_topics):
            await codec.resolve(r.value or b"")
            where[str(codec.decode(r.value or b"").record["event_id"])] = (
                r.topic,
                r.partition,
                r.offset,
            )
        out: dict[str, Any] = {}
        for region in regions:
            # Per entity, its purges at their first occurrence, in partition order (one
            # entity is on one partition: the command's key is its entity).
            by_entity: dict[str, list[Issued]] = defaultdict(list)
            seen: set[str] = set()
            copies = 0
            records = await _read_back(settings, [settings.commands_topic(region)])
            for r in sorted(records, key=lambda r: (r.partition, r.offset)):
                await codec.resolve(r.value or b"")
                decoded = codec.decode(r.value or b"")
                if decoded.type_name != "purge":
                    continue
                cmd = PurgeCommand.from_record(decoded.record)
                if cmd.command_id in seen:
                    copies += 1
                    continue
                seen.add(cmd.command_id)
                by_entity[cmd.entity].append(Issued(cmd, r.offset, where[cmd.origin_event_id]))
            redis = Redis.from_url(settings.region_redis_urls[region])
            try:
                out[region] = await check_region(redis, by_entity, copies)
                out[region]["records"] = len(records)
            finally:
                await redis.aclose()
        return out
    finally:
        await close_codec(codec)


async def check_region(
    redis: Redis, by_entity: dict[str, list[Issued]], copies: int
) -> dict[str, Any]:
    """One region: per entity (its purges in partition order), each purge's event after
    the previous one's in their content partition, each applied (its marker), never before
    the previous purge of its entity, and the entity's fence at its newest version."""
    issued = [i for seq in by_entity.values() for i in seq]
    markers: dict[str, int | None] = {}
    for chunk in range(0, len(issued), 2000):
        part = issued[chunk : chunk + 2000]
        values = await redis.mget([keys.applied("redis", i.command.command_id) for i in part])
        for i, v in zip(part, values, strict=True):
            markers[i.command.command_id] = int(v) if v is not None else None
    entities = list(by_entity)
    fences: dict[str, int | None] = {}
    for chunk in range(0, len(entities), 2000):
        part_e = entities[chunk : chunk + 2000]
        values = await redis.mget([keys.purge_version("redis", e) for e in part_e])
        fences.update(
            {e: int(v) if v is not None else None for e, v in zip(part_e, values, strict=True)}
        )
    mapper_out_of_order: list[str] = []
    applied_out_of_order: list[str] = []
    unapplied = [i.command.command_id for i in issued if markers[i.command.command_id] is None]
    fence_wrong: list[str] = []
    for entity, seq in by_entity.items():
        last_origin: dict[tuple[str, int], int] = {}
        last_applied: tuple[int, Issued] | None = None
        for i in seq:
            topic, partition, offset = i.origin
            before = last_origin.get((topic, partition))
            if before is not None and offset < before:
                mapper_out_of_order.append(
                    f"{entity}: event at {topic}[{partition}]@{offset} issued after @{before}"
                )
            last_origin[(topic, partition)] = offset
            at = markers[i.command.command_id]
            if at is None:
                continue
            if last_applied is not None and at < last_applied[0]:
                prev = last_applied[1]
                applied_out_of_order.append(
                    f"{entity}: @{i.offset} applied at {at}, before @{prev.offset} "
                    f"(applied at {last_applied[0]})"
                )
            if last_applied is None or at >= last_applied[0]:
                last_applied = (at, i)
        newest = max(i.command.version for i in seq)
        if fences[entity] != newest:
            fence_wrong.append(f"{entity}: fence {fences[entity]}, newest purge {newest}")
    return {
        "purges": len(issued),
        "entities": len(by_entity),
        "copies": copies,
        "mapper_out_of_order": len(mapper_out_of_order),
        "applied_out_of_order": len(applied_out_of_order),
        "unapplied": len(unapplied),
        "fence_wrong": len(fence_wrong),
        "examples": (mapper_out_of_order + applied_out_of_order + fence_wrong)[:10]
        + [f"never applied: {c}" for c in unapplied[:5]],
    }


def order_holds(order: dict[str, Any]) -> bool:
    """No purge issued or applied out of its entity's order, none lost, every fence right."""
    return all(
        r["mapper_out_of_order"] == r["applied_out_of_order"] == r["unapplied"] == 0
        and r["fence_wrong"] == 0
        and r["purges"] > 0
        for r in order.values()
    )


def _order_line(order: dict[str, Any]) -> str:
    held = "held" if order_holds(order) else "VIOLATED"
    parts = [
        f"{region} {r['purges']:,} purges / {r['entities']:,} entities, {r['copies']} copies, "
        f"{r['mapper_out_of_order']}+{r['applied_out_of_order']} out of order, "
        f"{r['unapplied']} unapplied, {r['fence_wrong']} fences wrong"
        for region, r in order.items()
    ]
    return f"{held}: " + "; ".join(parts)


# -- the run and its report -------------------------------------------------------------


def summarize(groups: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out: dict[str, Any] = {}
    for stage, reps in groups.items():
        out[stage] = {
            "one": med([r["one"]["rate"] for r in reps]),
            "two": med([r["two"]["rate"] for r in reps]),
            "speedup": med([r["two"]["rate"] / r["one"]["rate"] for r in reps]),
            "cpu_us_one": med([r["one"]["cpu_us_per_record"] for r in reps]),
            "cpu_us_two": med([r["two"]["cpu_us_per_record"] for r in reps]),
            # Of the median repeat's run with two processes (by rate).
            "cores_busy_two": sorted(reps, key=lambda r: r["two"]["rate"])[len(reps) // 2]["two"][
                "cores_busy"
            ],
        }
    return out


async def run_scale(plan: ScalePlan, smoke: bool) -> dict[str, Any]:

    stack_env()
    run = uuid.uuid4().hex[:8]
    say = Progress()
    out: dict[str, Any] = {
        "run": run,
        "commit": measured_commit(),
        "smoke": smoke,
        "plan": asdict(plan),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "usable": sorted(os.sched_getaffinity(0)),
            # The machine is shared: how busy it was, at the start and at the end.
            "load_average": [os.getloadavg()[0]],
        },
    }
    async with _scenarios(run) as topics:
        out["groups"] = await bench_groups(plan, run, topics, say)
        out["summary"] = summarize(out["groups"])
        out["rebalance"] = await bench_rebalance(plan, run, topics, say)
    out["order_holds"] = order_holds(out["rebalance"]["order"]) and out["rebalance"]["mid_stream"]
    out["machine"]["load_average"].append(os.getloadavg()[0])
    out["seconds"] = say.elapsed()
    return out


def _spread(s: dict[str, float], digits: int = 0) -> str:
    if s["min"] == s["max"]:
        return f"{s['median']:,.{digits}f}"
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def _loads(out: dict[str, Any]) -> str:
    """The 1-minute load average at the start and the end: a shared machine says so."""
    return " → ".join(f"{x:.1f}" for x in out["machine"]["load_average"])


def markdown(out: dict[str, Any]) -> str:
    s, reb = out["summary"], out["rebalance"]
    lines = [
        "# Scale-out: 1 and 2 processes per consumer group",
        "",
        f"Commit `{out['commit']}`, run `{out['run']}`, {out['started_at']}, "
        f"{out['machine']['cpus']} CPUs (load average {_loads(out)}); "
        f"{out['plan']['reps']} repeat(s), median (min-max). "
        "`python -m bench --only scale` (bench/scale_out.py).",
        "",
        "| group | 1 process | 2 processes | speed-up | CPU per record, 1 → 2 (us) | cores busy "
        "with 2 processes |",
        "|---|---|---|---|---|---|",
    ]
    for stage, label, unit in (
        ("mapper", "mapper (content topics, 18 partitions)", "events/s"),
        ("sink", f"Redis sink {SINK_REGION} (6 partitions)", "commands/s"),
    ):
        f = s[stage]
        lines.append(
            f"| {label} | {_spread(f['one'])} {unit} | {_spread(f['two'])} {unit} | "
            f"x{_spread(f['speedup'], 2)} | {f['cpu_us_one']['median']:,.0f} → "
            f"{f['cpu_us_two']['median']:,.0f} | {_cores_busy({'cores_busy': f['cores_busy_two']})} |"
        )
    lines += [
        "",
        "One process is pinned to one core, two to one core each; Kafka, Redis and the",
        "harness share those cores. Rates are the group's, from its committed offsets; cores",
        "busy is CPU time over the window: the group's processes, the broker, the region's Redis.",
        "",
        f"## Rebalance under load ({reb['events']:,} events at {reb['rate']}/s)",
        "",
        *(f"- {st['at_s']:.1f} s: {st['what']}" for st in reb["steps"]),
        "",
        "Records handled per process: "
        + ", ".join(f"{k} {v:,}" for k, v in reb["records_per_process"].items())
        + "; handled again after their partition moved: "
        + ", ".join(f"{k} {v:,}" for k, v in reb["redone"].items())
        + ".",
        f"End-to-end latency (event produced → purge applied in all 3 regions): p50 "
        f"{reb['latency_ms']['p50']:,.0f} ms, p99 {reb['latency_ms']['p99']:,.0f} ms, max "
        f"{reb['latency_ms']['max']:,.0f} ms; by phase (events produced in it):",
        "",
        "| phase | events | p50 (ms) | p99 (ms) | max (ms) |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {q['events']:,} | {q['p50']:,.0f} | {q['p99']:,.0f} | {q['max']:,.0f} |"
            for name, q in reb["latency_by_phase"].items()
        ),
        "",
        "| region | purges | entities | copies on the topic | issued out of order | "
        "applied out of order | never applied | fence ≠ newest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for region, r in reb["order"].items():
        lines.append(
            f"| {region} | {r['purges']:,} | {r['entities']:,} | {r['copies']:,} | "
            f"{r['mapper_out_of_order']} | {r['applied_out_of_order']} | {r['unapplied']} | "
            f"{r['fence_wrong']} |"
        )
    held = order_holds(reb["order"])
    lines += ["", f"Per-entity order {'held' if held else '**violated**'}."]
    if not reb["mid_stream"]:
        lines.append("**The groups changed after the load ended: this run proves nothing.**")
    examples = [e for r in reb["order"].values() for e in r["examples"]]
    if examples:
        lines += ["", *(f"- `{e}`" for e in examples[:20])]
    return "\n".join(lines) + "\n"


def write_results(out: dict[str, Any]) -> str:
    """bench/results/scale_out.{json,md}; a smoke run's go to a temp folder instead."""
    import json
    import tempfile
    from pathlib import Path

    from bench.common import RESULTS
    from bench.harness import _finite

    folder = Path(tempfile.mkdtemp(prefix="bench-scale-")) if out["smoke"] else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scale_out.json").write_text(json.dumps(_finite(out), indent=2) + "\n")
    (folder / "scale_out.md").write_text(markdown(out))
    return str(folder)


def cli(*, smoke: bool, reps: int | None) -> bool:
    """`python -m bench --only scale`: run, print, write; False if an order check failed."""
    from dataclasses import replace

    plan = SMOKE if smoke else FULL
    if reps is not None:
        plan = replace(plan, reps=reps)
    try:
        out = asyncio.run(run_scale(plan, smoke))
    except BenchError as exc:
        print(f"bench failed: {exc}")
        return False
    print()
    print(markdown(out))
    folder = write_results(out)
    print(f"written: {folder}/scale_out.json, scale_out.md ({out['seconds']:.0f}s)")
    return bool(out["order_holds"])
