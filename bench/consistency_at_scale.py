"""The long mode: a million purges through the mapper and the 3 Redis sinks, judged by read-backs.

    make bench-long                                                  # 1,000,000 purges
    .venv/bin/python -m bench.consistency_at_scale --purges 30000    # a quick check
    .venv/bin/python -m bench --only consistency --purges 30000      # the same

Not part of `make test` or `make bench`. Events of the demo's mix (bench/common.py
`World`) go out at a steady rate, about one purge per region per event, through the
mapper and one Redis sink per region, each a process of its own (`bench.worker roles`,
as bench/harness.py's pipeline). The verdict is the consistency checker's, in a process
of its own (bench/consistency_oracle.py): each purge is *converged within the window*
(1 s) if the region's Redis sink applied it within the window of the mapper issuing it
and a read-back of the region's Redis at the window's end finds no copy older than the
event, among the keys it names and the keys under its tags. The result is the share
converged, in nines (-log10 of the share not converged), per region.

So that a read-back can see a stale copy, every purge hits one: before each event goes
out, the platform's readers (`Visits`) make sure each key its rule names, and one entry
under each tag it names, is cached in every region, written through the platform's own
`cache_put_many` and stamped (`keys.WRITTEN_AT`) before the event's `occurred_at`. Only
missing entries are written, as a read-through cache fills on a miss: a copy a purge
failed to remove is never overwritten by a fresher one, so it stays visible to the
checker until a later purge of the same key removes it. (The checker judges the cache as
it finds it: one that falls far behind could miss such a copy; the report says how late
it judged.) `--plant N` is the negative control: N stale copies written back after their
purge was applied, which the checker must report (bench/consistency_at_scale.py
`Planter`; such a run's results go to a temp folder).

Results: bench/results/consistency_at_scale.{json,md}, naming the commit measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import (
    RESULTS,
    World,
    encode_events,
    measured_commit,
    now_ms,
    one_command_app,
    platform_trace,
    stack_env,
    tagged,
)
from bench.harness import BenchError, Lag, Progress, Worker, _finite, _pipeline, _scenarios
from cachesync.consumers import keys
from cachesync.consumers.ops.platform_cache import cache_put_many
from cachesync.topology.templates import render_all

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from redis.asyncio import Redis

    from cachesync.consumers.settings import Settings
    from cachesync.topology.model import Topology

DEFAULT_PURGES = 1_000_000
SMOKE_PURGES = 15_000  # `python -m bench --only consistency --smoke`
# Weddings in the world: its opening events (each published, its vendors linked: about
# 5.5 per wedding) are under 2 % of a full run's events.
DEFAULT_WEDDINGS = 1000
# Events per second: what the pipeline (4 processes), the load, the checker, Kafka and
# the three Redis share on this machine's 2 cores. A parameter (--rate).
DEFAULT_RATE = 500
# Entries live this long: longer than any run's window and re-reads, so none expires
# under the checker's eyes (a copy that expired would look purged).
ENTRY_TTL_S = 3600
# At most this many events per tick of the load: one visit (2 round trips per region)
# covers them all.
MAX_TICK = 200
PROGRESS_EVERY_S = 10.0
# After the load, the pipeline has this long to commit everything; what is applied later
# than that is judged as it stands (late, so not converged).
DRAIN_CAP_S = 600.0
# The control's planter waits this long for a purge to be applied before giving up on it.
PLANT_WAIT_S = 30.0
PLANT_REGION = "us-east"
# The target the issue sets.
TARGET_NINES = 6.0


@dataclass(frozen=True)
class LongPlan:
    purges: int
    rate: int
    weddings: int
    window_s: float
    give_up_s: float
    drain_cap_s: float
    plant: int = 0  # the control: stale copies planted in PLANT_REGION (0: none)


@dataclass
class LoadStats:
    events: int = 0
    started: float = 0.0  # monotonic
    seconds: float = 0.0
    max_behind_s: float = 0.0
    visits: int = 0
    entries_written: int = 0  # missing before an event: written and stamped
    entries_present: int = 0  # still there from before (a copy the purge must remove)
    cpu_s: float = 0.0  # the load's own CPU time (this process): whether it was the limit


class Visits:
    """The platform's readers: before an event goes out, each entry its purge will hit is
    cached in every region, stamped before the event (see the module's docstring)."""

    def __init__(self, topology: Topology, world: World, regions: dict[str, Redis]) -> None:
        self.topology = topology
        self.world = world
        self.regions = regions

    def entries(
        self, event_type: str, raw: dict[str, Any], record: dict[str, Any]
    ) -> dict[str, list[str]]:
        """Cache key -> its tags: the keys the event's rule purges, one entry per tag it
        purges, and for a vendor's fan-out, the same for each wedding the vendor serves."""
        rule = self.topology.rules.get(event_type)
        if rule is None:
            return {}
        fields = [record]
        if rule.fanout == "vendor_weddings" and rule.per_wedding is not None:
            vendor = raw["vendor_id"]
            fields += [
                {**record, "wedding_id": tagged(w.wedding_id, self.world.tag)}
                for w in self.world.demo.weddings
                if vendor in w.vendors
            ]
        out: dict[str, list[str]] = {}
        for i, f in enumerate(fields):
            template = rule.purge if i == 0 else rule.per_wedding
            assert template is not None
            for key in render_all(template.keys, f):
                out.setdefault(key, [])
            for tag in render_all(template.tags, f):
                out.setdefault(f"bench:tagged:{tag}", []).append(tag)
        return out

    async def visit(self, entries: dict[str, list[str]], stats: LoadStats) -> int:
        """Write every missing entry in every region, stamped now; returns the stamp."""
        stamp = now_ms()
        names = list(entries)
        counts = await asyncio.gather(
            *(self._fill(redis, names, entries, stamp) for redis in self.regions.values())
        )
        stats.visits += 1
        stats.entries_written += sum(c for c, _ in counts)
        stats.entries_present += sum(p for _, p in counts)
        return stamp

    @staticmethod
    async def _fill(
        redis: Redis, names: list[str], entries: dict[str, list[str]], stamp: int
    ) -> tuple[int, int]:
        pipe = redis.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        present = await pipe.execute()
        missing = [(n, b"cached", entries[n]) for n, p in zip(names, present, strict=True) if not p]
        if missing:
            await cache_put_many(redis, missing, ttl_s=ENTRY_TTL_S, written_at_ms=stamp)
        return len(missing), len(names) - len(missing)


class Planter:
    """A control (`--plant N`): once the purge of one event in every `every` is applied in
    `region`'s Redis (its event marker, `keys.applied_event`), one of the entries the event
    hit is written back with the stamp of its visit, from before the event: a stale copy
    the checker must find. It shows the read-back can fail, and costs that region's nines,
    so the run that measures them plants none."""

    def __init__(self, redis: Redis, region: str, every: int) -> None:
        self.redis = redis
        self.region = region
        self.every = every
        self.planted: list[str] = []  # event ids
        self.not_applied = 0  # purges not applied within PLANT_WAIT_S: nothing planted
        self._tasks: set[asyncio.Task[None]] = set()

    def after(self, index: int, event_id: str, entry: tuple[str, list[str]], stamp: int) -> None:
        if self.every and index % self.every == self.every - 1:
            task = asyncio.create_task(self._plant(event_id, entry, stamp))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _plant(self, event_id: str, entry: tuple[str, list[str]], stamp: int) -> None:
        marker = keys.applied_event("redis", event_id)
        deadline = time.monotonic() + PLANT_WAIT_S
        while time.monotonic() < deadline:
            if await self.redis.exists(marker):
                name, tags = entry
                await cache_put_many(
                    self.redis, [(name, b"stale", tags)], ttl_s=ENTRY_TTL_S, written_at_ms=stamp
                )
                self.planted.append(event_id)
                return
            await asyncio.sleep(0.02)
        self.not_applied += 1

    async def close(self) -> None:
        await asyncio.gather(*self._tasks)


def _events(world: World) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(type, the demo's record, the record with the run's ids): the opening events, then
    the mix, made as they go out (the world's state is the one the event saw)."""
    demo = world.demo
    for event_type, raw in demo.opening_events():
        yield event_type, raw, {k: tagged(v, world.tag) for k, v in raw.items()}
    while True:
        event_type, raw = demo.next_event()
        yield event_type, raw, {k: tagged(v, world.tag) for k, v in raw.items()}


async def produce_visited(
    settings: Settings,
    producer: AIOKafkaProducer,
    visits: Visits,
    events: int,
    rate: int,
    stats: LoadStats,
    report: Callable[[], Awaitable[None]],
    planter: Planter | None = None,
) -> None:
    """`events` events at `rate`/s, each visited in the caches just before it goes out."""
    from cachesync.consumers.pipeline.codecs import codec_for

    codec = codec_for(settings)
    source = _events(visits.world)
    started = stats.started = time.monotonic()
    cpu = time.process_time()
    last_report = started
    pending: list[asyncio.Future[Any]] = []
    while stats.events < events:
        elapsed = time.monotonic() - started
        due = min(events, int(elapsed * rate) + 1) - stats.events
        if due <= 0:
            await asyncio.sleep((stats.events + 1) / rate - elapsed)
            continue
        stats.max_behind_s = max(stats.max_behind_s, elapsed - stats.events / rate)
        batch = [next(source) for _ in range(min(due, MAX_TICK))]
        entries: dict[str, list[str]] = {}
        hit: list[dict[str, list[str]]] = []
        for event_type, raw, record in batch:
            hit.append(visits.entries(event_type, raw, record))
            for name, tags in hit[-1].items():
                known = entries.setdefault(name, [])
                known += [t for t in tags if t not in known]
        stamp = await visits.visit(entries, stats)
        # Strictly after the stamp: a copy written at the stamp is older than the event.
        occurred = max(now_ms(), stamp + 1)
        for i, (event_type, _, record) in enumerate(batch):
            record["occurred_at"] = occurred
            ((topic, key, value),) = encode_events(settings, [(event_type, record)], codec=codec)
            pending.append(
                await producer.send(topic, value=value, key=key, headers=platform_trace())
            )
            if planter is not None and hit[i]:
                entry = next(iter(hit[i].items()))
                planter.after(stats.events + i, str(record["event_id"]), entry, stamp)
        stats.events += len(batch)
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending = []
        if time.monotonic() - last_report > PROGRESS_EVERY_S:
            last_report = time.monotonic()
            await report()
    await asyncio.gather(*pending)
    stats.seconds = time.monotonic() - started
    stats.cpu_s = time.process_time() - cpu


async def _drain(settings: Settings, regions: list[str], cap_s: float) -> float | None:
    """Seconds until the mapper and every sink committed everything; None: not within cap_s."""
    started = time.monotonic()
    async with Lag(settings.kafka_bootstrap_servers) as lag:
        while time.monotonic() - started < cap_s:
            if await lag.drained(settings, regions):
                return time.monotonic() - started
            await asyncio.sleep(0.5)
    return None


def _read_progress(path: str) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        loaded: dict[str, Any] = json.loads(Path(path).read_text())
        return loaded
    return {}


async def run_long(plan: LongPlan) -> dict[str, Any]:
    from redis.asyncio import Redis

    from cachesync.consumers.pipeline.kafka import make_producer

    stack_env()
    run = uuid.uuid4().hex[:8]
    say = Progress()
    out: dict[str, Any] = {
        "run": run,
        "commit": measured_commit(),
        "plan": asdict(plan),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # The machine is shared: how busy it was (1-minute load average), at the start
        # and at the end.
        "machine": {"cpus": os.cpu_count(), "load_average": [os.getloadavg()[0]]},
    }
    progress_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (removed at the end)
        prefix="bench-oracle-", suffix=".json", delete=False
    )
    progress_file.close()
    async with _scenarios(run) as topics:
        prefix = f"bench-{run}-long"
        settings = await topics.create(prefix)
        regions = list(settings.topology.regions)
        events = math.ceil(plan.purges / len(regions))
        # The load's length, the drain cap and room for the checker's backlog: the 1,000,000
        # purge run outlasted the workers' default 600 s cap, and its pipeline stopped at it.
        limit_s = events / plan.rate + plan.drain_cap_s + 600
        pipeline = _pipeline(prefix, regions, limit_s=limit_s)
        since = now_ms()
        oracle = Worker(
            "oracle",
            "--prefix",
            prefix,
            "--since-ms",
            since,
            "--window-s",
            plan.window_s,
            "--give-up-s",
            plan.give_up_s,
            "--progress",
            progress_file.name,
            module="bench.consistency_oracle",
        )
        for w in [*pipeline, oracle]:
            await w.start()
        for w in [*pipeline, oracle]:
            await w.wait_ready()
        caches = {r: Redis.from_url(u) for r, u in settings.region_redis_urls.items()}
        producer = make_producer(settings.kafka_bootstrap_servers, client_id="cachesync-bench-load")
        stats = LoadStats()
        world = World(f"{run}c", weddings=plan.weddings)

        async def report() -> None:
            p = _read_progress(progress_file.name)
            async with Lag(settings.kafka_bootstrap_servers) as lag:
                behind = await lag.of(settings.group_id("mapper"), settings.content_topics)
            rate = stats.events / max(time.monotonic() - stats.started, 1e-6)
            say(
                f"  {stats.events:,}/{events:,} events ({rate:,.0f}/s, at worst "
                f"{stats.max_behind_s:.1f}s behind); mapper lag {behind:,}; "
                f"checker: {p.get('probed', 0):,} judged, {p.get('stale', 0):,} not converged, "
                f"{p.get('pending', 0):,} waiting"
            )

        say(
            f"{events:,} events at {plan.rate}/s (about {events * len(regions):,} purges), "
            f"{plan.weddings:,} weddings; window {plan.window_s:g}s"
        )
        await producer.start()
        try:
            visits = Visits(settings.topology, world, caches)
            planter = None
            if plan.plant:
                planter = Planter(caches[PLANT_REGION], PLANT_REGION, max(1, events // plan.plant))
            await produce_visited(
                settings, producer, visits, events, plan.rate, stats, report, planter
            )
            if planter is not None:
                await planter.close()
                out["control"] = {
                    "region": PLANT_REGION,
                    "planted": len(planter.planted),
                    "not_applied": planter.not_applied,
                }
        finally:
            await producer.stop()
            for redis in caches.values():
                await redis.aclose()
        say(f"load done in {stats.seconds:.0f}s; waiting for the pipeline to drain")
        drain_s = await _drain(settings, regions, plan.drain_cap_s)
        if drain_s is None:
            say(f"  not drained within {plan.drain_cap_s:.0f}s: judging what was applied")
        say("judging every purge (the checker's window, then its re-reads)")
        oracle.terminate()
        # A checker that fell behind judges its backlog now (it stops once it stalls).
        assert oracle.proc is not None
        while oracle.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(oracle.proc.wait()), PROGRESS_EVERY_S)
            if oracle.proc.returncode is None:
                p = _read_progress(progress_file.name)
                say(
                    f"  checker: {p.get('probed', 0):,} judged, {p.get('stale', 0):,} not "
                    f"converged, {p.get('pending', 0):,} waiting"
                )
        verdict = await oracle.finish(wait_s=60)
        for w in pipeline:
            w.terminate()
        processes = {w.name: await w.finish(wait_s=60) for w in pipeline}
    os.unlink(progress_file.name)
    out["load"] = asdict(stats) | {"achieved_rate": stats.events / stats.seconds}
    out["drain_s"] = drain_s
    out["oracle"] = {k: v for k, v in verdict.items() if k != "regions"}
    out["regions"] = verdict["regions"]
    out["overall"] = overall(verdict["regions"])
    out["peak_rss_mb"] = {n: r["peak_rss_mb"] for n, r in processes.items()} | {
        "oracle": verdict["peak_rss_mb"]
    }
    out["machine"]["load_average"].append(os.getloadavg()[0])
    out["seconds"] = say.elapsed()
    return out


def nines(probed: int, converged: int) -> float:
    """As the checker's Tally: -log10 of the share not converged; with none, log10(probed),
    the most that many probes can show."""
    if probed == 0:
        return 0.0
    stale = 1 - converged / probed
    return -math.log10(stale) if stale > 0 else math.log10(probed)


def overall(regions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    probed = sum(r["probed"] for r in regions.values())
    converged = sum(r["converged"] for r in regions.values())
    return {
        "probed": probed,
        "converged": converged,
        "share": converged / probed if probed else 0.0,
        "nines": nines(probed, converged),
        "stale": sum(r["stale"] for r in regions.values()),
        "recovered": sum(r["recovered"] for r in regions.values()),
        "gave_up": sum(r["gave_up"] for r in regions.values()),
        "unapplied": sum(r["unapplied"] for r in regions.values()),
    }


# -- the report ------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _s(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} s"


def _nines_cell(r: dict[str, Any]) -> str:
    if r["probed"] and r["converged"] == r["probed"]:
        return f"≥ {r['nines']:.2f} (none stale: the most {r['probed']:,} probes can show)"
    return f"{r['nines']:.2f}"


def _loads(out: dict[str, Any]) -> str:
    """The 1-minute load average at the start and the end: a shared machine says so."""
    return " → ".join(f"{x:.1f}" for x in out["machine"]["load_average"])


def _verdict(out: dict[str, Any]) -> str:
    """Met, missed, or not shown: with none stale, N probes show at most log10(N) nines
    (1,000,000 purges are about 333,000 per region: at most 5.52 nines each)."""
    regions = out["regions"].values()
    if any(r["converged"] < r["probed"] and r["nines"] < TARGET_NINES for r in regions):
        return "**no**"
    if all(r["nines"] >= TARGET_NINES for r in regions):
        return "yes, in every region"
    most = min(r["probed"] for r in regions)
    return (
        f"none stale, but not shown per region: {most:,} probes show at most "
        f"{math.log10(max(most, 1)):.2f} nines (about {10**TARGET_NINES:,.0f} per region "
        f"would); over all regions, {'yes' if out['overall']['nines'] >= TARGET_NINES else 'not shown either'}"
    )


def markdown(out: dict[str, Any]) -> str:
    plan, load = out["plan"], out["load"]
    window = f"{plan['window_s']:g} s"
    lines = [
        "# Consistency at scale",
        "",
        f"Commit `{out['commit']}`, run `{out['run']}`, {out['started_at']}, "
        f"{out['machine']['cpus']} CPUs (load average {_loads(out)}), "
        f"{out['seconds'] / 60:.1f} min. "
        f"`python -m bench.consistency_at_scale --purges {plan['purges']} --rate {plan['rate']}` "
        "(bench/consistency_at_scale.py; `make bench-long`).",
        "",
        f"{load['events']:,} events of the demo's mix over {plan['weddings']:,} weddings at "
        f"{plan['rate']:,}/s asked, {load['achieved_rate']:,.0f}/s achieved (at worst "
        f"{load['max_behind_s']:.1f} s behind schedule), through the mapper and one Redis sink "
        "per region, each a process of its own; drained "
        + (
            f"{out['drain_s']:.1f} s after the load"
            if out["drain_s"] is not None
            else "**not at all**"
        )
        + ". Before each event, every key its purge names and an entry under each tag "
        f"it names was cached and stamped in each region ({load['entries_written']:,} "
        f"entries written, {load['entries_present']:,} found still cached).",
        "",
        f"Converged within {window}: the region's Redis sink applied the purge within {window} "
        f"of the mapper issuing it, and the consistency checker's read-back of the region's "
        f"Redis at the end of that window found no copy older than the event. Target ≥ "
        f"{TARGET_NINES:g} nines.",
        "",
        f"| region | purges judged | converged within {window} | share | nines | missed "
        "(applied late / no report read by then / stale copy read back) | of those, recovered "
        "later / still stale | sink delay p50 / p99 / max (ms, issued → applied) | staleness "
        "p50 / p99 / p99.9 / max (ms, event → applied) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for region, r in out["regions"].items():
        missed, d, s = r["missed"], r["sink_delay_ms"], r["staleness_ms"]
        lines.append(
            f"| {region} | {r['probed']:,} | {r['converged']:,} | {r['share']:.6%} | "
            f"{_nines_cell(r)} | {r['probed'] - r['converged']:,} "
            f"({missed.get('applied after the window', 0):,} / "
            f"{missed.get('no applied report read by then', 0):,} / "
            f"{missed.get('stale copy read back', 0):,}) | {r['recovered']:,} / {r['gave_up']:,} | "
            f"{_ms(d['p50'])} / {_ms(d['p99'])} / {_ms(d['max'])} | {_ms(s['p50'])} / "
            f"{_ms(s['p99'])} / {_ms(s['p999'])} / {_ms(s['max'])} |"
        )
    o = out["overall"]
    lines.append(
        f"| all | {o['probed']:,} | {o['converged']:,} | {o['share']:.6%} | {_nines_cell(o)} | "
        f"{o['probed'] - o['converged']:,} | {o['recovered']:,} / {o['gave_up']:,} | | |"
    )
    late = out["oracle"]["judged_late_s"]
    unjudged = sum(r["unjudged_keys"] for r in out["regions"].values())
    lines += [
        "",
        f"The checker judged each purge p50 {_s(late['p50'])}, p99 {_s(late['p99'])}, max "
        f"{_s(late['max'])} after it was due (its window's end and the checker's 0.5 s grace; a "
        "late judgement that finds no report "
        f"counts as missed); unstamped keys seen: {unjudged:,}. CPU per event: the load "
        f"{load['cpu_s'] * 1e6 / max(load['events'], 1):,.0f} us (its visits included), the "
        f"checker {out['oracle']['cpu_s'] * 1e6 / max(load['events'], 1):,.0f} us.",
    ]
    if out["oracle"]["pending"]:
        lines += [
            "",
            f"**{out['oracle']['pending']:,} purges were never judged**: the checker stopped "
            "making progress after the load.",
        ]
    control = out.get("control")
    if control is not None:
        found = out["regions"][control["region"]]["missed"].get("stale copy read back", 0)
        lines += [
            "",
            f"**Control run**: {control['planted']:,} stale copies planted in "
            f"{control['region']} after their purge was applied ({control['not_applied']:,} "
            f"purges not applied in time to plant); the checker read back {found:,} stale "
            "copies there at first judgement (a later purge of the same key may remove a "
            "planted copy before its judgement). Its nines are not the pipeline's.",
        ]
    lines += ["", f"≥ {TARGET_NINES:g} nines: {_verdict(out)}."]
    examples = [
        f"{region}: {e['event_id']} ({e['reason']}): {', '.join(e['keys'][:3])}"
        for region, r in out["regions"].items()
        for e in r["stale_examples"][:5]
    ]
    if examples:
        lines += ["", "Not converged, first examples:", "", *(f"- `{e}`" for e in examples)]
    rss = ", ".join(f"{n} {v:.0f}" for n, v in out["peak_rss_mb"].items())
    lines += ["", f"Peak RSS (MB): {rss}."]
    return "\n".join(lines) + "\n"


def write_results(out: dict[str, Any]) -> Path:
    """bench/results/consistency_at_scale.{json,md}; a control run's (stale copies planted)
    go to a temp folder: its nines are not the pipeline's."""
    folder = Path(tempfile.mkdtemp(prefix="bench-long-")) if out["plan"]["plant"] else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "consistency_at_scale.json").write_text(json.dumps(_finite(out), indent=2) + "\n")
    (folder / "consistency_at_scale.md").write_text(markdown(out))
    return folder


def cli(
    *,
    smoke: bool = False,
    purges: int | None = None,
    rate: int = DEFAULT_RATE,
    weddings: int = DEFAULT_WEDDINGS,
    window_s: float = 1.0,
    give_up_s: float = 30.0,
    plant: int = 0,
) -> bool:
    """Run, print, write the results; False if the run could not complete."""
    size = purges if purges is not None else (SMOKE_PURGES if smoke else DEFAULT_PURGES)
    plan = LongPlan(
        purges=size,
        rate=rate,
        weddings=weddings,
        window_s=window_s,
        give_up_s=give_up_s,
        drain_cap_s=DRAIN_CAP_S,
        plant=plant,
    )
    try:
        out = asyncio.run(run_long(plan))
    except BenchError as exc:
        print(f"bench failed: {exc}")
        return False
    print()
    print(markdown(out))
    folder = write_results(out)
    print(
        f"written: {folder}/consistency_at_scale.json, consistency_at_scale.md "
        f"({out['seconds']:.0f}s)"
    )
    return True


app = one_command_app()


@app.command(help=(__doc__ or "").partition("\n")[0])
def main(
    purges: Annotated[int, typer.Option(help="purges to judge (3 per event)")] = DEFAULT_PURGES,
    rate: Annotated[int, typer.Option(help="events per second")] = DEFAULT_RATE,
    weddings: Annotated[int, typer.Option(help="weddings in the world")] = DEFAULT_WEDDINGS,
    window_s: Annotated[float, typer.Option(help="converged within this")] = 1.0,
    give_up_s: Annotated[float, typer.Option(help="re-read a stale one this long")] = 30.0,
    plant: Annotated[
        int,
        typer.Option(
            help="a control: plant this many stale copies in us-east after their purge "
            "(results to a temp folder)"
        ),
    ] = 0,
) -> None:
    import logging

    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    ok = cli(
        purges=purges,
        rate=rate,
        weddings=weddings,
        window_s=window_s,
        give_up_s=give_up_s,
        plant=plant,
    )
    if not ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
