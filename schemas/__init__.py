"""Avro schemas of every event and command, and their wire encodings.

`SchemaCatalog` loads the versioned `*.avsc` files kept under `avro/`; a `Codec`
turns records into bytes and back (single-object encoding by default).
"""

from cachesync.schemas.catalog import SchemaCatalog, SchemaVersion, is_timestamp
from cachesync.schemas.compat import CompatProblem, can_read, check_catalog
from cachesync.schemas.registry import ConfluentCodec, RegistryUnavailable
from cachesync.schemas.serde import (
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
    "CompatProblem",
    "ConfluentCodec",
    "Decoded",
    "InvalidRecord",
    "RegistryUnavailable",
    "SchemaCatalog",
    "SchemaVersion",
    "SerdeError",
    "SingleObjectCodec",
    "UndecodableMessage",
    "UnknownSchema",
    "can_read",
    "check_catalog",
    "is_timestamp",
]
