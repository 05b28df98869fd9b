"""The processes the harness measures, one per figure, so no two share an event loop.

    python -m bench.worker roles --prefix P --roles mapper,redis:eu-west [--warmup W --count N]
    python -m bench.worker ceiling --prefix P --warmup W --count N
    python -m bench.worker redis-ceiling --prefix P --region R --warmup W --count N

`roles` runs the pipeline's own roles (MapperRole, SinkRole + RedisSink) with
telemetry set up as `cachesync run` does; the ceilings are bare aiokafka loops doing
the same work with the same clients (bench/CEILINGS.md says what each includes and
leaves out). `ceiling` runs after the mapper on the same topics and sends, for each
input event, the very messages the mapper sent for it (read back from the topics
before it starts). Each prints `READY` once its consumers have their partitions and,
at the end, `RESULT {json}`: the timed window (records W..W+N, from the batch that
crossed W to the batch that crossed W+N, each counted once its effect is applied;
offsets are committed every `commit_interval_ms` within it), the role counters
and the process's peak RSS. `--cpu` pins the process to one core.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import bench_settings, one_command_app, stack_env

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from cachesync.consumers.pipeline.kafka import Record
    from cachesync.consumers.pipeline.roles import Role
    from cachesync.consumers.settings import Settings
    from cachesync.schemas import Codec


class Window:
    """Times records W..W+N of a stream that is counted in batches."""

    def __init__(self, warmup: int, count: int | None, stop: asyncio.Event) -> None:
        self.warmup = warmup
        self.count = count
        self.stop = stop
        self.seen = 0
        self.started: tuple[float, int] | None = None
        self.ended: tuple[float, int] | None = None
        # Process CPU time at both ends: CPU per record holds up on a busy machine, where
        # a rate measures the neighbours as well.
        self.cpu: list[float] = []

    def add(self, n: int) -> None:
        self.seen += n
        now = time.perf_counter()
        if self.started is None and self.seen >= self.warmup:
            self.started = (now, self.seen)
            self.cpu.append(time.process_time())
        if (
            self.count is not None
            and self.ended is None
            and self.started is not None
            and self.seen >= self.warmup + self.count
        ):
            self.ended = (now, self.seen)
            self.cpu.append(time.process_time())
            self.stop.set()

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seen": self.seen}
        # One batch both starts and ends a window too small to time: no rate.
        if self.started and self.ended and self.ended[0] > self.started[0]:
            seconds = self.ended[0] - self.started[0]
            records = self.ended[1] - self.started[1]
            out.update(seconds=seconds, records=records, rate=records / seconds)
            out["cpu_us_per_record"] = (self.cpu[1] - self.cpu[0]) * 1e6 / records
        return out


def _write(path: str, text: str) -> None:
    Path(path).write_text(text)


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM). Not ru_maxrss: Linux carries that
    across exec, so a worker would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _emit(tag: str, payload: Any = None) -> None:
    line = tag if payload is None else f"{tag} {json.dumps(payload)}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def _wait_assigned(consumers: list[Any], task: asyncio.Task[Any] | None = None) -> None:
    for _ in range(600):
        if task is not None and task.done():
            task.result()
        if all(c.assignment() for c in consumers):
            for c in consumers:
                for tp in c.assignment():
                    await c.position(tp)
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("consumers got no partitions within 30 s")


def _build_roles(settings: Settings, specs: list[str]) -> list[Role]:
    """`mapper` is the MapperRole; `KIND:REGION` (`redis:eu-west`) a SinkRole with that
    region's sink, as `cachesync run sink` builds it (the registry)."""
    from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
    from cachesync.consumers.sinks.registry import build_sink

    roles: list[Role] = []
    for spec in specs:
        if spec == "mapper":
            roles.append(MapperRole(settings))
            continue
        kind, _, region = spec.partition(":")
        roles.append(SinkRole(settings, build_sink(settings, region, kind)))
    return roles


def _time_batches(role: Role, window: Window) -> None:
    """Count each batch `role` handles into `window`, once its effect is applied (its
    offsets are committed every `commit_interval_ms`, in the window's time)."""
    role.loop.on_handled = window.add


async def _run_until_done(task: asyncio.Task[None], stop: asyncio.Event, limit_s: float) -> None:
    """Wait for the roles to stop (at the end of the window, or on a signal); stop them after
    `limit_s` seconds."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while not task.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout=0.5)
        if asyncio.get_running_loop().time() > deadline:
            stop.set()
    task.result()


def _role_stats(roles: list[Role]) -> dict[str, dict[str, Any]]:
    return {
        r.name: {
            "records": r.stats.records,
            "applied": r.stats.applied,
            "produced": dict(r.stats.produced),
            "dead_lettered": r.stats.dead_lettered,
        }
        for r in roles
    }


async def run_roles_worker(
    prefix: str, specs: list[str], warmup: int, count: int | None, limit_s: float, profile: str
) -> dict[str, Any]:
    from cachesync.consumers.pipeline.assemble import tune_gc
    from cachesync.consumers.pipeline.roles import run_roles
    from cachesync.consumers.telemetry import setup_telemetry

    settings = bench_settings(prefix)
    setup_telemetry("cachesync-bench", metrics_port=None)
    roles = _build_roles(settings, specs)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    window = Window(warmup, count, stop)
    _time_batches(roles[0], window)

    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled", interval=0.0005)

    tune_gc()  # as `cachesync run` does
    task = asyncio.create_task(run_roles(roles, stop))
    await _wait_assigned([r.consumer for r in roles], task)
    if profiler is not None:
        profiler.start()
    _emit("READY")
    await _run_until_done(task, stop, limit_s)
    if profiler is not None:
        profiler.stop()
        _write(
            profile,
            profiler.output_text(
                unicode=False, color=False, show_all=bool(os.environ.get("BENCH_PROFILE_ALL"))
            ),
        )
    return {
        "window": window.result(),
        "roles": _role_stats(roles),
        "peak_rss_mb": _peak_rss_mb(),
    }


# -- the ceilings (bench/CEILINGS.md) -----------------------------------------------

Where = tuple[str, int, int]  # an input record: topic, partition, offset
Message = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]  # topic, key, value, headers


async def _read_back(
    settings: Settings, topics: list[str], upto: Mapping[str, int] | None = None
) -> list[Record]:
    """Every record of `topics`, from the start to their current end, or to the offset
    `upto` gives a partition ("topic:partition"), if lower (no consumer group)."""
    from aiokafka import AIOKafkaConsumer

    from cachesync.consumers.pipeline.kafka import partitions_of

    parts = await partitions_of(settings.kafka_bootstrap_servers, topics)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    out: list[Record] = []
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        for tp in parts:
            ends[tp] = min(ends[tp], (upto or {}).get(f"{tp.topic}:{tp.partition}", ends[tp]))
        left = {tp for tp in parts if ends[tp] > 0}
        while left:
            batch = await consumer.getmany(*left, timeout_ms=1000, max_records=5000)
            for tp, records in batch.items():
                out += [r for r in records if r.offset < ends[tp]]
                if records and records[-1].offset + 1 >= ends[tp]:
                    left.discard(tp)
    finally:
        await consumer.stop()
    return out


async def output_ends(settings: Settings) -> dict[str, int]:
    """Where the mapper's output ends, per "topic:partition" of the command and audit
    topics: what the ceilings read back, sent after it (they send to the same topics), is
    not the mapper's."""
    from aiokafka import AIOKafkaConsumer

    from cachesync.consumers.pipeline.kafka import partitions_of

    topics = [settings.commands_topic(r) for r in settings.topology.regions]
    parts = await partitions_of(settings.kafka_bootstrap_servers, [*topics, settings.audit_topic])
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
    finally:
        await consumer.stop()
    return {f"{tp.topic}:{tp.partition}": end for tp, end in ends.items()}


def _message(record: Record) -> Message:
    return record.topic, record.key, record.value or b"", list(record.headers or ())


@dataclass
class MapperOutputs:
    """What the mapper sent for each input event, as it is on the wire: its commands (to
    every region's topic, keyed by entity) and its audit records (keyed by event id)."""

    commands: dict[Where, list[Message]]
    audit: dict[Where, list[Message]]

    @classmethod
    async def read_back(
        cls, settings: Settings, codec: Codec, upto: Mapping[str, int] | None = None
    ) -> MapperOutputs:
        """From the scenario's topics, after the mapper ran: a command names its event in a
        header, an audit record in its key; each event is found by its id in the inputs."""
        from cachesync.consumers.pipeline.headers import EVENT_ID, header

        where: dict[str, Where] = {}
        for r in await _read_back(settings, settings.content_topics):
            await codec.resolve(r.value or b"")
            event_id = str(codec.decode(r.value or b"").record["event_id"])
            where[event_id] = (r.topic, r.partition, r.offset)
        commands: dict[Where, list[Message]] = defaultdict(list)
        regions = [settings.commands_topic(region) for region in settings.topology.regions]
        for r in await _read_back(settings, regions, upto):
            commands[where[(header(r, EVENT_ID) or b"").decode()]].append(_message(r))
        audit: dict[Where, list[Message]] = defaultdict(list)
        for r in await _read_back(settings, [settings.audit_topic], upto):
            audit[where[(r.key or b"").decode()]].append(_message(r))
        return cls(dict(commands), dict(audit))

    def totals(self) -> dict[str, dict[str, int]]:
        """Messages and bytes (key, value, headers) of each kind, over every event."""
        out: dict[str, dict[str, int]] = {}
        for kind, per_event in (("commands", self.commands), ("audit", self.audit)):
            messages = [m for ms in per_event.values() for m in ms]
            size = sum(
                len(k or b"") + len(v) + sum(len(h) + len(hv) for h, hv in hs)
                for _, k, v, hs in messages
            )
            out[kind] = {"messages": len(messages), "bytes": size}
        return out


class PartitionBatches:
    """Messages handed to the producer as one batch per partition (`create_batch` and
    `send_batch`, each closed first, as the mapper's BatchedSends does), the partition the default
    partitioner's: murmur2 of the key."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        from cachesync.consumers.pipeline.kafka import Murmur2Partitioner

        self.producer = producer
        self.partitioner = Murmur2Partitioner()
        self.sent = 0

    async def send(self, messages: list[Message]) -> None:
        """Send `messages` and wait until the broker acked every one."""
        from cachesync.consumers.pipeline.sends import hand_over

        if not messages:
            return
        partitions: dict[str, list[int]] = {}
        grouped: dict[tuple[str, int], list[Message]] = {}
        for message in messages:
            topic, key = message[0], message[1]
            if topic not in partitions:
                partitions[topic] = sorted(await self.producer.partitions_for(topic))
            known = partitions[topic]
            grouped.setdefault((topic, self.partitioner(key, known, known)), []).append(message)
        acks = []
        for (topic, partition), part in grouped.items():
            batch = self.producer.create_batch()
            for _, key, value, headers in part:
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    acks.append(await hand_over(self.producer, batch, topic, partition))
                    batch = self.producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
            acks.append(await hand_over(self.producer, batch, topic, partition))
        await asyncio.gather(*acks)
        self.sent += len(messages)


class IntervalCommits:
    """A ceiling's commits, as the roles' loop makes them (pipeline/loop.py): the offsets
    of applied batches, at most once per `commit_interval_ms`, and the rest at the end."""

    def __init__(self, consumer: AIOKafkaConsumer, interval_ms: int) -> None:
        self.consumer = consumer
        self.interval_s = interval_ms / 1000
        self.offsets: dict[TopicPartition, int] = {}
        self.last = 0.0

    async def applied(self, batch: dict[TopicPartition, list[Any]]) -> None:
        self.offsets.update({tp: part[-1].offset + 1 for tp, part in batch.items() if part})
        if time.monotonic() - self.last >= self.interval_s:
            await self.flush()

    async def flush(self) -> None:
        if self.offsets:
            self.last = time.monotonic()
            offsets, self.offsets = self.offsets, {}
            await self.consumer.commit(offsets)


class CodecWork:
    """The mapper's codec work for each input event, done again by the codec floor: the
    decoded records of the very messages the mapper sent for it, encoded as the mapper
    encodes them (an event's commands of one kind together, `Codec.encode_alike`, as
    `pipeline/writer.py` does; each audit record whole)."""

    def __init__(self, codec: Codec, outputs: MapperOutputs) -> None:
        self.codec = codec
        self.commands = {w: [self._decoded(m) for m in ms] for w, ms in outputs.commands.items()}
        self.audit = {w: [self._decoded(m) for m in ms] for w, ms in outputs.audit.items()}
        # The floor must send the mapper's bytes, or it would time other work.
        for where, messages in outputs.commands.items():
            if [m[2] for m in messages] != self.encode_commands(where):
                raise RuntimeError(f"codec floor: {where} does not encode to the mapper's bytes")

    def _decoded(self, message: Message) -> tuple[str, dict[str, Any]]:
        decoded = self.codec.decode(message[2])
        return decoded.type_name, decoded.record

    def encode_commands(self, where: Where) -> list[bytes]:
        from cachesync.consumers.pipeline.writer import encode_commands

        return encode_commands(self.codec, self.commands.get(where, []))

    def encode_audit(self, where: Where) -> list[bytes]:
        return [self.codec.encode(t, r) for t, r in self.audit.get(where, [])]


async def run_kafka_ceiling(
    prefix: str,
    warmup: int,
    count: int | None,
    limit_s: float,
    *,
    upto: Mapping[str, int] | None = None,
    codec_work: bool = False,
) -> dict[str, Any]:
    """The mapper's ceiling: consume -> produce -> commit, with the mapper's clients and
    batching, sending for each input event the very messages the mapper sent for it (those
    below `upto`, see `output_ends`).

    With `codec_work`, the codec floor: the same loop, which also decodes each event and
    encodes each message it sends, with the mapper's codec, as the mapper does: what any
    mapper on fastavro pays, whatever its rules cost."""
    from cachesync.consumers.pipeline.assemble import tune_gc
    from cachesync.consumers.pipeline.codecs import close_codec, codec_for, start_codec
    from cachesync.consumers.pipeline.kafka import make_consumer, make_producer

    settings = bench_settings(prefix)
    codec = codec_for(settings)
    await start_codec(codec)
    try:
        outputs = await MapperOutputs.read_back(settings, codec, upto)
        work = CodecWork(codec, outputs) if codec_work else None
    finally:
        await close_codec(codec)
    name = "codec-floor" if codec_work else "ceiling"
    producer = make_producer(settings.kafka_bootstrap_servers, client_id=f"cachesync-bench-{name}")
    consumer = make_consumer(
        settings.kafka_bootstrap_servers,
        *settings.content_topics,
        group_id=settings.group_id(name),
        client_id=f"cachesync-bench-{name}",
    )
    stop = asyncio.Event()
    _stop_on_signals(stop)
    window = Window(warmup, count, stop)
    commits = IntervalCommits(consumer, settings.commit_interval_ms)
    sent = {"commands": PartitionBatches(producer), "audit": PartitionBatches(producer)}
    await producer.start()
    await consumer.start()
    # As `cachesync run` does (and the roles worker): the mapper's messages read back
    # above are kept for the run, and a collector that scanned them would time the bench.
    tune_gc()
    try:
        await _wait_assigned([consumer])
        _emit("READY")
        deadline = time.monotonic() + limit_s
        while not stop.is_set() and time.monotonic() < deadline:
            batch = await consumer.getmany(
                timeout_ms=200, max_records=settings.consumer_max_records
            )
            if not batch:
                continue
            commands: list[Message] = []
            audit: list[Message] = []
            for tp, part in batch.items():
                for record in part:
                    where = (tp.topic, tp.partition, record.offset)
                    if work is None:
                        commands += outputs.commands.get(where, ())
                        audit += outputs.audit.get(where, ())
                        continue
                    codec.decode(record.value or b"")
                    commands += _with_values(
                        outputs.commands.get(where, ()), work.encode_commands(where)
                    )
                    audit += _with_values(outputs.audit.get(where, ()), work.encode_audit(where))
            # As the mapper: the audit records go out once the commands are acked (they
            # say what was sent), and the offsets are committed once both are.
            await sent["commands"].send(commands)
            await sent["audit"].send(audit)
            window.add(sum(len(p) for p in batch.values()))
            await commits.applied(batch)
        await commits.flush()
    finally:
        await consumer.stop()
        await producer.stop()
    return {
        "window": window.result(),
        "planned": outputs.totals(),
        "sent": {kind: s.sent for kind, s in sent.items()},
        "peak_rss_mb": _peak_rss_mb(),
    }


def _with_values(messages: Sequence[Message], values: list[bytes]) -> list[Message]:
    return [(t, k, v, h) for (t, k, _, h), v in zip(messages, values, strict=True)]


# Each tag index set's members and the set itself, deleted in one step: a key tagged
# while the purge runs is either deleted now or survives with its tag (as in the sink).
_DELETE_TAGGED = """
local deleted = 0
for i = 1, #KEYS do
  local members = redis.call('SMEMBERS', KEYS[i])
  for j = 1, #members, 500 do
    deleted = deleted + redis.call('DEL', unpack(members, j, math.min(j + 499, #members)))
  end
  deleted = deleted + redis.call('DEL', KEYS[i])
end
return deleted
"""


async def run_redis_ceiling(
    prefix: str, region: str, warmup: int, count: int | None, limit_s: float
) -> dict[str, Any]:
    """The Redis sink's ceiling, the smallest correct sink: consume the region's command
    topic, decode each command, delete the batch's keys and tagged keys in one pipeline,
    commit."""
    from redis.asyncio import Redis

    from cachesync.consumers import keys
    from cachesync.consumers.pipeline.codecs import close_codec, codec_for, start_codec
    from cachesync.consumers.pipeline.kafka import make_consumer

    settings = bench_settings(prefix)
    codec = codec_for(settings)
    redis = Redis.from_url(settings.region_redis_urls[region])
    consumer = make_consumer(
        settings.kafka_bootstrap_servers,
        settings.commands_topic(region),
        group_id=settings.group_id("ceiling", region, "redis"),
        client_id="cachesync-bench-redis-ceiling",
    )
    stop = asyncio.Event()
    _stop_on_signals(stop)
    window = Window(warmup, count, stop)
    commits = IntervalCommits(consumer, settings.commit_interval_ms)
    deleted = 0
    await start_codec(codec)
    await consumer.start()
    try:
        # Loaded once: each batch's pipeline is then one round trip (EVALSHA, no check).
        delete_tagged = await redis.script_load(_DELETE_TAGGED)
        await _wait_assigned([consumer])
        _emit("READY")
        deadline = time.monotonic() + limit_s
        while not stop.is_set() and time.monotonic() < deadline:
            batch = await consumer.getmany(
                timeout_ms=200, max_records=settings.consumer_max_records
            )
            if not batch:
                continue
            cache_keys: list[str] = []
            tag_sets: list[str] = []
            for part in batch.values():
                for record in part:
                    await codec.resolve(record.value or b"")
                    decoded = codec.decode(record.value or b"")
                    if decoded.type_name != "purge":
                        continue
                    cache_keys += decoded.record["keys"]
                    tag_sets += (keys.tag_index(t) for t in decoded.record["tags"])
            pipe = redis.pipeline(transaction=False)
            if cache_keys:
                pipe.delete(*cache_keys)
            if tag_sets:
                pipe.evalsha(delete_tagged, len(tag_sets), *tag_sets)
            deleted += sum(await pipe.execute())
            window.add(sum(len(p) for p in batch.values()))
            await commits.applied(batch)
        await commits.flush()
    finally:
        await consumer.stop()
        await close_codec(codec)
        await redis.aclose()
    return {"window": window.result(), "deleted": deleted, "peak_rss_mb": _peak_rss_mb()}


class Mode(StrEnum):
    ROLES = "roles"
    CEILING = "ceiling"
    CODEC_FLOOR = "codec-floor"
    REDIS_CEILING = "redis-ceiling"


app = one_command_app()


@app.command(help="one measured bench process")
def main(
    mode: Annotated[Mode, typer.Argument()],
    prefix: str = "",
    roles: str = "mapper",
    cpu: int | None = None,
    warmup: int = 0,
    count: int | None = None,
    timeout: float = 600.0,
    region: str = "eu-west",
    profile: str = "",
    upto: str = "",
) -> None:
    _pin(cpu)
    stack_env()
    if mode is Mode.ROLES:
        result = asyncio.run(
            run_roles_worker(prefix, roles.split(","), warmup, count, timeout, profile)
        )
    elif mode in (Mode.CEILING, Mode.CODEC_FLOOR):
        result = asyncio.run(
            run_kafka_ceiling(
                prefix,
                warmup,
                count,
                timeout,
                upto=json.loads(upto) if upto else None,
                codec_work=mode is Mode.CODEC_FLOOR,
            )
        )
    else:
        result = asyncio.run(run_redis_ceiling(prefix, region, warmup, count, timeout))
    _emit("RESULT", result)


if __name__ == "__main__":
    app()
