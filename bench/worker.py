"""The processes the harness measures, one per figure, so no two share an event loop.

    python -m bench.worker roles --prefix P --roles mapper,redis:eu-west [--warmup W --count N]
    python -m bench.worker ceiling --prefix P --warmup W --count N --plan '{...}'
    python -m bench.worker redis-ceiling --url URL --keys FILE --warmup W --count N

`roles` runs the pipeline's own roles (MapperRole, SinkRole + RedisSink) with
telemetry set up as `cachesync run` does; the ceilings run bare clients doing the
same moves. Each prints `READY` once its consumers have their partitions and, at
the end, `RESULT {json}`: the timed window (records W..W+N, from the commit of the
batch that crossed W to the commit of the batch that crossed W+N), the role
counters and the process's peak RSS. `--cpu` pins the process to one core.
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
from collections import Counter
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import bench_settings, one_command_app, stack_env

if TYPE_CHECKING:
    from aiokafka import TopicPartition

    from cachesync.consumers.pipeline.kafka import Record
    from cachesync.consumers.pipeline.roles import Role
    from cachesync.consumers.settings import Settings


class Window:
    """Times records W..W+N of a stream that is counted in batches."""

    def __init__(self, warmup: int, count: int | None, stop: asyncio.Event) -> None:
        self.warmup = warmup
        self.count = count
        self.stop = stop
        self.seen = 0
        self.started: tuple[float, int] | None = None
        self.ended: tuple[float, int] | None = None

    def add(self, n: int) -> None:
        self.seen += n
        now = time.perf_counter()
        if self.started is None and self.seen >= self.warmup:
            self.started = (now, self.seen)
        if (
            self.count is not None
            and self.ended is None
            and self.started is not None
            and self.seen >= self.warmup + self.count
        ):
            self.ended = (now, self.seen)
            self.stop.set()

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seen": self.seen}
        if self.started and self.ended:
            seconds = self.ended[0] - self.started[0]
            records = self.ended[1] - self.started[1]
            out.update(seconds=seconds, records=records, rate=records / seconds)
        return out


Send = Callable[..., Awaitable[Any]]


def _counting(send: Send, audit_topic: str, outputs: dict[str, Counter[str]]) -> Send:
    """Wraps a producer's send to tally messages and bytes, audit records apart."""

    async def counted(topic: str, value: bytes, key: bytes, headers: Any = None) -> Any:
        tally = outputs.setdefault("audit" if topic == audit_topic else "commands", Counter())
        tally["messages"] += 1
        tally["value_bytes"] += len(value or b"")
        tally["key_bytes"] += len(key or b"")
        tally["header_bytes"] += sum(len(k) + len(v) for k, v in headers or ())
        return await send(topic, value=value, key=key, headers=headers)

    return counted


def _count_batched(audit_topic: str, outputs: dict[str, Counter[str]]) -> None:
    """The same tally for what goes out through BatchedSends (commands, audit records)."""
    from cachesync.consumers.pipeline.sends import BatchedSends

    add = BatchedSends.add

    def counted(
        self: BatchedSends, topic: str, key: bytes | None, value: bytes, headers: Any
    ) -> None:
        tally = outputs.setdefault("audit" if topic == audit_topic else "commands", Counter())
        tally["messages"] += 1
        tally["value_bytes"] += len(value or b"")
        tally["key_bytes"] += len(key or b"")
        tally["header_bytes"] += sum(len(k) + len(v) for k, v in headers or ())
        add(self, topic, key, value, headers)

    BatchedSends.add = counted  # type: ignore[method-assign]


def _write(path: str, text: str) -> None:
    Path(path).write_text(text)


def _read(path: str) -> str:
    return Path(path).read_text()


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
    """`mapper` is the MapperRole; `redis:REGION` a SinkRole with that region's RedisSink."""
    from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
    from cachesync.consumers.sinks.redis import RedisSink

    roles: list[Role] = []
    for spec in specs:
        if spec == "mapper":
            roles.append(MapperRole(settings))
        else:
            kind, _, region = spec.partition(":")
            assert kind == "redis", spec
            sink = RedisSink(region, settings.region_redis_urls[region])
            roles.append(SinkRole(settings, sink))
    return roles


def _time_batches(role: Role, window: Window) -> None:
    """Count each batch `role` commits into `window` (commit-after-effect included)."""
    loop = role.loop
    process = loop.process

    async def timed(batch: dict[TopicPartition, list[Record]]) -> bool:
        ok = await process(batch)
        if ok:
            window.add(sum(len(p) for p in batch.values()))
        return ok

    loop.process = timed  # type: ignore[method-assign]  # this one instance, on purpose


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
    from cachesync.consumers.pipeline.roles import MapperRole, run_roles
    from cachesync.consumers.telemetry import setup_telemetry

    settings = bench_settings(prefix)
    setup_telemetry("cachesync-bench", metrics_port=None)
    roles = _build_roles(settings, specs)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    window = Window(warmup, count, stop)
    _time_batches(roles[0], window)

    # What the mapper puts on the wire, so the ceiling can move exactly as much.
    outputs: dict[str, Counter[str]] = {}
    for role in roles:
        if isinstance(role, MapperRole):
            role.producer.send = _counting(role.producer.send, settings.audit_topic, outputs)
            _count_batched(settings.audit_topic, outputs)

    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled", interval=0.0005)

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
        "outputs": {k: dict(v) for k, v in outputs.items()},
        "peak_rss_mb": _peak_rss_mb(),
    }


Payload = tuple[int, bytes, bytes, list[tuple[str, bytes]]]


def _payload(moved: dict[str, Any]) -> Payload:
    """(messages, key, value, headers) of one kind of output: as many messages as the mapper
    sent, each of the mapper's mean key, value and header size."""
    n = int(moved["messages"])

    def size(name: str) -> int:
        return max(1, round(int(moved[name]) / max(n, 1)))

    header = [("h", b"x" * max(0, size("header_bytes") - 1))] if moved["header_bytes"] else []
    return n, b"k" * size("key_bytes"), b"v" * size("value_bytes"), header


async def run_kafka_ceiling(
    prefix: str, plan_json: str, warmup: int, count: int | None, limit_s: float
) -> dict[str, Any]:
    """A bare consume -> produce -> commit loop moving what the mapper moved, nothing else."""
    from cachesync.consumers.pipeline.kafka import make_consumer, make_producer

    settings = bench_settings(prefix)
    plan = json.loads(plan_json)
    inputs = int(plan["inputs"])
    regions = [settings.commands_topic(r) for r in settings.topology.regions]
    commands, audit = _payload(plan["commands"]), _payload(plan["audit"])
    producer = make_producer(settings.kafka_bootstrap_servers, client_id="cachesync-bench-ceiling")
    consumer = make_consumer(
        settings.kafka_bootstrap_servers,
        *settings.content_topics,
        group_id=settings.group_id("ceiling"),
        client_id="cachesync-bench-ceiling",
    )
    stop = asyncio.Event()
    _stop_on_signals(stop)
    window = Window(warmup, count, stop)
    await producer.start()
    await consumer.start()
    try:
        await _wait_assigned([consumer])
        _emit("READY")
        index = 0
        deadline = time.monotonic() + limit_s
        while not stop.is_set() and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            if not batch:
                continue
            pending = []
            for part in batch.values():
                for _record in part:
                    # Spread the mapper's outputs over the inputs exactly (same totals).
                    for n, key, value, headers, topics in (
                        (*commands, regions),
                        (*audit, [settings.audit_topic]),
                    ):
                        k = (index + 1) * n // inputs - index * n // inputs
                        for j in range(k):
                            pending.append(
                                await producer.send(
                                    topics[(index + j) % len(topics)],
                                    value=value,
                                    key=key,
                                    headers=headers,
                                )
                            )
                    index += 1
            await asyncio.gather(*pending)
            await consumer.commit({tp: part[-1].offset + 1 for tp, part in batch.items() if part})
            window.add(sum(len(p) for p in batch.values()))
    finally:
        await consumer.stop()
        await producer.stop()
    return {"window": window.result(), "peak_rss_mb": _peak_rss_mb()}


async def run_redis_ceiling(
    url: str, keys_file: str, warmup: int, count: int | None, batch: int
) -> dict[str, Any]:
    """Pipelined DELs of the keys each command removes, straight to the same Redis."""
    from redis.asyncio import Redis

    per_command: list[list[str]] = json.loads(_read(keys_file))
    redis = Redis.from_url(url)
    stop = asyncio.Event()
    window = Window(warmup, count, stop)
    _emit("READY")
    try:
        for start in range(0, len(per_command), batch):
            chunk = per_command[start : start + batch]
            pipe = redis.pipeline(transaction=False)
            for keys_ in chunk:
                pipe.delete(*keys_)
            await pipe.execute()
            window.add(len(chunk))
            if stop.is_set():
                break
    finally:
        await redis.aclose()
    return {"window": window.result(), "peak_rss_mb": _peak_rss_mb()}


class Mode(StrEnum):
    ROLES = "roles"
    CEILING = "ceiling"
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
    plan: str = "{}",
    url: str = "",
    keys: str = "",
    batch: int = 500,
    profile: str = "",
) -> None:
    _pin(cpu)
    stack_env()
    if mode is Mode.ROLES:
        result = asyncio.run(
            run_roles_worker(prefix, roles.split(","), warmup, count, timeout, profile)
        )
    elif mode is Mode.CEILING:
        result = asyncio.run(run_kafka_ceiling(prefix, plan, warmup, count, timeout))
    else:
        result = asyncio.run(run_redis_ceiling(url, keys, warmup, count, batch))
    _emit("RESULT", result)


if __name__ == "__main__":
    app()
