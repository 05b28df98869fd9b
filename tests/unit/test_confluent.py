"""The Confluent wire format against the registry stub (served in-process over ASGI)."""

from __future__ import annotations

import struct

import httpx
import pytest

from cachesync.schemas import ConfluentCodec, SchemaCatalog, UndecodableMessage, UnknownSchema
from tests.samples import sample_record
from tests.stubs.registry import RegistryStub

CATALOG = SchemaCatalog()


async def _codec(stub: RegistryStub) -> ConfluentCodec:
    codec = ConfluentCodec(CATALOG, "http://registry", transport=httpx.ASGITransport(app=stub.app))
    await codec.start()
    return codec


@pytest.mark.parametrize("type_name", CATALOG.types())
async def test_round_trip_every_schema(type_name: str) -> None:
    stub = RegistryStub()
    codec = await _codec(stub)
    try:
        data = codec.encode(type_name, sample_record(type_name))
        assert data[0] == 0
        assert codec.decode(data).type_name == type_name
    finally:
        await codec.close()


async def test_encode_alike_is_encode_of_each() -> None:
    """Commands alike but for their id and region: each as `encode` frames it alone."""
    codec = await _codec(RegistryStub())
    try:
        record = sample_record("purge")
        records = [record | {"command_id": f"id-{r}", "region": r} for r in ("a", "b", "c")]
        data = codec.encode_alike("purge", records, ("command_id", "region"))
        assert data == [codec.encode("purge", r) for r in records]
    finally:
        await codec.close()


async def test_unknown_id_is_fetched_once_then_decoded() -> None:
    """A schema another producer registered (not one of ours) is fetched and read with our reader."""
    stub = RegistryStub()
    codec = await _codec(stub)
    try:
        v1 = next(v for v in CATALOG.versions("photo.uploaded") if v.version == 1)
        foreign = dict(v1.raw, doc="registered by another producer")
        sid = stub.add("cachesync.events.PhotoUploaded", foreign)
        record = {k: v for k, v in sample_record("photo.uploaded").items() if k in v1.field_names}
        body = codec.encode("photo.uploaded", record, version=1)[5:]
        data = b"\x00" + struct.pack(">I", sid) + body
        with pytest.raises(UnknownSchema):
            codec.decode(data)
        await codec.resolve(data)
        await codec.resolve(data)
        assert stub.calls["get"] == 1
        assert codec.decode(data).record["visibility"] == "guests"
    finally:
        await codec.close()


async def test_bad_framing_and_missing_id() -> None:
    codec = await _codec(RegistryStub())
    try:
        with pytest.raises(UndecodableMessage):
            codec.decode(b"\xc3\x01garbage")
        missing = b"\x00" + struct.pack(">I", 9999) + b"\x00"
        await codec.resolve(missing)
        with pytest.raises(UnknownSchema):
            codec.decode(missing)
    finally:
        await codec.close()
