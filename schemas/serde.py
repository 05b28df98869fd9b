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
from dataclasses import dataclass
from typing import Any, Protocol

from fastavro import schemaless_reader, schemaless_writer
from fastavro.validation import validate

from cachesync.schemas.catalog import SchemaCatalog, SchemaVersion

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
    buf = io.BytesIO()
    try:
        # Timestamps as epoch ms first (what the pipeline's records hold): some 12% less
        # than the logical-type writer, which checks every timestamp for a datetime.
        schemaless_writer(buf, writer.reading, record)
    except Exception:
        buf = io.BytesIO()
        try:
            schemaless_writer(buf, writer.parsed, record)  # a datetime among them
        except Exception as exc:  # TypeError, ValueError, KeyError, struct.error, ...
            raise _invalid(writer, record, exc) from exc
    return buf.getvalue()


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
