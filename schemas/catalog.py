"""The catalog of versioned Avro schemas kept in this repository.

Files are named `<type>.v<N>.avsc` (for example `photo.uploaded.v2.avsc`). The
highest version of a type is the reader schema; every version stays loadable as a
writer schema so that events written before an evolution still decode.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
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

    @property
    def field_names(self) -> frozenset[str]:
        return frozenset(f["name"] for f in self.raw["fields"])


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

    def types(self, kind: str | None = None) -> list[str]:
        return sorted(
            t for t, vs in self._versions.items() if kind is None or self.latest(t).kind == kind
        )

    def latest(self, type_name: str) -> SchemaVersion:
        versions = self._versions.get(type_name)
        if not versions:
            raise KeyError(type_name)
        return versions[max(versions)]

    def versions(self, type_name: str) -> list[SchemaVersion]:
        return [v for _, v in sorted(self._versions[type_name].items())]

    def by_fingerprint(self, fp: bytes) -> SchemaVersion | None:
        return self._by_fingerprint.get(fp)

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._versions
