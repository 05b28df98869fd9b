"""Single-object encoding round trips and its failure modes."""

from __future__ import annotations

import pytest

from cachesync.schemas import (
    InvalidRecord,
    SchemaCatalog,
    SingleObjectCodec,
    UndecodableMessage,
    UnknownSchema,
)
from tests.samples import sample_record

CATALOG = SchemaCatalog()
CODEC = SingleObjectCodec(CATALOG)


@pytest.mark.parametrize("type_name", CATALOG.types())
def test_round_trip_every_schema(type_name: str) -> None:
    """Every event and command schema encodes and decodes to the same record."""
    record = sample_record(type_name)
    data = CODEC.encode(type_name, record)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == CATALOG.latest(type_name).fingerprint
    decoded = CODEC.decode(data)
    assert decoded.type_name == type_name
    for name, value in record.items():
        assert decoded.record[name] == value, name


def test_timestamps_decode_as_epoch_millis_and_encode_from_either_form() -> None:
    """The pipeline works in epoch ms: a `timestamp-millis` field decodes as an int, and a
    record holding a datetime there encodes to the same bytes as one holding its ms."""
    import datetime as dt

    record = sample_record("photo.uploaded")
    at = dt.datetime(2026, 12, 1, 10, 0, 0, 123000, tzinfo=dt.UTC)
    as_ms = CODEC.encode("photo.uploaded", {**record, "occurred_at": 1796119200123})
    as_datetime = CODEC.encode("photo.uploaded", {**record, "occurred_at": at})
    assert as_ms == as_datetime
    occurred = CODEC.decode(as_datetime).record["occurred_at"]
    assert occurred == 1796119200123
    assert type(occurred) is int


def test_fingerprint_is_crc64_avro_little_endian() -> None:
    """The fingerprint of the canonical form of "int" is the Avro spec's test vector."""
    from fastavro.schema import fingerprint

    assert bytes.fromhex(fingerprint('"int"', "CRC-64-AVRO")) == (0x7275D51A3F395C8F).to_bytes(
        8, "little"
    )


def test_garbage_is_undecodable() -> None:
    with pytest.raises(UndecodableMessage):
        CODEC.decode(b'{"json": "not avro"}')


def test_unknown_fingerprint() -> None:
    with pytest.raises(UnknownSchema):
        CODEC.decode(b"\xc3\x01" + b"\x00" * 8 + b"\x02")


def test_truncated_body_is_undecodable() -> None:
    data = CODEC.encode("photo.uploaded", sample_record("photo.uploaded"))
    with pytest.raises(UndecodableMessage):
        CODEC.decode(data[:-5])


def test_invalid_record_is_refused_on_encode() -> None:
    record = sample_record("photo.uploaded") | {"size_bytes": "big"}
    with pytest.raises(InvalidRecord, match="size_bytes"):
        CODEC.encode("photo.uploaded", record)


def _alike(type_name: str, regions: tuple[str, ...]) -> list[dict[str, object]]:
    """One record per region that differ only in their id and region, as an event's
    commands of one kind do."""
    record = sample_record(type_name)
    return [record | {"command_id": f"id-{r}", "region": r} for r in regions]


@pytest.mark.parametrize("type_name", ["purge", "warm"])
def test_encode_alike_is_encode_of_each(type_name: str) -> None:
    """Records alike but for the varying fields, records that differ elsewhere, and one
    back to the first: each message is the bytes `encode` gives it alone, and decodes."""
    records = _alike(type_name, ("us-east", "eu-west", "ap-southeast"))
    other = sample_record(type_name) | {"entity": "wedding:other", "command_id": "id-x"}
    records = [*records, other, records[0] | {"command_id": "id-again"}]
    data = CODEC.encode_alike(type_name, records, ("command_id", "region"))
    assert data == [CODEC.encode(type_name, r) for r in records]
    assert [CODEC.decode(d).record["region"] for d in data] == [r["region"] for r in records]


def test_encode_alike_of_records_with_datetimes_or_a_bad_field() -> None:
    """A record holding datetimes is written whole, as `encode` writes it; one with a field
    that does not fit is refused with that field named, like `encode`."""
    import datetime as dt

    at = dt.datetime(2026, 12, 1, 10, 0, 0, 123000, tzinfo=dt.UTC)
    records = _alike("purge", ("us-east", "eu-west"))
    records[1] = records[1] | {"issued_at": at}
    assert CODEC.encode_alike("purge", records, ("command_id", "region")) == [
        CODEC.encode("purge", r) for r in records
    ]
    records[1] = records[1] | {"version": "newest"}
    with pytest.raises(InvalidRecord, match="version"):
        CODEC.encode_alike("purge", records, ("command_id", "region"))


@pytest.mark.parametrize("length", [0, 1, 63, 64, 8191, 8192, 1 << 14])
def test_encode_alike_writes_varying_strings_of_any_length(length: int) -> None:
    """The varying strings are written by hand (an Avro length prefix, a zigzag varint,
    then UTF-8): around each boundary of its bytes, and with characters of several bytes."""
    records = _alike("purge", ("us-east", "eu-west"))
    records[1]["command_id"] = "é" * (length // 2) + "x" * (length % 2)
    data = CODEC.encode_alike("purge", records, ("command_id", "region"))
    assert data == [CODEC.encode("purge", r) for r in records]
