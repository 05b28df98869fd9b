"""Purge and warm commands: what the mapper emits and the sinks apply.

They mirror `schemas/avro/commands/*.avsc`; `to_record` / `from_record` convert to
and from the Avro record. Timestamps are epoch milliseconds throughout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from datetime import datetime
from operator import attrgetter
from typing import Any, ClassVar, Literal

# The keyed BLAKE2b state command ids start from: a copy of it is a quarter cheaper than
# keying a new one (0.74 against 0.98 us an id).
_COMMAND_HASH = hashlib.blake2b(digest_size=16, key=b"cachesync.command")


def command_id(origin_event_id: str, region: str, kind: str, part: str = "") -> str:
    """Deterministic id: a retried or replayed event yields the same command ids.

    A 128-bit BLAKE2b digest in UUID form: uuid.uuid5 did the same job at three times
    the cost, and the mapper makes six of these per event.
    """
    hashed = _COMMAND_HASH.copy()
    hashed.update(f"{origin_event_id}|{region}|{kind}|{part}".encode())
    digest = hashed.hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:]}"


def to_millis(value: int | datetime) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return int(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Command:
    """What every command carries. Plain frozen dataclasses, not validating models: a
    command is built by the mapper from rendered strings, or decoded from an Avro record
    that its schema already checked, and the mapper builds four to six per event, which
    pydantic's validation made the largest single cost of mapping (5 us each)."""

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
        """The Avro record: every field by name (its arrays as tuples, which fastavro
        writes as it writes lists)."""
        names, values = _RECORD_FIELDS[type(self)]
        return dict(zip(names, values(self), strict=True))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Any:
        """The command an Avro record (of its schema, any version) describes; ValueError
        if it is not one (a field missing or unknown)."""
        data = dict(record)
        for name in ("origin_occurred_at", "issued_at", "deadline"):
            if name in data:
                data[name] = to_millis(data[name])
        for name in cls._lists:
            if name in data:
                data[name] = tuple(data[name])
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"{cls.__name__}: {exc}") from None

    _lists: ClassVar[tuple[str, ...]] = ()


def _fields(cls: type) -> tuple[str, ...]:
    """Every field of a command class, its bases' first (the Avro schema's order)."""
    return tuple(f.name for f in dataclass_fields(cls))


@dataclass(frozen=True, slots=True, kw_only=True)
class PurgeCommand(_Command):
    schema_type: ClassVar[str] = "purge"
    kind: ClassVar[Literal["purge"]] = "purge"
    _lists: ClassVar[tuple[str, ...]] = ("keys", "tags", "urls", "prefixes")

    scope: str
    keys: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    # A purge too large for one message is split into parts (mapping/mapper.py); this says
    # how many parts follow in the same partition. The event's applied marker, which the
    # later tiers wait for, is set only at the last part (0).
    parts_after: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class WarmCommand(_Command):
    schema_type: ClassVar[str] = "warm"
    kind: ClassVar[Literal["warm"]] = "warm"
    _lists: ClassVar[tuple[str, ...]] = ("photo_urls", "vendor_asset_urls", "guest_portal_urls")

    wedding_id: str | None = None
    photo_urls: tuple[str, ...] = ()
    vendor_asset_urls: tuple[str, ...] = ()
    guest_portal_urls: tuple[str, ...] = ()
    priority: int = 5
    deadline: int

    @property
    def urls(self) -> tuple[str, ...]:
        return self.photo_urls + self.vendor_asset_urls + self.guest_portal_urls


# Per command class: its fields' names and one getter of all their values.
_RECORD_FIELDS: dict[type, tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]] = {
    cls: (names, attrgetter(*names))
    for cls in (PurgeCommand, WarmCommand)
    for names in [_fields(cls)]
}

Command = PurgeCommand | WarmCommand
COMMAND_TYPES: dict[str, type[PurgeCommand] | type[WarmCommand]] = {
    "purge": PurgeCommand,
    "warm": WarmCommand,
}
