"""The faults, one at a time: how each is injected, how long it lasts, and how it ends.

Each fault's `start` and `end` return a note for the report. A fault that cannot be
injected on this stack says why in `not_run` and is reported as not run, never faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from bench.chaos.pipeline import sink_name
from cachesync.consumers.pipeline.kafka import partitions_of

if TYPE_CHECKING:
    from bench.chaos.run import ChaosRun

Step = Callable[["ChaosRun"], Awaitable[str]]

FROZEN_REGION = "eu-west"
EMPTIED_REGION = "ap-southeast"
SINK_KINDS = ("redis", "cloudflare", "cloudfront", "http_purge", "warmer")
BIG_FANOUT = 50_000


async def _nothing(run: ChaosRun) -> str:
    return ""


@dataclass(frozen=True)
class Fault:
    name: str
    title: str
    hold_s: float  # from start to end
    start: Step = _nothing
    end: Step = _nothing
    poison_share: float = 0.0  # share of the records sent during the fault that are poison
    cap_s: float | None = None  # how long to wait for recovery, if not the plan's
    not_run: Callable[[ChaosRun], str | None] = field(default=lambda run: None)


# -- processes --------------------------------------------------------------------


def _kill_roles(names: Callable[[ChaosRun], list[str]]) -> tuple[Step, Step]:
    async def start(run: ChaosRun) -> str:
        killed = names(run)
        for name in killed:
            await run.pipeline.kill(name, signal.SIGKILL)
        return f"SIGKILL {', '.join(killed)}"

    async def end(run: ChaosRun) -> str:
        for name in names(run):
            await run.pipeline.restart(name)
        return "restarted"

    return start, end


def _sink_kill(kind: str) -> Fault:
    start, end = _kill_roles(lambda run: [sink_name(r, kind) for r in run.regions])
    return Fault(
        f"kill-{kind.replace('_', '-')}",
        f"SIGKILL of the {kind} sinks (all regions), restart",
        3,
        start,
        end,
    )


# -- the broker -----------------------------------------------------------------------


async def _broker_kill(run: ChaosRun) -> str:
    pid = run.stack.signal("kafka", signal.SIGKILL)
    return f"SIGKILL broker (PID {pid})"


async def _broker_restart(run: ChaosRun) -> str:
    t0 = time.monotonic()
    await run.stack.restart_services()
    return f"broker restarted, answering after {time.monotonic() - t0:.1f} s"


# -- a region's Redis -------------------------------------------------------------------


async def _freeze(run: ChaosRun) -> str:
    run.oracle.redis_down.add(FROZEN_REGION)  # the platform cannot write there either
    await asyncio.sleep(0.3)  # let the oracle's own writes in flight finish
    pid = run.stack.signal(f"redis-{FROZEN_REGION}", signal.SIGSTOP)
    return f"SIGSTOP redis {FROZEN_REGION} (PID {pid})"


async def _thaw(run: ChaosRun) -> str:
    run.stack.signal(f"redis-{FROZEN_REGION}", signal.SIGCONT)
    run.oracle.redis_down.discard(FROZEN_REGION)
    return "SIGCONT"


async def _empty_kill(run: ChaosRun) -> str:
    run.oracle.redis_down.add(EMPTIED_REGION)
    await asyncio.sleep(0.3)
    pid = run.stack.signal(f"redis-{EMPTIED_REGION}", signal.SIGKILL)
    return f"SIGKILL redis {EMPTIED_REGION} (PID {pid}); it keeps nothing on disk"


async def _empty_restart(run: ChaosRun) -> str:
    await run.stack.restart_services()
    run.oracle.redis_down.discard(EMPTIED_REGION)
    return (
        "restarted empty (keys armed before the restart went with it; "
        "the check holds for those armed after)"
    )


# -- CDN ------------------------------------------------------------------------------------


def _storm(seconds: float, share: float) -> tuple[Step, Step]:
    async def start(run: ChaosRun) -> str:
        run.cloudflare.storm(seconds, share)
        return f"{share:.0%} of Cloudflare purge calls answered 429/500/502/503 for {seconds:.0f} s"

    async def end(run: ChaosRun) -> str:
        run.cloudflare.calm()
        return f"{run.cloudflare.storm_answers} calls answered by the storm in all"

    return start, end


def _no_revocation(run: ChaosRun) -> str | None:
    if run.cloudflare.revocation() is None:
        return "not run: needs token revocation in the Cloudflare stand-in"
    return None


async def _revoke(run: ChaosRun) -> str:
    got = run.cloudflare.revocation()
    assert got is not None
    got[0]()
    return (
        "Cloudflare token revoked (the stand-in answers 403, code 10000); CloudFront's are "
        "not: moto does not check AWS credentials"
    )


async def _restore(run: ChaosRun) -> str:
    got = run.cloudflare.revocation()
    assert got is not None
    got[1]()
    return "token restored"


# -- the dead-letter topic --------------------------------------------------------------


class DeadLetterOutage:
    """The dead-letter topic refuses writes: `min.insync.replicas=2` on a one-broker cluster,
    so every acks=all produce to it fails with NOT_ENOUGH_REPLICAS (retriable), while the
    topic and what it holds stay. Set again every second: a role that restarts applies the
    topology's topic configs (`topology apply`), which would undo it."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.reapplied = 0

    async def _configs(self, run: ChaosRun, *, outage: bool) -> None:
        spec = run.settings.topology.topics.dead_letter
        configs = {"cleanup.policy": "delete"}
        if spec.retention_ms is not None:
            configs["retention.ms"] = str(spec.retention_ms)
        if outage:
            configs["min.insync.replicas"] = "2"
        admin = AIOKafkaAdminClient(bootstrap_servers=run.stack.bootstrap, client_id="chaos")
        await admin.start()
        try:
            await admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, run.settings.dead_letter_topic, configs)]
            )
        finally:
            await admin.close()

    async def start(self, run: ChaosRun) -> str:
        await self._configs(run, outage=True)

        async def hold() -> None:
            while True:
                await asyncio.sleep(1.0)
                with contextlib.suppress(Exception):
                    await self._configs(run, outage=True)
                    self.reapplied += 1

        self.task = asyncio.create_task(hold())
        return f"{run.settings.dead_letter_topic}: min.insync.replicas=2 (1 broker): writes refused"

    async def end(self, run: ChaosRun) -> str:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self._configs(run, outage=False)
        return "writes accepted again"


# -- the consumer group, the big fan-out -------------------------------------------------


async def _second_mapper(run: ChaosRun) -> str:
    if "mapper-2" not in run.pipeline.roles:
        run.pipeline.add("mapper-2", ["run", "mapper"])
    await run.pipeline.start("mapper-2")
    return "a second mapper process joins the mapper group"


async def _second_mapper_leaves(run: ChaosRun) -> str:
    await run.pipeline.kill("mapper-2", signal.SIGTERM)
    return "it leaves (SIGTERM: drains, commits, leaves the group)"


async def _big_fanout(run: ChaosRun) -> str:
    return await run.big_fanout(BIG_FANOUT)


# -- a negative control: the oracle must see a purge that was never applied ------------------

SKIPPED_REGION = "eu-west"


async def _stop_redis_sink(run: ChaosRun) -> str:
    await run.pipeline.kill(sink_name(SKIPPED_REGION, "redis"), signal.SIGTERM)
    return f"sink.{SKIPPED_REGION}.redis stopped (SIGTERM: it leaves its group)"


async def _skip_and_restart(run: ChaosRun) -> str:
    """Move the stopped sink's group past every command written meanwhile, as an operator's
    mistaken `--to-latest` would, then start it again: those purges are never applied."""
    topic = run.settings.commands_topic(SKIPPED_REGION)
    group = run.settings.group_id("sink", SKIPPED_REGION, "redis")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=run.stack.bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = await partitions_of(run.stack.bootstrap, [topic])
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        before = {tp: await consumer.committed(tp) or 0 for tp in parts}
        await consumer.commit({tp: off for tp, off in ends.items()})
    finally:
        await consumer.stop()
    skipped = sum(ends[tp] - before[tp] for tp in parts)
    await run.pipeline.restart(sink_name(SKIPPED_REGION, "redis"))
    return f"{group} moved to the end of {topic}: {skipped} commands skipped; restarted"


def controls() -> list[Fault]:
    """Faults that must show losses, to show the oracle sees them (run with --faults)."""
    return [
        Fault(
            "control-skip",
            f"negative control: {SKIPPED_REGION} Redis sink's offsets moved past its commands",
            5,
            _stop_redis_sink,
            _skip_and_restart,
        )
    ]


def all_faults(quick: bool) -> list[Fault]:
    dlq = DeadLetterOutage()
    storm_start, storm_end = _storm(15, 0.6)
    faults = [
        Fault("baseline", "none (baseline)", 0),
        Fault("kill-broker", "broker SIGKILL, restart", 3, _broker_kill, _broker_restart),
        Fault("kill-mapper", "mapper SIGKILL, restart", 3, *_kill_roles(lambda run: ["mapper"])),
        *(_sink_kill(kind) for kind in SINK_KINDS),
        Fault("freeze-redis", f"Redis {FROZEN_REGION} frozen 30 s (SIGSTOP)", 30, _freeze, _thaw),
        Fault(
            "empty-redis",
            f"Redis {EMPTIED_REGION} SIGKILL, restarted empty",
            2,
            _empty_kill,
            _empty_restart,
        ),
        Fault("cloudflare-storm", "Cloudflare 429/5xx storm", 15, storm_start, storm_end),
        Fault(
            "revoke-credentials",
            "CDN credentials revoked 30 s",
            30,
            _revoke,
            _restore,
            not_run=_no_revocation,
        ),
        Fault(
            "dlq-unavailable",
            "dead-letter topic unavailable 30 s (with 1 % poison)",
            30,
            dlq.start,
            dlq.end,
            poison_share=0.01,
        ),
        Fault("poison", "1 % poison records", 20, poison_share=0.01),
        Fault(
            "rebalance",
            "second mapper joins mid-stream, leaves",
            10,
            _second_mapper,
            _second_mapper_leaves,
        ),
        Fault(
            "fanout-50k",
            f"vendor update fanning out to {BIG_FANOUT:,} weddings",
            0,
            _big_fanout,
            cap_s=120,
        ),
    ]
    if not quick:
        return faults
    short = {"freeze-redis": 10, "cloudflare-storm": 10, "poison": 30, "rebalance": 10}
    keep = ["baseline", "kill-mapper", "kill-redis", "freeze-redis", "cloudflare-storm"]
    keep += ["poison", "rebalance"]
    out = []
    for fault in faults:
        if fault.name in keep:
            hold = short.get(fault.name, fault.hold_s)
            title = fault.title.replace("30 s", f"{hold:.0f} s")
            if fault.name == "cloudflare-storm":
                fault = replace(fault, start=_storm(hold, 0.6)[0])
            out.append(replace(fault, hold_s=hold, title=title))
    return out
