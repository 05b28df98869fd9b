"""Schema evolution: old events decode with the new reader; the repo's versions stay compatible."""

from __future__ import annotations

import copy

from cachesync.schemas import SchemaCatalog, SingleObjectCodec, can_read, check_catalog
from tests.samples import sample_record

CATALOG = SchemaCatalog()
CODEC = SingleObjectCodec(CATALOG)


def test_v1_photo_uploaded_decodes_with_v2_reader() -> None:
    """An event written by a v1 producer reads with v2's defaults filled in."""
    v1 = next(v for v in CATALOG.versions("photo.uploaded") if v.version == 1)
    record = {k: v for k, v in sample_record("photo.uploaded").items() if k in v1.field_names}
    data = CODEC.encode("photo.uploaded", record, version=1)
    assert data[2:10] == v1.fingerprint
    decoded = CODEC.decode(data)
    assert decoded.writer_version == 1
    assert decoded.record["visibility"] == "guests"
    assert decoded.record["taken_at"] is None
    assert decoded.record["photo_id"] == record["photo_id"]


def test_repo_versions_are_compatible_both_ways() -> None:
    assert check_catalog(CATALOG) == []


def test_a_new_required_field_breaks_backward_compatibility() -> None:
    old = CATALOG.latest("vendor.updated").raw
    new = copy.deepcopy(old)
    new["fields"].append({"name": "tier", "type": "string"})
    problems = can_read(new, old)
    assert problems and "tier" in problems[0]
    assert can_read(old, new) == [], "old readers ignore a new field: forward compatible"


def test_removing_a_field_without_default_breaks_forward_compatibility() -> None:
    old = CATALOG.latest("vendor.linked").raw
    new = copy.deepcopy(old)
    new["fields"] = [f for f in new["fields"] if f["name"] != "role"]
    assert can_read(new, old) == []
    assert any("role" in p for p in can_read(old, new))


def test_type_change_is_caught_and_promotion_allowed() -> None:
    assert can_read("long", "int") == []
    assert can_read("int", "long")
    assert can_read(["null", "string"], "string") == []
    assert can_read("string", ["null", "string"])
