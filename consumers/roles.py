"""The running roles: the mapper (events -> command topics) and a sink (command topic -> cache).

Each role is a Kafka batch handler plugged into `CommitAfterEffect`. `Pipeline`
starts any set of them in one process and stops them cleanly on a signal.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from consumers import telemetry
from consumers.codecs import close_codec, codec_for, resolve, start_codec
from consumers.commands import COMMAND_TYPES, Command
from consumers.errors import (
    BadInput,
    InvalidRecord,
    Oversized,
    PermanentSinkError,
    bad_input_from_serde,
)
from consumers.kafka import (
    CommitAfterEffect,
    DeadLetters,
    Record,
    header,
    make_consumer,
    make_producer,
    send_all,
)
from consumers.mapper import Mapper
from consumers.replay import REPLAY_CDN_HEADER
from consumers.settings import Settings
from consumers.sinks.base import Sink
from consumers.state import RelationshipIndex
from consumers.validation import validate_event
from schemas import Codec, SerdeError

log = logging.getLogger(__name__)


@dataclass
class RoleStats:
    """Counters a person watching `run all` wants; metrics carry the same figures."""

    records: int = 0
    produced: Counter[str] = field(default_factory=Counter)
    applied: int = 0
    skipped: int = 0
    dead_lettered: int = 0


class MapperRole:
    """Consumes content topics, maps events through the rules, produces commands per region."""

    name = "mapper"

    def __init__(self, settings: Settings, *, codec: Codec | None = None) -> None:
        self.settings = settings
        self.codec = codec or codec_for(settings)
        self.stats = RoleStats()
        self._state_redis = Redis.from_url(str(settings.state_redis_url), socket_timeout=5)
        self.mapper = Mapper(
            settings.topology, RelationshipIndex(self._state_redis, settings.topology)
        )
        self.producer: AIOKafkaProducer = make_producer(
            settings.kafka_bootstrap_servers, client_id="cachesync-mapper"
        )
        self.consumer = make_consumer(
            settings.kafka_bootstrap_servers,
            *settings.content_topics,
            group_id=settings.group_id("mapper"),
            client_id="cachesync-mapper",
        )
        self.dead_letters = DeadLetters(self.producer, settings.dead_letter_topic, self.name)
        self.loop = CommitAfterEffect(
            self.consumer, self.handle, name=self.name, max_records=settings.consumer_max_records
        )

    async def start(self) -> None:
        await start_codec(self.codec)
        await self.producer.start()
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.producer.stop()
        await self._state_redis.aclose()
        await close_codec(self.codec)

    async def handle(self, records: list[Record]) -> None:
        messages: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []
        for record in records:
            self.stats.records += 1
            try:
                commands = await self._map(record)
            except BadInput as exc:
                await self.dead_letters.send(record, exc)
                self.stats.dead_lettered += 1
                continue
            for command in commands:
                value = self.codec.encode(command.schema_type, command.to_record())
                topic = self.settings.commands_topic(command.region)
                headers = [
                    ("cachesync.kind", command.kind.encode()),
                    ("cachesync.event_id", command.origin_event_id.encode()),
                    *[
                        (k, v)
                        for k, v in (record.headers or ())
                        if k in ("traceparent", "tracestate")
                    ],
                ]
                messages.append((topic, command.entity.encode(), value, headers))
                self.stats.produced[command.region] += 1
                telemetry.commands_out.add(1, {"kind": command.kind, "region": command.region})
        await send_all(self.producer, messages)

    async def _map(self, record: Record) -> list[Command]:
        value = record.value or b""
        if len(value) > self.settings.max_event_bytes:
            raise Oversized(f"{len(value)} bytes > limit {self.settings.max_event_bytes}")
        await resolve(self.codec, value)
        try:
            decoded = self.codec.decode(value)
        except SerdeError as exc:
            raise bad_input_from_serde(exc) from exc
        telemetry.events_in.add(1, {"event_type": decoded.type_name})
        validate_event(decoded.type_name, decoded.record)
        return await self.mapper.map_event(decoded.type_name, decoded.record)


class SinkRole:
    """Consumes one region's command topic and applies it through one sink."""

    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        *,
        codec: Codec | None = None,
        auto_offset_reset: str = "earliest",
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.name = f"sink.{sink.region}.{sink.kind}"
        self.codec = codec or codec_for(settings)
        self.stats = RoleStats()
        client_id = f"cachesync-{self.name}"
        self.producer = make_producer(settings.kafka_bootstrap_servers, client_id=client_id)
        self.consumer = make_consumer(
            settings.kafka_bootstrap_servers,
            settings.commands_topic(sink.region),
            group_id=settings.group_id("sink", sink.region, sink.kind),
            client_id=client_id,
            auto_offset_reset=auto_offset_reset,
        )
        self.dead_letters = DeadLetters(self.producer, settings.dead_letter_topic, self.name)
        self.loop = CommitAfterEffect(
            self.consumer, self.handle, name=self.name, max_records=settings.consumer_max_records
        )

    async def start(self) -> None:
        await start_codec(self.codec)
        await self.sink.setup()
        await self.producer.start()
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.producer.stop()
        await self.sink.close()
        await close_codec(self.codec)

    async def handle(self, records: list[Record]) -> None:
        by_id: dict[str, Record] = {}
        for record in records:
            self.stats.records += 1
            try:
                command = await self._decode(record)
            except BadInput as exc:
                await self.dead_letters.send(record, exc)
                self.stats.dead_lettered += 1
                continue
            if not self.sink.accepts(command) or (
                self.sink.is_cdn and header(record, REPLAY_CDN_HEADER) == b"off"
            ):
                self.stats.skipped += 1
                continue
            by_id[command.command_id] = record
            self.sink.add(command)
        result = await self.sink.flush()
        self.stats.applied += result.applied
        for rejected in result.rejected:
            await self.dead_letters.send(
                by_id[rejected.command.command_id], PermanentSinkError(rejected.error)
            )
            self.stats.dead_lettered += 1

    async def _decode(self, record: Record) -> Command:
        await resolve(self.codec, record.value or b"")
        try:
            decoded = self.codec.decode(record.value or b"")
        except SerdeError as exc:
            raise bad_input_from_serde(exc) from exc
        model = COMMAND_TYPES.get(decoded.type_name)
        if model is None:
            raise BadInput(f"{decoded.type_name!r} is not a command")
        try:
            command: Command = model.from_record(decoded.record)
        except ValueError as exc:
            raise InvalidRecord(f"{decoded.type_name}: {exc}") from exc
        return command


Role = MapperRole | SinkRole


async def run_roles(roles: list[Role], stop: asyncio.Event) -> None:
    """Start every role, run until `stop`, then finish in-flight batches and close.

    Stopping is cooperative: each loop finishes (and commits) the batch in hand before
    it returns, so Ctrl-C never cancels a write half-way.
    """
    started: list[Role] = []
    try:
        for role in roles:
            await role.start()
            started.append(role)
        tasks = [asyncio.create_task(r.loop.run(stop), name=r.name) for r in roles]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise task.exception()  # type: ignore[misc]
    finally:
        for role in reversed(started):
            try:
                await role.stop()
            except Exception:  # closing must go on for the others
                log.exception("%s: error while stopping", role.name)
