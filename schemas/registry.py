"""The Confluent wire format against a schema registry's REST API.

A message is magic byte 0, the 4-byte big-endian schema id, and the Avro body.
Subjects follow the record-name strategy (`cachesync.events.PhotoUploaded`), so one
topic can carry several event types, as our content topics do. On `start` every
schema version in the catalog is registered (which also learns their ids); an id
first seen on the wire is fetched once in `resolve` and cached.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import fastavro
import httpx
from fastavro.schema import fingerprint, to_parsing_canonical_form

from cachesync.schemas.catalog import SchemaCatalog, SchemaVersion
from cachesync.schemas.serde import (
    Decoded,
    UndecodableMessage,
    UnknownSchema,
    read_body,
    write_bodies,
    write_body,
    writer_schema,
)

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryUnavailable(Exception):
    """The registry did not answer; callers treat this as transient."""


class ConfluentCodec:
    def __init__(
        self,
        catalog: SchemaCatalog,
        registry_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.catalog = catalog
        self.client = httpx.AsyncClient(
            base_url=registry_url.rstrip("/"),
            transport=transport,
            timeout=timeout,
            headers={"Accept": _CONTENT_TYPE},
        )
        self._id_of: dict[tuple[str, int], int] = {}  # (type, version) -> id
        self._by_id: dict[int, SchemaVersion] = {}
        self._type_of_record = {
            _full_name(self.catalog.latest(t).raw): t for t in self.catalog.types()
        }

    async def start(self) -> None:
        """Register every version in the catalog, oldest first, and learn their ids."""
        for type_name in self.catalog.types():
            for sv in self.catalog.versions(type_name):
                subject = _full_name(sv.raw)
                body = await self._call(
                    "POST",
                    f"/subjects/{subject}/versions",
                    json={"schema": json.dumps(sv.raw), "schemaType": "AVRO"},
                )
                schema_id = int(body["id"])
                self._id_of[(type_name, sv.version)] = schema_id
                self._by_id[schema_id] = sv

    async def close(self) -> None:
        await self.client.aclose()

    def encode(
        self, type_name: str, record: dict[str, Any], *, version: int | None = None
    ) -> bytes:
        writer = writer_schema(self.catalog, type_name, version)
        return self._head(writer) + write_body(writer, record)

    def encode_alike(
        self, type_name: str, records: Sequence[dict[str, Any]], varying: tuple[str, ...]
    ) -> list[bytes]:
        """`encode` of each record, in order, with the newest schema; see `write_bodies`."""
        writer = writer_schema(self.catalog, type_name, None)
        head = self._head(writer)
        return [head + body for body in write_bodies(writer, records, varying)]

    def _head(self, writer: SchemaVersion) -> bytes:
        """The wire format's magic byte and the writer schema's registry id."""
        schema_id = self._id_of.get((writer.type_name, writer.version))
        if schema_id is None:
            raise UnknownSchema(
                f"{writer.type_name} v{writer.version} is not registered (start() not run?)"
            )
        return b"\x00" + struct.pack(">I", schema_id)

    def decode(self, data: bytes) -> Decoded:
        schema_id = self._schema_id(data)
        writer = self._by_id.get(schema_id)
        if writer is None:
            raise UnknownSchema(f"unknown schema id {schema_id}")
        return read_body(self.catalog, writer, data[5:])

    async def resolve(self, data: bytes) -> None:
        """Fetch a schema id we have not seen, so that `decode` can read it."""
        schema_id = self._schema_id(data)
        if schema_id in self._by_id:
            return
        try:
            body = await self._call("GET", f"/schemas/ids/{schema_id}")
        except UnknownSchema:
            return  # decode will report it
        raw = json.loads(body["schema"])
        type_name = self._type_of_record.get(_full_name(raw)) if isinstance(raw, dict) else None
        if type_name is None:
            return
        parsed = fastavro.parse_schema(raw)
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
        known = self.catalog.by_fingerprint(fp)
        self._by_id[schema_id] = known or replace(
            self.catalog.latest(type_name),
            raw=raw,
            parsed=parsed,
            fingerprint=fp,
            version=-schema_id,
        )

    @staticmethod
    def _schema_id(data: bytes) -> int:
        if len(data) < 5 or data[0] != 0:
            raise UndecodableMessage(
                f"not Confluent wire format (first bytes {bytes(data[:5]).hex() or 'empty'})"
            )
        return int(struct.unpack(">I", data[1:5])[0])

    async def _call(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self.client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise RegistryUnavailable(
                f"schema registry {method} {url}: {type(exc).__name__}"
            ) from exc
        if response.status_code == 404:
            raise UnknownSchema(f"schema registry {method} {url}: not found")
        if response.status_code >= 400:
            raise RegistryUnavailable(
                f"schema registry {method} {url}: HTTP {response.status_code}"
            )
        result: dict[str, Any] = response.json()
        return result


def _full_name(raw: dict[str, Any]) -> str:
    ns = raw.get("namespace")
    return f"{ns}.{raw['name']}" if ns else str(raw["name"])
