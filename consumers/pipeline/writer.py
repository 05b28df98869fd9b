"""The one way commands are written: encoded, keyed by entity, with the headers consumers read.

The live mapper and a replay both write through `CommandWriter`, so a replayed
command is the same bytes and headers as a live one, plus the replay's marks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer

from cachesync.consumers import telemetry
from cachesync.consumers.commands import COMMAND_TYPES, Command
from cachesync.consumers.errors import ProduceRefused
from cachesync.consumers.pipeline import headers
from cachesync.consumers.pipeline.sends import BatchedSends, Renew
from cachesync.schemas import Codec

_KIND_HEADERS = {kind: (headers.KIND, kind.encode()) for kind in COMMAND_TYPES}
# What differs between an event's commands of one kind, apart from a split purge's parts.
_VARYING = ("command_id", "region")


class CommandWriter:
    """Gathers commands for their region's topic; `send` hands them over and waits for acks.

    Keyed by entity, so one entity's commands stay in order on one partition. The
    current span's trace context goes into every command added while it is active.
    With `renew` (see BatchedSends), a command the broker will never accept does not
    hold up the others: `send` raises ProduceRefused naming the `origin` of each refused
    command (what the caller passed to `add`, e.g. the event's place in its batch).
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        codec: Codec,
        topic_for: Callable[[str], str],
        *,
        replay_id: str | None = None,
        cdn: bool = True,
        renew: Renew | None = None,
    ) -> None:
        self.codec = codec
        self.topic_for = topic_for
        self._sends = BatchedSends(producer, renew=renew)
        self._origins: list[int] = []  # per message added: the origin it was added with
        self._marks: headers.Headers = []
        self._topics: dict[str, str] = {}  # region -> its command topic
        if replay_id is not None:
            self._marks.append((headers.REPLAY, replay_id.encode()))
        if not cdn:
            self._marks.append((headers.REPLAY_CDN, b"off"))

    def add(
        self,
        commands: Iterable[Command],
        *,
        origin: int = -1,
        trace: headers.Headers | None = None,
    ) -> None:
        """One event's commands, in the trace of the current span, or in `trace` (trace
        context headers to pass on as they are) when given."""
        context: headers.Headers
        if trace is None:
            context = []
            telemetry.inject_context(context)
        else:
            context = trace
        topics = self._topics
        shared = [*context, *self._marks]
        event_ids: dict[str, tuple[str, bytes]] = {}  # one event's commands share theirs
        commands = list(commands)
        for command, value in zip(commands, self._encode(commands), strict=True):
            topic = topics.get(command.region)
            if topic is None:
                topic = topics[command.region] = self.topic_for(command.region)
            event_id = event_ids.get(command.origin_event_id)
            if event_id is None:
                event_id = event_ids[command.origin_event_id] = (
                    headers.EVENT_ID,
                    command.origin_event_id.encode(),
                )
            self._sends.add(
                topic,
                command.entity.encode(),
                value,
                [_KIND_HEADERS[command.kind], event_id, *shared],
            )
            self._origins.append(origin)

    def _encode(self, commands: list[Command]) -> list[bytes]:
        return encode_commands(self.codec, [(c.schema_type, c.to_record()) for c in commands])

    def __len__(self) -> int:
        return len(self._sends)

    async def send(self) -> None:
        """Send everything added; TransientError when the broker did not ack all of it,
        ProduceRefused (by origin) when it acked all but commands it will never accept."""
        origins, self._origins = self._origins, []
        try:
            await self._sends.send()
        except ProduceRefused as exc:
            by_origin: dict[int, str] = {}
            for position, why in exc.refused.items():
                by_origin[origins[position]] = by_origin.get(origins[position], why)
            raise ProduceRefused(by_origin) from exc


def encode_commands(codec: Codec, records: Sequence[tuple[str, dict[str, Any]]]) -> list[bytes]:
    """The messages of an event's commands, given as (schema type, record), in order.
    Those of one kind are encoded together: an event's purges differ only in their region
    and id, as do a wedding's warms, and what they share is encoded once
    (`Codec.encode_alike`: a fifth of the mapper's CPU was encoding commands)."""
    values: list[bytes] = []
    start = 0
    for end in range(1, len(records) + 1):
        if end == len(records) or records[end][0] != records[start][0]:
            values += codec.encode_alike(
                records[start][0], [r for _, r in records[start:end]], _VARYING
            )
            start = end
    return values
