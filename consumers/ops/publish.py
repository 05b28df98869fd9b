"""Producing platform events: the envelope, the encoding, the topic and the key each type gets.

The platform's services do this in production; cachesync uses it for `cachesync
publish`, the demo, the tests and the benchmarks, so they all put exactly what the
platform would on the wire.

Each content topic is keyed by its entity's id, so that one entity's events stay in
order: the key is the field of the topology's `entity` templates ("wedding:{wedding_id}")
that every event type on the topic carries (`EntityKeys`). `content.vendors` holds
vendor events and `vendor.linked` (entity: the wedding), which all carry `vendor_id`: a
vendor's links and its updates stay in order. Adding an event type therefore needs a
schema and a rule, and no code.
"""

from __future__ import annotations

import datetime as dt
import difflib
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import fastavro
from aiokafka import AIOKafkaProducer

from cachesync.consumers.errors import BadInput, ConfigError
from cachesync.consumers.mapping.validation import validate_event
from cachesync.consumers.pipeline.codecs import close_codec, codec_for, start_codec
from cachesync.consumers.pipeline.kafka import KafkaConnection, make_producer
from cachesync.consumers.settings import Settings
from cachesync.schemas import Codec, SchemaCatalog, is_timestamp
from cachesync.topology import Topology, load_topology
from cachesync.topology.model import ContentTopic
from cachesync.topology.templates import MissingField, fields_of, render_all

# The envelope fields `prepare_event` fills when the input leaves them out.
FILLED = ("event_id", "occurred_at", "source")
SOURCE = "cachesync-publish"


def new_event(
    event_type: str,
    *,
    source: str = "demo",
    occurred_at: int | None = None,
    event_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """An event record with its envelope filled in."""
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "occurred_at": occurred_at if occurred_at is not None else int(time.time() * 1000),
        "source": source,
        "schema_version": 1,
        **fields,
    }


class EntityKeys:
    """The field that keys each event type, per content topic, from the topology's rules."""

    def __init__(self, topology: Topology, catalog: SchemaCatalog) -> None:
        self._fields: dict[str, str] = {}
        for topic in topology.topics.content:
            field = _key_field(topic, topology, catalog)
            for event_type in topic.events:
                self._fields[event_type] = field

    def field(self, event_type: str) -> str:
        try:
            return self._fields[event_type]
        except KeyError:
            raise ConfigError(
                f"topology: event type {event_type!r} is on no content topic"
            ) from None

    def key(self, event_type: str, record: Mapping[str, Any]) -> bytes:
        return str(record[self.field(event_type)]).encode()


def _key_field(topic: ContentTopic, topology: Topology, catalog: SchemaCatalog) -> str:
    """The entity field of the topic's rules that every event type on it carries; of
    several, the one most rules' entity names."""
    carried = [catalog.latest(t).field_names for t in topic.events if t in catalog] or [frozenset()]
    used: Counter[str] = Counter()
    for event_type in topic.events:
        rule = topology.rules.get(event_type)
        if rule is not None:
            used.update(fields_of(rule.entity))
    shared = [f for f, _ in used.most_common() if all(f in names for names in carried)]
    if not shared:
        raise ConfigError(
            f"topology: content topic {topic.name}: no field of its rules' entity templates "
            f"({', '.join(sorted(used)) or 'none'}) is carried by every event type on it, "
            "so its events cannot be keyed by entity"
        )
    return shared[0]


@cache
def _default_keys() -> EntityKeys:
    return EntityKeys(load_topology(), SchemaCatalog())


def event_key(event_type: str, record: Mapping[str, Any], keys: EntityKeys | None = None) -> bytes:
    """The Kafka key of an event: its topic's entity id (default: the default topology's)."""
    return (keys or _default_keys()).key(event_type, record)


# -- hand-written events (`cachesync publish`) ------------------------------------------
class InvalidEvent(ValueError):
    """A hand-written event that its schema or the field checks refuse; one line per problem."""

    def __init__(self, event_type: str, problems: list[str]) -> None:
        super().__init__(f"{event_type}: " + "; ".join(problems))
        self.event_type = event_type
        self.problems = problems


@dataclass(frozen=True)
class PreparedEvent:
    """An event ready to send: the record as the mapper will read it (schema defaults in),
    its bytes, topic and key, the envelope fields that were filled, and what its rule purges."""

    event_type: str
    record: dict[str, Any]
    value: bytes
    topic: str
    key: bytes
    filled: tuple[str, ...]
    purges: dict[str, list[str]]  # keys / tags / urls / prefixes, before any fan-out


def prepare_event(
    settings: Settings, event_type: str, fields: object, *, codec: Codec | None = None
) -> PreparedEvent:
    """Check `fields` (parsed JSON) against the newest schema of `event_type`, fill
    event_id / occurred_at / source when absent, and encode it; InvalidEvent lists every
    problem by field."""
    catalog = settings.catalog
    events = catalog.types("events")
    if event_type not in events:
        close = difflib.get_close_matches(event_type, events, n=1)
        hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(events)}"
        raise InvalidEvent(event_type, [f"no schema for this event type{hint}"])
    if not isinstance(fields, dict):
        raise InvalidEvent(event_type, [f"expected a JSON object, got {type(fields).__name__}"])
    schema = catalog.latest(event_type)
    record = dict(fields)
    filled = tuple(name for name in FILLED if record.get(name) is None)
    defaults = {"event_id": str(uuid.uuid4()), "occurred_at": int(time.time() * 1000)}
    for name in filled:
        record[name] = defaults.get(name, SOURCE)
    problems = _schema_problems(schema.raw, record)
    if problems:
        raise InvalidEvent(event_type, problems)
    try:
        validate_event(event_type, record)
    except BadInput as exc:
        raise InvalidEvent(event_type, [str(exc).removeprefix(f"{event_type}: ")]) from None
    codec = codec or codec_for(settings)
    value = codec.encode(event_type, record)
    # As the mapper reads it (defaults filled in), its times shown as times: decoding
    # gives them as epoch milliseconds, the unit the pipeline works in.
    decoded = schema.with_datetimes(codec.decode(value).record)
    try:
        topic = settings.topology.content_topic_for(event_type)
    except KeyError:
        raise InvalidEvent(
            event_type, [f"no content topic lists it in {settings.topology_file}"]
        ) from None
    keys = EntityKeys(settings.topology, catalog)
    return PreparedEvent(
        event_type=event_type,
        record=decoded,
        value=value,
        topic=settings.topic(topic.name),
        key=keys.key(event_type, decoded),
        filled=filled,
        purges=_purges(settings.topology, event_type, decoded),
    )


def _schema_problems(schema: Mapping[str, Any], record: dict[str, Any]) -> list[str]:
    """Unknown fields, missing required ones, and values of the wrong type, by field.
    Times may be given as ISO 8601 text; they are turned into epoch milliseconds here."""
    fields = {f["name"]: f for f in schema["fields"]}
    problems: list[str] = []
    for name in record:
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"unknown field {name!r}{hint}")
    for name, field in fields.items():
        if name not in record:
            if "default" not in field:
                problems.append(f"{name}: required ({describe_type(field['type'])})")
            continue
        record[name] = _iso_to_millis(field["type"], record[name])
        single = {"type": "record", "name": "One", "fields": [field]}
        if not fastavro.validation.validate(
            {name: record[name]}, fastavro.parse_schema(single), raise_errors=False
        ):
            problems.append(f"{name}: {record[name]!r} is not {describe_type(field['type'])}")
    return problems


def describe_type(avro_type: Any) -> str:
    """An Avro type as a person reads it: "string", "null or string", "array of string"."""
    if isinstance(avro_type, list):
        return " or ".join(describe_type(t) for t in avro_type)
    if isinstance(avro_type, dict):
        if avro_type.get("logicalType") in ("timestamp-millis", "timestamp-micros"):
            return "a time (epoch milliseconds or ISO 8601)"
        if avro_type.get("type") == "array":
            return f"array of {describe_type(avro_type['items'])}"
        if avro_type.get("type") == "map":
            return f"map of {describe_type(avro_type['values'])}"
        if avro_type.get("type") == "enum":
            return "one of " + ", ".join(avro_type.get("symbols", []))
        return describe_type(avro_type.get("type"))
    return _PRIMITIVES.get(str(avro_type), str(avro_type))


_PRIMITIVES = {
    "string": "a string",
    "long": "an integer",
    "int": "an integer",
    "double": "a number",
    "float": "a number",
    "boolean": "true or false",
}


def _iso_to_millis(avro_type: Any, value: Any) -> Any:
    """ISO 8601 text for a timestamp field, as epoch milliseconds; anything else as is."""
    if not is_timestamp(avro_type) or not isinstance(value, str):
        return value
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return value  # reported as the wrong type
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp() * 1000)


def _purges(topology: Topology, event_type: str, record: Mapping[str, Any]) -> dict[str, list[str]]:
    """What the event's rule purges, rendered (a template naming a missing field says so)."""
    rule = topology.rules.get(event_type)
    if rule is None:
        return {}
    out: dict[str, list[str]] = {}
    for section in ("keys", "tags", "urls", "prefixes"):
        templates = getattr(rule.purge, section)
        try:
            items = render_all(templates, record)
        except MissingField as exc:
            items = [f"rule error: {exc}"]
        if items:
            out[section] = items
    return out


class EventPublisher:
    def __init__(
        self,
        settings: Settings,
        *,
        producer: AIOKafkaProducer | None = None,
        codec: Codec | None = None,
    ) -> None:
        self.settings = settings
        self.codec = codec or codec_for(settings)
        self.keys = EntityKeys(settings.topology, settings.catalog)
        # No linger: an event goes out at once, and events published while a request is in
        # flight travel together in the next. With aiokafka's linger some acks came far
        # later (at 100 events/s over 5 topics, produce -> ack p99 466 ms with 5 ms of
        # linger, 7 ms with none).
        self.producer = producer or make_producer(
            KafkaConnection.of(settings), client_id="cachesync-publisher", linger_ms=0
        )
        self._own_producer = producer is None

    async def start(self) -> None:
        await start_codec(self.codec)
        if self._own_producer:
            await self.producer.start()

    async def stop(self) -> None:
        if self._own_producer:
            await self.producer.stop()
        await close_codec(self.codec)

    def topic_for(self, event_type: str) -> str:
        return self.settings.topic(self.settings.topology.content_topic_for(event_type).name)

    async def publish(
        self,
        event_type: str,
        record: dict[str, Any],
        *,
        headers: list[tuple[str, bytes]] | None = None,
        wait: bool = True,
    ) -> None:
        value = self.codec.encode(event_type, record)
        fut = await self.producer.send(
            self.topic_for(event_type),
            value=value,
            key=self.keys.key(event_type, record),
            headers=headers or [],
        )
        if wait:
            await fut

    async def publish_prepared(self, event: PreparedEvent) -> tuple[int, int]:
        """Send a prepared event and wait for the broker's ack: (partition, offset)."""
        metadata = await self.producer.send_and_wait(event.topic, value=event.value, key=event.key)
        return metadata.partition, metadata.offset

    async def publish_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        await (await self.producer.send(topic, value=value, key=key))

    async def flush(self) -> None:
        await self.producer.flush()
