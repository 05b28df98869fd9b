"""One chaos run: the stack, the pipeline, then each fault with events streaming through it.

For each fault: stream events (each armed in the caches before it is published) for
`lead_s`, inject the fault, hold it, end it, stream `tail_s` more, stop, and look at
the caches until every purge is observed or `cap_s` passes. Recovery time is from the
fault's end until every purge of the events published before that end was observed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from bench.chaos.cloudflare import ChaosCloudflare
from bench.chaos.faults import Fault
from bench.chaos.oracle import SINKS, Arm, Expectations, Oracle, targets_per_region
from bench.chaos.pipeline import Pipeline
from bench.chaos.stack import CLOUDFLARE_PORT, CLOUDFLARE_TOKEN, DEFAULT_PORTS, ChaosStack
from bench.chaos.stack import listeners as port_listeners
from bench.chaos.traffic import ChaosWorld, Delivery, Producer
from bench.common import percentile
from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.ops.publish import new_event
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.codecs import codec_for
from cachesync.consumers.settings import Settings, load_settings, region_var
from cachesync.consumers.sinks.registry import SINK_KINDS
from cachesync.topology.admin import apply_topics

log = logging.getLogger(__name__)

# The oracle's own relationship index: another database of the stack's state Redis.
ORACLE_INDEX_DB = 1
# Pages fetched per edge for the big fan-out (every key and CDN item is checked; a page
# costs an HTTP round trip when armed and each time it is looked at).
PAGE_SAMPLE = 100


@dataclass(frozen=True)
class Plan:
    quick: bool
    rate: float  # events per second
    weddings: int  # per fault's world
    lead_s: float  # streaming before the fault
    tail_s: float  # streaming after it ends
    cap_s: float  # the longest wait for recovery
    poll_s: float  # how often the caches are looked at
    cap_override: bool = False  # cap_s for every fault, even one with a cap of its own


FULL = Plan(quick=False, rate=15, weddings=12, lead_s=5, tail_s=3, cap_s=90, poll_s=1.0)
QUICK = Plan(quick=True, rate=10, weddings=8, lead_s=5, tail_s=3, cap_s=60, poll_s=1.0)


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[chaos {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


class ChaosRun:
    """Everything one run holds; the faults act through it."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.run_id = uuid.uuid4().hex[:6]
        self.say = Progress()
        self.settings: Settings = load_settings()  # replaced once the stack's env is adopted
        self.regions = list(self.settings.topology.regions)
        self.kinds = list(SINK_KINDS)
        self.stack = ChaosStack(self.regions)
        self.cloudflare = ChaosCloudflare(CLOUDFLARE_TOKEN)
        self._exit = contextlib.ExitStack()
        self.pipeline: Pipeline
        self.oracle: Oracle
        self.expectations: Expectations
        self.producer: Producer
        self.poison_every = 0  # while a fault holds: every Nth record sent is poison
        self._records = itertools.count(1)
        self._state_redis: Redis | None = None
        self._delivery = Delivery()  # the stream of the fault under way
        self._opened: set[str] = set()  # what teardown must close
        self._all_observed = asyncio.Event()  # set by the poller when nothing is pending
        self.arm_ms: list[float] = []  # how long arming took, per event of the fault under way
        self._poll_took: list[float] = []  # seconds each look at every cache took
        # (monotonic, purges pending per region/sink), one entry per look at the caches
        self._pending_history: list[tuple[float, dict[str, int]]] = []

    # -- up and down --------------------------------------------------------------
    async def setup(self) -> None:
        self.say(f"bringing up the chaos stack in {self.stack.dir} (ports +1000)")
        await self.stack.up()
        self.stack.adopt()
        self.settings = load_settings()
        self._exit.enter_context(self.cloudflare.serving(CLOUDFLARE_PORT))
        await apply_topics(self.settings.kafka_bootstrap_servers, self.settings.topology)
        codec = codec_for(self.settings)
        self.expectations = Expectations(
            self.settings, codec, self.stack.redis_url("state", ORACLE_INDEX_DB)
        )
        env = self.stack.env()
        self.oracle = Oracle(
            self.settings,
            redis_urls={r: self.stack.redis_url(r) for r in self.regions},
            edge_urls={r: self.stack.edge_url(r) for r in self.regions},
            cloudflare=self.cloudflare,
            cloudflare_zones={r: env[region_var("CLOUDFLARE_ZONE_", r)] for r in self.regions},
            cloudfront_endpoint=env["CLOUDFRONT_ENDPOINT_URL"],
            cloudfront_distributions={
                r: env[region_var("CLOUDFRONT_DISTRIBUTION_", r)] for r in self.regions
            },
        )
        self._opened.add("oracle")
        self.producer = Producer(self.settings, codec)
        await self.producer.start()
        self._opened.add("producer")
        self._state_redis = Redis.from_url(self.stack.redis_url("state"))
        self.pipeline = Pipeline(env, self.regions, self.kinds, self.stack.log_dir / "pipeline")
        self._opened.add("pipeline")
        self.say(f"starting {len(self.pipeline.roles)} pipeline processes")
        await self.pipeline.start_all()
        waited = await self.wait_groups()
        self.say(f"consumer groups of every role stable after {waited:.0f} s")

    async def teardown(self) -> None:
        self.cloudflare.calm()
        if "pipeline" in self._opened:
            self.say("stopping the pipeline")
            await self.pipeline.stop_all()
        if "producer" in self._opened:
            with contextlib.suppress(Exception):
                await self.producer.stop()
        if "oracle" in self._opened:
            await self.oracle.close()
            await self.expectations.close()
        if self._state_redis is not None:
            await self._state_redis.aclose()
        self._exit.close()
        self.say("tearing the chaos stack down (deploy/local/down.sh, by its own PID files)")
        await self.stack.down()

    async def wait_groups(self, timeout_s: float = 120) -> float:
        """Until every role's consumer group is stable with a member (the roles have started)."""
        groups = [self.settings.group_id("mapper")] + [
            self.settings.group_id("sink", r, k) for r in self.regions for k in self.kinds
        ]
        t0 = time.monotonic()
        states: dict[str, str] = {}
        admin = AIOKafkaAdminClient(bootstrap_servers=self.stack.bootstrap, client_id="chaos")
        await admin.start()
        try:
            while time.monotonic() - t0 < timeout_s:
                for wanted in groups:
                    try:
                        for response in await admin.describe_consumer_groups([wanted]):
                            for group in response.groups:
                                states[group[1]] = f"{group[2]}, {len(group[5])} members"
                    except Exception as exc:  # the coordinator may not be there yet
                        states[wanted] = f"{type(exc).__name__}: {exc}"
                waiting = [g for g in groups if not states.get(g, "").startswith("Stable, 1 ")]
                if not waiting:
                    return time.monotonic() - t0
                await asyncio.sleep(1.0)
        finally:
            await admin.close()
        self.say(
            f"groups not stable after {timeout_s:.0f} s: {[(g, states.get(g)) for g in waiting]}"
        )
        return time.monotonic() - t0

    # -- events ---------------------------------------------------------------------
    async def stream(self, world: ChaosWorld, delivery: Delivery, stop: asyncio.Event) -> None:
        """Events at the plan's rate, each armed in the caches before it is published.

        The rules run on each event in order (the relationship index follows the stream);
        arming overlaps for a few events at a time, and the sends keep the stream's order
        (each waits for the one before), so one entity's events reach the broker in order.
        """
        interval = 1.0 / self.plan.rate
        next_at = time.monotonic()
        gate = asyncio.Semaphore(8)
        previous: asyncio.Task[None] | None = None
        inflight: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                if self.poison_every and next(self._records) % self.poison_every == 0:
                    self.producer.send_poison(delivery)
                event_type, record = world.next_event()
                value = self.producer.encode(event_type, record)
                purges = await self.expectations.purges(value)
                await gate.acquire()
                previous = asyncio.create_task(
                    self._arm_and_send(gate, previous, delivery, event_type, record, value, purges)
                )
                inflight.add(previous)
                previous.add_done_callback(inflight.discard)
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=delay)
                else:
                    next_at = time.monotonic()
        finally:
            if inflight:
                await asyncio.gather(*inflight)

    async def _arm_and_send(
        self,
        gate: asyncio.Semaphore,
        previous: asyncio.Task[None] | None,
        delivery: Delivery,
        event_type: str,
        record: dict[str, Any],
        value: bytes,
        purges: list[PurgeCommand],
    ) -> None:
        t0 = time.monotonic()
        try:
            await self.oracle.arm(
                str(record["event_id"]), event_type, int(record["occurred_at"]), purges
            )
        finally:
            gate.release()
        self.arm_ms.append((time.monotonic() - t0) * 1000)
        if previous is not None:
            await previous
        self.producer.send_event(delivery, event_type, record, value)

    async def big_fanout(self, weddings: int) -> str:
        """One vendor.updated whose vendor serves `weddings` weddings. The relationship index is
        written directly (in the pipeline's and the oracle's), rather than by that many
        vendor.linked events: setting the scene, not observing it."""
        assert self._state_redis is not None
        tag = f"{self.run_id}big"
        vendor = f"v{tag}"
        ids = [f"w{tag}-{i:05d}" for i in range(weddings)]
        for redis in (self._state_redis, self.expectations.redis):
            for start in range(0, len(ids), 5000):
                chunk = ids[start : start + 5000]
                pipe = redis.pipeline(transaction=False)
                pipe.sadd(keys.vendor_weddings(vendor), *chunk)
                for wedding in chunk:
                    pipe.sadd(keys.wedding_vendors(wedding), vendor)
                await pipe.execute()
        record = new_event(
            "vendor.updated", vendor_id=vendor, category="venue", changed_fields=["prices", "bio"]
        )
        value = self.producer.encode("vendor.updated", record)
        purges = await self.expectations.purges(value)
        t0 = time.monotonic()
        await self.oracle.arm(
            str(record["event_id"]),
            "vendor.updated",
            int(record["occurred_at"]),
            purges,
            page_sample=PAGE_SAMPLE,
        )
        armed_s = time.monotonic() - t0
        sent = self.producer.send_event(self._delivery, "vendor.updated", record, value)
        per_region = targets_per_region(purges)
        items = max(per_region.values(), default=0)
        return (
            f"vendor {vendor} linked to {weddings:,} weddings (index written directly); "
            f"one vendor.updated ({len(sent.value)} bytes) whose purge names {items:,} keys, "
            f"tags, URLs and prefixes per region (the rules, offline, make it "
            f"{len(purges) // max(len(per_region), 1)} command(s) per region); armed in "
            f"{armed_s:.1f} s (pages: a sample of {PAGE_SAMPLE} per edge)"
        )

    # -- one fault ----------------------------------------------------------------------
    async def run_fault(self, index: int, fault: Fault) -> dict[str, Any]:
        reason = fault.not_run(self)
        if reason is not None:
            self.say(f"{fault.name}: {reason}")
            return {"name": fault.name, "title": fault.title, "status": "not run", "reason": reason}
        self.say(f"== {fault.name}: {fault.title}")
        self.oracle.forget()
        self.arm_ms = []
        self._pending_history = []
        self._poll_took = []
        world = ChaosWorld(f"{self.run_id}f{index}", weddings=self.plan.weddings, seed=index)
        delivery = self._delivery = Delivery()
        dlq_from = await self._dlq_end()
        cf_before = self.cloudflare.status_counts()
        t0 = time.time()
        stop_stream, stop_poll = asyncio.Event(), asyncio.Event()
        stream = asyncio.create_task(self.stream(world, delivery, stop_stream))
        poller = asyncio.create_task(self._poll_loop(fault.name, stop_poll))
        notes: list[str] = []
        try:
            await self._sleep_or_fail(stream, self.plan.lead_s)
            fault_start = time.time()
            if fault.poison_share:
                self.poison_every = round(1 / fault.poison_share)
            notes.append(await fault.start(self))
            await self._sleep_or_fail(stream, fault.hold_s)
            notes.append(await fault.end(self))
            self.poison_every = 0
            fault_end = time.time()
            self.say(f"{fault.name}: fault over after {fault_end - fault_start:.1f} s")
            await self._sleep_or_fail(stream, self.plan.tail_s)
        finally:
            self.poison_every = 0
            stop_stream.set()
            await stream
        stream_end = time.time()
        await self._until_acked(delivery)
        dropped = self._drop_unacked(delivery)
        cap = self.plan.cap_s if self.plan.cap_override else fault.cap_s or self.plan.cap_s
        await self._until_observed(stream_end + cap)
        stop_poll.set()
        await poller
        await self.oracle.poll()
        self._pending_history.append((time.monotonic(), self.oracle.pending_by_sink()))
        dead = await self._dead_letters(dlq_from, delivery, wait_s=15)
        result = self._result(fault, delivery, t0, fault_start, fault_end, stream_end, dead)
        result["notes"] = [n for n in notes if n]
        result["not_delivered_arms"] = dropped
        result["cloudflare_answers"] = _delta(self.cloudflare.status_counts(), cf_before)
        streamed = (
            result["seconds"]["lead"] + result["seconds"]["fault"] + result["seconds"]["tail"]
        )
        result["events"]["rate"] = result["events"]["sent"] / max(streamed, 1e-6)
        result["arming_ms"] = {
            "p50": percentile(self.arm_ms, 0.5),
            "p99": percentile(self.arm_ms, 0.99),
        }
        result["edge_errors"] = {r: e.errors for r, e in self.oracle.edges.items() if e.errors}
        result["purges"]["draining_at_end"] = self._still_draining()
        result["observation_s"] = {
            "p50": percentile(self._poll_took, 0.5),
            "max": max(self._poll_took, default=0.0),
        }
        self.say(_summary_line(result))
        return result

    async def _sleep_or_fail(self, stream: asyncio.Task[None], seconds: float) -> None:
        """Sleep, but surface at once an error of the stream (a broken oracle, say)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stream), timeout=seconds)
        if stream.done():
            stream.result()
            raise RuntimeError("the event stream ended early")

    async def _poll_loop(self, name: str, stop: asyncio.Event) -> None:
        last_say = 0.0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                await self.oracle.poll()
            except Exception as exc:  # the oracle keeps looking; the next poll may work
                log.warning("poll failed: %s", exc)
            took = time.monotonic() - t0
            by_sink = self.oracle.pending_by_sink()
            self._pending_history.append((time.monotonic(), by_sink))
            if not by_sink:
                self._all_observed.set()
            if time.monotonic() - last_say > 10:
                last_say = time.monotonic()
                shown = ", ".join(f"{k} {v}" for k, v in sorted(by_sink.items())) or "none"
                self.say(f"  {name}: pending {shown}")
            self._poll_took.append(took)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.plan.poll_s)

    def _still_draining(self, window_s: float = 15) -> dict[str, Any] | None:
        """For each region/sink with purges still pending when the wait ended: how many were
        pending at the last look at least `window_s` earlier. `moving` when every one of them
        was still going down (a backlog worked off more slowly than the wait) rather than stuck."""
        history = self._pending_history
        if not history or not history[-1][1]:
            return None
        end_t, at_end = history[-1]
        earlier = [(t, by_sink) for t, by_sink in history if t <= end_t - window_s]
        if not earlier:
            return None
        then, before = earlier[-1]
        groups = {g: [before.get(g, 0), n] for g, n in sorted(at_end.items())}
        return {
            "window_s": round(end_t - then),
            "groups": groups,
            "moving": all(b > e for b, e in groups.values()),
        }

    async def _until_acked(self, delivery: Delivery, wait_s: float = 90) -> None:
        if delivery.tasks:
            await asyncio.wait(set(delivery.tasks), timeout=wait_s)

    def _drop_unacked(self, delivery: Delivery) -> int:
        """Arms of events the broker never acknowledged are not expected to be purged."""
        unacked = delivery.unacked_event_ids()
        if not unacked:
            return 0
        dropped = 0
        for target in self.oracle.targets.values():
            keep = [a for a in target.pending if a.event_id not in unacked]
            dropped += len(target.pending) - len(keep)
            target.pending = keep
        self.oracle.arms = [a for a in self.oracle.arms if a.event_id not in unacked]
        for key_set in self.oracle.pending.values():
            for key in list(key_set):
                if not self.oracle.targets[key].pending:
                    key_set.discard(key)
        return dropped

    async def _until_observed(self, deadline: float) -> None:
        """Until the poller has seen every purge, or `deadline` (wall clock)."""
        self._all_observed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._all_observed.wait(), timeout=max(0, deadline - time.time())
            )

    # -- dead letters -------------------------------------------------------------------
    def _dlq_partitions(self) -> list[TopicPartition]:
        spec = self.settings.topology.topics.dead_letter
        return [TopicPartition(self.settings.dead_letter_topic, p) for p in range(spec.partitions)]

    async def _dlq_end(self) -> dict[TopicPartition, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.stack.bootstrap)
        await consumer.start()
        try:
            ends = await consumer.end_offsets(self._dlq_partitions())
        finally:
            await consumer.stop()
        return dict(ends)

    async def _dead_letters(
        self, start: dict[TopicPartition, int], delivery: Delivery, wait_s: float
    ) -> dict[str, Any]:
        """The dead-letter topic since the fault began: poison (expected) and anything else."""
        poison = {s.value for s in delivery.poison() if s.acked}
        deadline = time.monotonic() + wait_s
        while True:
            records = await self._read_dlq(start)
            matched = sum(1 for r in records if r["value"] in poison)
            if matched >= len(poison) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        other = [r for r in records if r["value"] not in poison]
        reasons = Counter(f"{r['reason']} ({r['consumer']})" for r in records)
        return {
            "total": len(records),
            "poison_sent": len(poison),
            "poison_dead_lettered": matched,
            "other": len(other),
            "reasons": dict(reasons),
            "other_examples": [
                {k: v for k, v in r.items() if k != "value"} | {"bytes": len(r["value"])}
                for r in other[:10]
            ],
        }

    async def _read_dlq(self, start: dict[TopicPartition, int]) -> list[dict[str, Any]]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.stack.bootstrap,
            enable_auto_commit=False,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await consumer.start()
        out: list[dict[str, Any]] = []
        try:
            parts = list(start)
            consumer.assign(parts)
            ends = await consumer.end_offsets(parts)
            for tp in parts:
                consumer.seek(tp, start[tp])
            left = {tp for tp in parts if ends[tp] > start[tp]}
            while left:
                batch = await consumer.getmany(*left, timeout_ms=1000, max_records=1000)
                for tp, recs in batch.items():
                    for r in recs:
                        hdr = {k: bytes(v).decode(errors="replace") for k, v in r.headers or ()}
                        out.append(
                            {
                                "value": r.value or b"",
                                "reason": hdr.get(headers.DLQ_REASON, "?"),
                                "consumer": hdr.get(headers.DLQ_CONSUMER, "?"),
                                "error": hdr.get(headers.DLQ_ERROR, "")[:300],
                                "origin": f"{hdr.get(headers.DLQ_TOPIC, '?')}"
                                f"[{hdr.get(headers.DLQ_PARTITION, '?')}]"
                                f"@{hdr.get(headers.DLQ_OFFSET, '?')}",
                            }
                        )
                    if recs and recs[-1].offset + 1 >= ends[tp]:
                        left.discard(tp)
        finally:
            await consumer.stop()
        return out

    # -- the figures --------------------------------------------------------------------
    def _result(
        self,
        fault: Fault,
        delivery: Delivery,
        t0: float,
        fault_start: float,
        fault_end: float,
        stream_end: float,
        dead: dict[str, Any],
    ) -> dict[str, Any]:
        arms = self.oracle.arms
        expected: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        lost: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        lost_arms: list[Arm] = []
        for arm in arms:
            expected[arm.sink][arm.region] += 1
            if arm.satisfied_at is None:
                lost[arm.sink][arm.region] += 1
                lost_arms.append(arm)
        before_end = [a for a in arms if a.armed_at <= fault_end]
        recovery = None
        caught_up = None
        if not lost_arms and arms:
            recovery = max(
                0.0, max((a.satisfied_at or 0.0) for a in before_end or arms) - fault_end
            )
            caught_up = max(a.satisfied_at or 0.0 for a in arms) - stream_end
        by_sink: dict[str, float | None] = {}
        for sink in SINKS:
            mine = [a for a in arms if a.sink == sink]
            if mine:
                done = [a.satisfied_at for a in mine if a.satisfied_at is not None]
                by_sink[sink] = max(0.0, max(done) - fault_end) if len(done) == len(mine) else None
        exits = self.pipeline.exits_since(t0)
        return {
            "name": fault.name,
            "title": fault.title,
            "status": "run",
            "seconds": {
                "lead": fault_start - t0,
                "fault": fault_end - fault_start,
                "tail": stream_end - fault_end,
                "total": time.time() - t0,
            },
            "events": {
                "sent": delivery.events_sent(),
                "acknowledged": delivery.events_acked(),
                "resends": delivery.resends(),
            },
            "purges": {
                "expected": sum(sum(v.values()) for v in expected.values()),
                "lost": len(lost_arms),
                "expected_by_sink": {s: dict(v) for s, v in expected.items()},
                "lost_by_sink": {s: dict(lost.get(s, {})) for s in SINKS},
                "unarmed": dict(self.oracle.unarmed),
                "lost_examples": _examples(lost_arms),
            },
            "dead_letters": dead,
            "recovery_s": recovery,
            "caught_up_after_stream_s": caught_up,
            "recovery_by_sink_s": by_sink,
            "process_exits": [e.to_json() for e in exits],
        }

    async def run_all(self, faults: list[Fault]) -> dict[str, Any]:
        shared_ports = sorted(DEFAULT_PORTS.values())
        before = port_listeners(shared_ports)
        out: dict[str, Any] = {
            "run": self.run_id,
            "plan": asdict(self.plan),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "faults": [],
        }
        t0 = time.monotonic()
        try:
            await self.setup()
            out["setup_s"] = time.monotonic() - t0
            for index, fault in enumerate(faults):
                out["faults"].append(await self.run_fault(index, fault))
        except Exception as exc:  # reported with what was measured until then
            log.exception("chaos run failed")
            out["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                await self.teardown()
            finally:
                after = port_listeners(shared_ports)
                out["shared_stack"] = {
                    "listeners_before": {str(k): v for k, v in before.items()},
                    "listeners_after": {str(k): v for k, v in after.items()},
                    "untouched": before == after,
                }
                out["seconds"] = time.monotonic() - t0
        return out


def _examples(arms: list[Arm], per_group: int = 25) -> list[dict[str, Any]]:
    shown: dict[tuple[str, str], int] = defaultdict(int)
    out = []
    for arm in arms:
        group = (arm.sink, arm.region)
        if shown[group] < per_group:
            shown[group] += 1
            out.append(arm.to_json())
    return out


def _delta(after: dict[int, int], before: dict[int, int]) -> dict[str, int]:
    return {str(k): v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


def _summary_line(r: dict[str, Any]) -> str:
    rec = r["recovery_s"]
    return (
        f"{r['name']}: {r['events']['acknowledged']} events acked, "
        f"{r['purges']['expected']} purges expected, {r['purges']['lost']} lost, "
        f"{r['dead_letters']['total']} dead letters, "
        f"recovery {'not reached' if rec is None else f'{rec:.1f} s'}, "
        f"{len(r['process_exits'])} unexpected process exits"
    )
