"""Purge and warm commands: what the mapper emits and the sinks apply.

They mirror `schemas/avro/commands/*.avsc`; `to_record` / `from_record` convert to
and from the Avro record. Timestamps are epoch milliseconds throughout.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

_COMMAND_KEY = b"cachesync.command"


def command_id(origin_event_id: str, region: str, kind: str, part: str = "") -> str:
    """Deterministic id: a retried or replayed event yields the same command ids.

    A 128-bit BLAKE2b digest in UUID form: uuid.uuid5 did the same job at three times
    the cost, and the mapper makes six of these per event.
    """
    digest = hashlib.blake2b(
        f"{origin_event_id}|{region}|{kind}|{part}".encode(), digest_size=16, key=_COMMAND_KEY
    ).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:]}"


def to_millis(value: int | datetime) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return int(value)


class _Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_type: ClassVar[str]

    command_id: str
    origin_event_id: str
    origin_event_type: str
    origin_occurred_at: int
    region: str
    entity: str
    version: int
    issued_at: int
    replay: bool = False

    def to_record(self) -> dict[str, Any]:
        # The fields as they are (a shallow copy): model_dump's serializer cost several
        # times as much, per command, for plain strings and numbers.
        return dict(self.__dict__)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Any:
        data = dict(record)
        for name in ("origin_occurred_at", "issued_at", "deadline"):
            if name in data:
                data[name] = to_millis(data[name])
        return cls.model_validate(data)


class PurgeCommand(_Command):
    schema_type: ClassVar[str] = "purge"
    kind: ClassVar[Literal["purge"]] = "purge"

    scope: str
    keys: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    # A purge too large for one message is split into parts (mapping/mapper.py); this says
    # how many parts follow in the same partition. The event's applied marker, which the
    # later tiers wait for, is set only at the last part (0).
    parts_after: int = 0

    def to_record(self) -> dict[str, Any]:
        record = dict(self.__dict__)
        for name in ("keys", "tags", "urls", "prefixes"):
            record[name] = list(record[name])
        return record


class WarmCommand(_Command):
    schema_type: ClassVar[str] = "warm"
    kind: ClassVar[Literal["warm"]] = "warm"

    wedding_id: str | None = None
    photo_urls: tuple[str, ...] = ()
    vendor_asset_urls: tuple[str, ...] = ()
    guest_portal_urls: tuple[str, ...] = ()
    priority: int = 5
    deadline: int

    def to_record(self) -> dict[str, Any]:
        record = dict(self.__dict__)
        for name in ("photo_urls", "vendor_asset_urls", "guest_portal_urls"):
            record[name] = list(record[name])
        return record

    @property
    def urls(self) -> tuple[str, ...]:
        return self.photo_urls + self.vendor_asset_urls + self.guest_portal_urls


Command = PurgeCommand | WarmCommand
COMMAND_TYPES: dict[str, type[PurgeCommand] | type[WarmCommand]] = {
    "purge": PurgeCommand,
    "warm": WarmCommand,
}
