"""Avro schemas of every event and command, and their wire encodings.

`SchemaCatalog` loads the versioned `*.avsc` files kept under `avro/`; a `Codec`
turns records into bytes and back (single-object encoding by default).
"""

from schemas.catalog import SchemaCatalog, SchemaVersion
from schemas.serde import (
    Codec,
    Decoded,
    InvalidRecord,
    SerdeError,
    SingleObjectCodec,
    UndecodableMessage,
    UnknownSchema,
)

__all__ = [
    "Codec",
    "Decoded",
    "InvalidRecord",
    "SchemaCatalog",
    "SchemaVersion",
    "SerdeError",
    "SingleObjectCodec",
    "UndecodableMessage",
    "UnknownSchema",
]
