"""Wire encodings for events and commands.

Exception tree (all carry a short `reason` used as the dead-letter header). These are
the lowest branch of the project's one tree, whose root is here because schemas/ is the
lowest layer; `cachesync.consumers.errors` re-exports them and draws the whole tree:

    CachesyncError
    └── BadInput                 a record no retry will fix (dead-letter topic)
        └── SerdeError
            ├── UndecodableMessage   bytes that are no known framing, or a body that does not parse
            ├── UnknownSchema        a well-framed message whose fingerprint / schema id we do not hold
            └── InvalidRecord        a record that does not match its schema (on encode or decode)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Protocol

import fastavro
from fastavro import schemaless_reader, schemaless_writer
from fastavro.validation import validate

from cachesync.schemas.catalog import SchemaCatalog, SchemaVersion, millis_as_longs

SINGLE_OBJECT_MAGIC = b"\xc3\x01"


class CachesyncError(Exception):
    """Root of every error cachesync raises on purpose (drawn in cachesync.consumers.errors)."""


class BadInput(CachesyncError):
    """A record that no retry will fix; it goes to the dead-letter topic with `reason`."""

    reason = "bad_input"


class SerdeError(BadInput):
    """A message this encoding cannot turn into a record, or a record into a message."""

    reason = "serde"


class UndecodableMessage(SerdeError):
    reason = "undecodable"


class UnknownSchema(SerdeError):
    reason = "unknown_schema"


class InvalidRecord(SerdeError):
    reason = "invalid_record"


@dataclass(frozen=True)
class Decoded:
    type_name: str
    record: dict[str, Any]
    writer_version: int


class Codec(Protocol):
    """Turns records into bytes and back. `resolve` fetches what `decode` will need
    (a registry lookup); it is a no-op for encodings that are self-contained."""

    def encode(self, type_name: str, record: dict[str, Any]) -> bytes: ...

    def encode_alike(
        self, type_name: str, records: Sequence[dict[str, Any]], varying: tuple[str, ...]
    ) -> list[bytes]: ...

    def decode(self, data: bytes) -> Decoded: ...

    async def resolve(self, data: bytes) -> None: ...


class SingleObjectCodec:
    """Avro single-object encoding: `C3 01`, the 8-byte fingerprint, the binary body.

    The fingerprint names the writer schema; the reader is the newest version of
    the same type in the catalog, so old events decode after a schema evolves.
    """

    def __init__(self, catalog: SchemaCatalog) -> None:
        self.catalog = catalog

    def encode(
        self, type_name: str, record: dict[str, Any], *, version: int | None = None
    ) -> bytes:
        """Encode with the newest schema of the type (or an older `version`, as an old producer would)."""
        writer = writer_schema(self.catalog, type_name, version)
        return SINGLE_OBJECT_MAGIC + writer.fingerprint + write_body(writer, record)

    def encode_alike(
        self, type_name: str, records: Sequence[dict[str, Any]], varying: tuple[str, ...]
    ) -> list[bytes]:
        """`encode` of each record, in order, with the newest schema; see `write_bodies`."""
        writer = writer_schema(self.catalog, type_name, None)
        head = SINGLE_OBJECT_MAGIC + writer.fingerprint
        return [head + body for body in write_bodies(writer, records, varying)]

    async def resolve(self, data: bytes) -> None:
        return None

    def decode(self, data: bytes) -> Decoded:
        if len(data) < 10 or data[:2] != SINGLE_OBJECT_MAGIC:
            raise UndecodableMessage(
                f"not Avro single-object encoding (first bytes {data[:4].hex() or 'empty'})"
            )
        writer = self.catalog.by_fingerprint(bytes(data[2:10]))
        if writer is None:
            raise UnknownSchema(f"unknown schema fingerprint {bytes(data[2:10]).hex()}")
        return read_body(self.catalog, writer, data[10:])


def writer_schema(catalog: SchemaCatalog, type_name: str, version: int | None) -> SchemaVersion:
    try:
        if version is None:
            return catalog.latest(type_name)
        return next(v for v in catalog.versions(type_name) if v.version == version)
    except (KeyError, StopIteration):
        raise UnknownSchema(f"no schema for type {type_name!r} version {version}") from None


def write_body(writer: SchemaVersion, record: dict[str, Any]) -> bytes:
    """The Avro binary body of `record`; InvalidRecord, naming the field, if it does not fit.

    fastavro's writer refuses a wrong type or a missing field by itself; its full
    `validate` is run only then, for the message: run on every record it cost more than
    the encoding (a ValidationError is built, JSON and all, for every union branch
    that does not match).
    """
    try:
        # Timestamps as epoch ms first (what the pipeline's records hold): some 12% less
        # than the logical-type writer, which checks every timestamp for a datetime.
        return _write(writer.reading, record)
    except Exception:
        try:
            return _write(writer.parsed, record)  # a datetime among them
        except Exception as exc:  # TypeError, ValueError, KeyError, struct.error, ...
            raise _invalid(writer, record, exc) from exc


def write_bodies(
    writer: SchemaVersion, records: Sequence[dict[str, Any]], varying: tuple[str, ...]
) -> list[bytes]:
    """`write_body` of each record, in order; a record equal to the one before it in every
    field but those named in `varying` shares that one's encoding of the other fields.

    An Avro record's binary body is its fields' encodings one after the other, with
    nothing between them: so the body is written in runs of consecutive fields, and a run
    none of whose fields varies is written once for records alike. The mapper's commands
    of one event are such records: its purge in each region differs from the others only
    in its id and region (two strings), and the same holds for a wedding's warms. A purge
    was some 9 us to encode whole; fastavro's every call costs about 2, so the varying
    strings are written here (`_string`), and the shared runs by fastavro. Records not
    alike, and any that does not fit (which `write_body` refuses, naming the field), are
    written whole.
    """
    runs = _runs(writer, varying)
    if runs is None or len(records) < 2:
        return [write_body(writer, record) for record in records]
    bodies: list[bytes] = []
    parts: list[bytes] = []
    same = itemgetter(*runs.fixed)
    fixed: Any = None  # the fixed fields' values of the record `parts` was written for
    for record in records:
        try:
            if not parts or same(record) != fixed:
                parts = [_write(run, record) if run else b"" for run in runs.schemas]
                fixed = same(record)
            for i, name in runs.strings:
                parts[i] = _string(record[name])
        except Exception:
            parts = []
            bodies.append(write_body(writer, record))
            continue
        bodies.append(b"".join(parts))
    return bodies


@dataclass(frozen=True)
class _Runs:
    """A record schema cut into runs of consecutive fields: one per varying field, which
    is a string, and the fields between them, written by fastavro."""

    schemas: list[Any]  # per run, a record schema of its fields (parsed), None for a string
    strings: list[tuple[int, str]]  # (run, field) of the varying fields
    fixed: tuple[str, ...]  # the fields that do not vary


# Per (writer fingerprint, varying fields): the runs, or None (see `_cut`).
_RUNS: dict[tuple[bytes, tuple[str, ...]], _Runs | None] = {}


def _runs(writer: SchemaVersion, varying: tuple[str, ...]) -> _Runs | None:
    key = (writer.fingerprint, varying)
    if key not in _RUNS:
        _RUNS[key] = _cut(writer, varying)
    return _RUNS[key]


def _cut(writer: SchemaVersion, varying: tuple[str, ...]) -> _Runs | None:
    """None, for records to be written whole, when the schema is no record, a varying
    field is not a plain string, or no field (or every one) varies."""
    raw = millis_as_longs(writer.raw)
    if raw.get("type") != "record":
        return None
    fields = raw["fields"]
    names = [f["name"] for f in fields]
    fixed = tuple(n for n in names if n not in varying)
    if not fixed or len(fixed) == len(names):
        return None
    if any(f["type"] != "string" for f in fields if f["name"] in varying):
        return None
    groups: list[list[dict[str, Any]]] = []
    for f in fields:
        if f["name"] in varying or not groups or groups[-1][0]["name"] in varying:
            groups.append([f])
        else:
            groups[-1].append(f)
    # A named type (record, enum, fixed) defined in one run may be used by a later one:
    # the runs are parsed in order, sharing what each has named.
    named: dict[str, Any] = {}
    schemas = [
        None
        if group[0]["name"] in varying
        else fastavro.parse_schema(
            {
                "type": "record",
                "name": f"{raw['name']}__run{i}",
                "namespace": raw.get("namespace", ""),
                "fields": group,
            },
            named_schemas=named,
        )
        for i, group in enumerate(groups)
    ]
    strings = [(i, group[0]["name"]) for i, group in enumerate(groups) if schemas[i] is None]
    return _Runs(schemas=schemas, strings=strings, fixed=fixed)


def _write(schema: Any, record: dict[str, Any]) -> bytes:
    """`record`'s Avro body under a parsed `schema`, as fastavro writes it."""
    buf = io.BytesIO()
    schemaless_writer(buf, schema, record)
    return buf.getvalue()


def _string(value: str) -> bytes:
    """An Avro string: its UTF-8 length as a zigzag varint (a length is never negative, so
    zigzag is a doubling), then the bytes. TypeError for anything but a str."""
    if type(value) is not str:
        raise TypeError(f"not a string: {type(value).__name__}")
    data = value.encode()
    n = len(data) << 1
    if n < 0x80:  # a length under 64 bytes: one byte (command ids, regions)
        return bytes((n,)) + data
    head = bytearray()
    while n > 0x7F:
        head.append((n & 0x7F) | 0x80)
        n >>= 7
    head.append(n)
    return bytes(head) + data


def _invalid(writer: SchemaVersion, record: dict[str, Any], exc: Exception) -> InvalidRecord:
    """Why `record` does not fit `writer`, naming the field when `validate` can."""
    try:
        validate(record, writer.parsed, raise_errors=True)
    except Exception as detail:
        return InvalidRecord(f"{writer.type_name} v{writer.version}: {detail}")
    return InvalidRecord(f"{writer.type_name} v{writer.version}: {exc}")


def read_body(catalog: SchemaCatalog, writer: SchemaVersion, body: bytes) -> Decoded:
    reader = catalog.latest(writer.type_name)
    buf = io.BytesIO(body)
    try:
        # Written with the newest schema (nearly always): no reader schema, since fastavro
        # then reads directly instead of resolving one schema against the other (9.7 us
        # against 12.5 for a purge command).
        record = schemaless_reader(
            buf, writer.reading, None if reader.version == writer.version else reader.reading
        )
    except Exception as exc:  # truncated bodies raise EOFError, garbage raises anything
        raise UndecodableMessage(
            f"{writer.type_name} v{writer.version}: body does not decode ({type(exc).__name__})"
        ) from exc
    if buf.tell() != len(body):
        raise UndecodableMessage(
            f"{writer.type_name} v{writer.version}: {len(body) - buf.tell()} trailing bytes"
        )
    if not isinstance(record, dict):
        raise InvalidRecord(f"{writer.type_name}: decoded value is not a record")
    return Decoded(type_name=writer.type_name, record=record, writer_version=writer.version)
