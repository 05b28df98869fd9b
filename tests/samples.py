"""A valid sample record for every schema, built from the schema itself."""

from __future__ import annotations

from typing import Any

from cachesync.schemas import SchemaCatalog

_CATALOG = SchemaCatalog()


def _value(name: str, avro_type: Any) -> Any:
    if isinstance(avro_type, list):  # union: take the first non-null branch
        branch = next(t for t in avro_type if t != "null")
        return _value(name, branch)
    if isinstance(avro_type, dict):
        if avro_type.get("logicalType") == "timestamp-millis":
            return 1_764_000_000_000
        if avro_type["type"] == "array":
            if isinstance(avro_type["items"], dict):  # a record: one of them
                return [_value(name, avro_type["items"])]
            return [f"{name}-1", f"{name}-2"]
        if avro_type["type"] == "record":
            return {f["name"]: _value(f["name"], f["type"]) for f in avro_type["fields"]}
        if avro_type["type"] == "map":
            return {f"{name}-k": f"{name}-v"}
        return _value(name, avro_type["type"])
    return {"string": f"{name}-x", "long": 42, "int": 7, "boolean": True}[avro_type]


def sample_record(type_name: str, **overrides: Any) -> dict[str, Any]:
    schema = _CATALOG.latest(type_name).raw
    record = {f["name"]: _value(f["name"], f["type"]) for f in schema["fields"]}
    record["schema_version"] = 1 if "schema_version" in record else record.get("schema_version")
    if "schema_version" not in {f["name"] for f in schema["fields"]}:
        record.pop("schema_version", None)
    record.update(overrides)
    return record
