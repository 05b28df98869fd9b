"""Schema compatibility between the versions kept in the repository.

`can_read(reader, writer)` applies Avro's schema-resolution rules and lists why a
reader could not read data written with a writer. Backward compatibility means the
new version reads every older version's data; forward means every older version
reads the new one's. `check_catalog` runs both for each type's consecutive versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cachesync.schemas.catalog import SchemaCatalog

_PROMOTIONS = {
    "int": {"int", "long", "float", "double"},
    "long": {"long", "float", "double"},
    "float": {"float", "double"},
    "string": {"string", "bytes"},
    "bytes": {"bytes", "string"},
}


_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        return str(schema["type"]) if isinstance(schema["type"], str) else _kind(schema["type"])
    return str(schema)


def _unwrap(schema: Any) -> Any:
    """A dict whose type is itself a primitive (logical types) reads like the primitive."""
    if isinstance(schema, dict) and schema.get("type") in _PRIMITIVES:
        return schema["type"]
    return schema


def can_read(reader: Any, writer: Any, path: str = "") -> list[str]:
    """Problems that stop `reader` from reading data written with `writer` (empty: compatible)."""
    reader, writer = _unwrap(reader), _unwrap(writer)
    where = path or "(root)"
    if isinstance(writer, list):
        # Every branch the writer may have used must be readable.
        problems: list[str] = []
        for branch in writer:
            problems += can_read(reader, branch, path)
        return problems
    if isinstance(reader, list):
        if any(not can_read(branch, writer, path) for branch in reader):
            return []
        return [f"{where}: no branch of the reader's union reads writer type {_kind(writer)}"]
    rk, wk = _kind(reader), _kind(writer)
    if rk != wk:
        if rk in _PROMOTIONS.get(wk, set()):
            return []
        return [f"{where}: writer type {wk} cannot be read as {rk}"]
    if rk == "record":
        problems = []
        wfields = {f["name"]: f for f in writer["fields"]}
        for field in reader["fields"]:
            names = [field["name"], *field.get("aliases", [])]
            match = next((wfields[n] for n in names if n in wfields), None)
            fpath = f"{path}.{field['name']}" if path else field["name"]
            if match is None:
                if "default" not in field:
                    problems.append(f"{fpath}: reader field has no default and the writer lacks it")
                continue
            problems += can_read(field["type"], match["type"], fpath)
        return problems
    if rk == "enum":
        missing = set(writer["symbols"]) - set(reader["symbols"])
        if missing and "default" not in reader:
            return [f"{where}: reader enum lacks symbols {sorted(missing)}"]
        return []
    if rk == "array":
        return can_read(reader["items"], writer["items"], f"{path}[]")
    if rk == "map":
        return can_read(reader["values"], writer["values"], f"{path}{{}}")
    if rk == "fixed" and reader.get("size") != writer.get("size"):
        return [f"{where}: fixed size {writer.get('size')} cannot be read as {reader.get('size')}"]
    return []


@dataclass(frozen=True)
class CompatProblem:
    type_name: str
    direction: str  # "backward" | "forward"
    reader_version: int
    writer_version: int
    problem: str

    def __str__(self) -> str:
        return (
            f"{self.type_name}: {self.direction}: v{self.reader_version} cannot read "
            f"v{self.writer_version}: {self.problem}"
        )


def check_catalog(catalog: SchemaCatalog, *, transitive: bool = True) -> list[CompatProblem]:
    """Backward and forward checks between each type's versions (all pairs if transitive)."""
    problems: list[CompatProblem] = []
    for type_name in catalog.types():
        versions = catalog.versions(type_name)
        for i, newer in enumerate(versions):
            olders = versions[:i] if transitive else versions[max(0, i - 1) : i]
            for older in olders:
                for p in can_read(newer.raw, older.raw):
                    problems.append(
                        CompatProblem(type_name, "backward", newer.version, older.version, p)
                    )
                for p in can_read(older.raw, newer.raw):
                    problems.append(
                        CompatProblem(type_name, "forward", older.version, newer.version, p)
                    )
    return problems
