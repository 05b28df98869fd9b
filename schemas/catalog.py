"""The catalog of versioned Avro schemas kept in this repository.

Files are named `<type>.v<N>.avsc` (for example `photo.uploaded.v2.avsc`). The
highest version of a type is the reader schema; every version stays loadable as a
writer schema so that events written before an evolution still decode.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMA_ROOT = Path(__file__).parent / "avro"
_FILE_NAME = re.compile(r"^(?P<type>[a-z_][a-z0-9_.]*)\.v(?P<version>\d+)\.avsc$")


@dataclass(frozen=True)
class SchemaVersion:
    """One version of one event or command schema."""

    type_name: str  # "photo.uploaded", "purge", ...
    kind: str  # "events" or "commands"
    version: int
    raw: dict[str, Any]
    parsed: Any  # fastavro's parsed schema
    fingerprint: bytes  # 8-byte CRC-64-AVRO, little-endian, as the spec lays it on the wire
    path: Path
    # What decoding reads with: the same schema with timestamps as epoch milliseconds,
    # the unit the pipeline works in. fastavro turns a `timestamp-millis` long into a
    # timezone-aware datetime that every consumer turned back into milliseconds: a purge
    # command (three timestamps) decoded in 17.9 us with them and 11.2 us without.
    # Writing keeps `parsed`, which takes either form.
    reading: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reading", fastavro.parse_schema(millis_as_longs(self.raw)))

    def with_datetimes(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A decoded record with its top-level timestamps as UTC datetimes, for people to
        read (decoding gives epoch milliseconds)."""
        out = dict(record)
        for f in self.raw["fields"]:
            value = out.get(f["name"])
            if isinstance(value, int) and not isinstance(value, bool) and is_timestamp(f["type"]):
                out[f["name"]] = dt.datetime.fromtimestamp(value / 1000, dt.UTC)
        return out

    @property
    def field_names(self) -> frozenset[str]:
        return frozenset(f["name"] for f in self.raw["fields"])


def is_timestamp(avro_type: Any) -> bool:
    """Whether a field of this type holds a `timestamp-millis` (alone or in a union)."""
    types = avro_type if isinstance(avro_type, list) else [avro_type]
    return any(isinstance(t, dict) and t.get("logicalType") == "timestamp-millis" for t in types)


def millis_as_longs(schema: Any) -> Any:
    """`schema` with every `timestamp-millis` logical type dropped (its longs stay)."""
    if isinstance(schema, list):
        return [millis_as_longs(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: millis_as_longs(value)
        for key, value in schema.items()
        if not (key == "logicalType" and value == "timestamp-millis")
    }


class SchemaCatalog:
    """Every schema version under a root folder, indexed by type and fingerprint."""

    def __init__(self, root: Path = SCHEMA_ROOT) -> None:
        self.root = root
        self._versions: dict[str, dict[int, SchemaVersion]] = {}
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        for path in sorted(root.glob("*/*.avsc")):
            match = _FILE_NAME.match(path.name)
            if match is None:
                raise ValueError(f"{path}: schema files must be named <type>.v<N>.avsc")
            raw = json.loads(path.read_text())
            parsed = fastavro.parse_schema(raw)  # with its parse hint: writers then skip re-parsing
            canonical = to_parsing_canonical_form(parsed)
            fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
            sv = SchemaVersion(
                type_name=match["type"],
                kind=path.parent.name,
                version=int(match["version"]),
                raw=raw,
                parsed=parsed,
                fingerprint=fp,
                path=path,
            )
            self._versions.setdefault(sv.type_name, {})[sv.version] = sv
            self._by_fingerprint[fp] = sv
        # Looked up for every message encoded and decoded.
        self._latest = {t: vs[max(vs)] for t, vs in self._versions.items()}

    def types(self, kind: str | None = None) -> list[str]:
        return sorted(
            t for t, vs in self._versions.items() if kind is None or self.latest(t).kind == kind
        )

    def latest(self, type_name: str) -> SchemaVersion:
        return self._latest[type_name]  # KeyError for a type it lacks

    def versions(self, type_name: str) -> list[SchemaVersion]:
        return [v for _, v in sorted(self._versions[type_name].items())]

    def by_fingerprint(self, fp: bytes) -> SchemaVersion | None:
        return self._by_fingerprint.get(fp)

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._versions
