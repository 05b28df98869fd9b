"""A sink role killed between its effect and its commit, and started again: the redelivery tests' tools.

Each test gets topics and groups of its own (`own_topics`), so its sinks see exactly
its commands. A "kill" cancels the role's loop while its flush hangs after the effect
and stops its clients without draining: nothing is committed, as when the process dies.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.ops.window import TimeWindow
from cachesync.consumers.pipeline.audit import AuditRecord, decode_audits
from cachesync.consumers.pipeline.kafka import make_producer
from cachesync.consumers.pipeline.roles import SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.base import FlushResult, PurgeSink
from cachesync.schemas import SingleObjectCodec
from cachesync.topology.admin import apply_topics
from tests.helpers import eventually

S = TypeVar("S", bound=PurgeSink)


def dies_after_flush(cls: type[S]) -> type[S]:
    """`cls`, whose first flush applies (and records) its batch and then hangs, as a process
    killed before the commit would: `hung` is set, `flushed` holds the batch's command ids."""

    class Dying(cls):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.hung = asyncio.Event()
            self.flushed: list[str] = []

        async def flush(self) -> FlushResult:
            self.flushed = [c.command_id for c in self._pending]
            await super().flush()
            self.hung.set()
            await asyncio.Event().wait()  # never returns: the offsets are never committed
            raise AssertionError("unreachable")

    Dying.__name__ = f"Dying{cls.__name__}"
    return Dying


async def own_topics(settings: Settings, name: str) -> Settings:
    """Settings with topics and consumer groups of this test's own, the topics created."""
    run = uuid.uuid4().hex[:8]
    own = settings.model_copy(
        update={
            "group_prefix": f"{settings.group_prefix}-{name}-{run}",
            "topic_prefix": f"{settings.topic_prefix}{name}-{run}.",
        }
    )
    await apply_topics(own.kafka_bootstrap_servers, own.topology, own.topic_prefix)
    return own


async def send_commands(settings: Settings, commands: Sequence[PurgeCommand]) -> None:
    """Produce purges to their region's command topic, keyed by entity as the mapper does."""
    codec = SingleObjectCodec(settings.catalog)
    producer = make_producer(settings.kafka_bootstrap_servers, client_id="test-redelivery")
    await producer.start()
    try:
        for cmd in commands:
            await producer.send(
                settings.commands_topic(cmd.region),
                codec.encode("purge", cmd.to_record()),
                key=cmd.entity.encode(),
            )
        await producer.flush()
    finally:
        await producer.stop()


async def run_until_hung(role: SinkRole) -> asyncio.Task[None]:
    """Start `role` (its sink a `dies_after_flush` one) and wait until its flush hangs."""
    await role.start()
    task = asyncio.create_task(role.loop.run(asyncio.Event()))
    hung: asyncio.Event = role.sink.hung  # type: ignore[attr-defined]
    await asyncio.wait_for(hung.wait(), timeout=30)
    return task


async def kill(role: SinkRole, task: asyncio.Task[None]) -> None:
    """The kill: the loop is cancelled mid-flush, no drain and no commit; clients closed."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await role.stop()  # stops the consumer without committing (auto-commit is off)


async def run_until_committed(role: SinkRole, records: int, *, within: float = 30.0) -> None:
    """Run `role` until it has committed `records` records, then stop it (drained)."""
    await role.start()
    stop = asyncio.Event()
    task = asyncio.create_task(role.loop.run(stop))
    try:

        async def committed() -> bool:
            if task.done():
                task.result()  # the loop died: say why
            return role.loop.records_committed >= records

        await eventually(committed, within=within, what=f"{role.name} did not commit {records}")
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await role.stop()


async def committed_offsets(settings: Settings, group: str, topic: str) -> int:
    """The sum of `group`'s committed offsets on `topic` (0 when it committed nothing)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(
        meta.offset
        for tp, meta in offsets.items()
        if isinstance(tp, TopicPartition) and tp.topic == topic and meta.offset > 0
    )


async def audit_records(settings: Settings, since_ms: int) -> list[AuditRecord]:
    """Every audit record on the (test's own) audit topic since `since_ms`, one per command
    (a sink's record about several commands of a flush is expanded)."""
    codec = SingleObjectCodec(settings.catalog)
    found: list[AuditRecord] = []
    async with TimeWindow(settings, [settings.audit_topic], since_ms=since_ms) as window:
        async for records in window.batches():
            for record in records:
                found += decode_audits(codec, record.value or b"")
    return found
