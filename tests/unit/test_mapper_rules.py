"""For every event type, the exact commands the shipped rules produce, per region."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cachesync.consumers.commands import PurgeCommand, WarmCommand, command_id
from cachesync.consumers.errors import RuleError
from cachesync.consumers.mapping.index import RelationshipIndex
from cachesync.consumers.mapping.mapper import Mapper
from cachesync.schemas import SchemaCatalog
from cachesync.topology import DEFAULT_TOPOLOGY, Topology, load_topology
from tests.samples import sample_record

CATALOG = SchemaCatalog()
KNOWN = {t: CATALOG.latest(t).field_names for t in CATALOG.types("events")}
TOPOLOGY = load_topology(DEFAULT_TOPOLOGY, known_events=KNOWN)
ALL = ["us-east", "eu-west", "ap-southeast"]
T0 = 1_764_000_000_000


class MemoryIndex(RelationshipIndex):
    """The relationship index in a dict, for rule tests without Redis."""

    def __init__(self, topology: Topology) -> None:
        super().__init__(None, topology)  # type: ignore[arg-type]
        self.vendor_weddings: dict[str, set[str]] = {}
        self.regions: dict[str, list[str]] = {}

    async def link_vendor(self, vendor_id: str, wedding_id: str) -> None:
        self.vendor_weddings.setdefault(vendor_id, set()).add(wedding_id)

    async def unlink_vendor(self, vendor_id: str, wedding_id: str) -> None:
        self.vendor_weddings.get(vendor_id, set()).discard(wedding_id)

    async def forget_vendor(self, vendor_id: str) -> None:
        self.vendor_weddings.pop(vendor_id, None)

    async def set_wedding_regions(self, wedding_id: str, countries: Any) -> list[str]:
        self.regions[wedding_id] = self.regions_for_countries(countries)
        return self.regions[wedding_id]

    async def weddings_of(self, vendor_id: str) -> list[str]:
        return sorted(self.vendor_weddings.get(vendor_id, ()))

    async def regions_of(self, wedding_ids: list[str]) -> dict[str, list[str]]:
        return {w: sorted(self.regions.get(w, [self.topology.default_region])) for w in wedding_ids}


def _mapper(topology: Topology = TOPOLOGY) -> tuple[Mapper, MemoryIndex]:
    index = MemoryIndex(topology)
    # w1 is a Tuscany wedding with guests from the US; v1 serves w1 and w2.
    index.regions = {"w1": ["eu-west", "us-east"], "w2": ["ap-southeast"]}
    index.vendor_weddings = {"v1": {"w1", "w2"}}
    return Mapper(topology, index, clock=lambda: T0 / 1000 + 1), index


def _event(event_type: str, **fields: Any) -> dict[str, Any]:
    return sample_record(event_type, event_id="e1", occurred_at=T0, **fields)


PHOTO = {
    "wedding_id": "w1",
    "photo_id": "p1",
    "album_id": "a1",
    "path": "/weddings/w1/photos/p1.jpg",
}

# event type, fields, expected purge (same in every region), expected warm regions -> urls
CASES: list[tuple[str, dict[str, Any], dict[str, list[str]], dict[str, dict[str, list[str]]]]] = [
    (
        "photo.uploaded",
        PHOTO,
        {
            "keys": ["wedding:w1:gallery", "wedding:w1:album:a1", "photo:p1"],
            "tags": ["wedding:w1:photos", "album:a1"],
            "urls": ["/weddings/w1/gallery", "/weddings/w1/albums/a1"],
            "prefixes": [],
        },
        {  # the album page the purge dropped is warmed too
            region: {
                "photo_urls": [
                    "/weddings/w1/photos/p1.jpg",
                    "/weddings/w1/gallery",
                    "/weddings/w1/albums/a1",
                ]
            }
            for region in ("eu-west", "us-east")
        },
    ),
    (
        "photo.uploaded",
        {**PHOTO, "album_id": None},
        {
            "keys": ["wedding:w1:gallery", "photo:p1"],
            "tags": ["wedding:w1:photos"],
            "urls": ["/weddings/w1/gallery"],
            "prefixes": [],
        },
        {
            "eu-west": {"photo_urls": ["/weddings/w1/photos/p1.jpg", "/weddings/w1/gallery"]},
            "us-east": {"photo_urls": ["/weddings/w1/photos/p1.jpg", "/weddings/w1/gallery"]},
        },
    ),
    (
        "photo.updated",
        PHOTO,
        {
            "keys": ["photo:p1", "wedding:w1:gallery"],
            "tags": ["photo:p1"],
            "urls": ["/weddings/w1/photos/p1.jpg", "/weddings/w1/gallery"],
            "prefixes": [],
        },
        {
            "eu-west": {"photo_urls": ["/weddings/w1/photos/p1.jpg"]},
            "us-east": {"photo_urls": ["/weddings/w1/photos/p1.jpg"]},
        },
    ),
    (
        "photo.deleted",
        PHOTO,
        {
            "keys": ["photo:p1", "wedding:w1:gallery", "wedding:w1:album:a1"],
            "tags": ["photo:p1", "wedding:w1:photos"],
            "urls": ["/weddings/w1/photos/p1.jpg", "/weddings/w1/gallery"],
            "prefixes": [],
        },
        {},
    ),
    (
        "album.published",
        {"wedding_id": "w2", "album_id": "a9"},
        {
            "keys": ["wedding:w2:album:a9", "wedding:w2:gallery"],
            "tags": ["album:a9"],
            "urls": ["/weddings/w2/albums/a9", "/weddings/w2/gallery"],
            "prefixes": [],
        },
        {"ap-southeast": {"photo_urls": ["/weddings/w2/albums/a9"]}},
    ),
    (
        "vendor.updated",
        {"vendor_id": "v1"},
        {
            "keys": ["vendor:v1", "vendor:v1:profile", "wedding:w1:vendors", "wedding:w2:vendors"],
            "tags": ["vendor:v1", "vendor-api:v1"],
            "urls": ["/vendors/v1", "/weddings/w1/vendors", "/weddings/w2/vendors"],
            "prefixes": ["/vendors/v1/assets/"],
        },
        {
            "eu-west": {"vendor_asset_urls": ["/vendors/v1", "/weddings/w1/vendors"]},
            "us-east": {"vendor_asset_urls": ["/vendors/v1", "/weddings/w1/vendors"]},
            "ap-southeast": {"vendor_asset_urls": ["/vendors/v1", "/weddings/w2/vendors"]},
        },
    ),
    (
        "vendor.deleted",
        {"vendor_id": "v1"},
        {
            "keys": ["vendor:v1", "vendor:v1:profile", "wedding:w1:vendors", "wedding:w2:vendors"],
            "tags": ["vendor:v1", "vendor-api:v1"],
            "urls": ["/vendors/v1", "/weddings/w1/vendors", "/weddings/w2/vendors"],
            "prefixes": ["/vendors/v1/"],
        },
        {},
    ),
    (
        "vendor.linked",
        {"vendor_id": "v7", "wedding_id": "w2"},
        {
            "keys": ["wedding:w2:vendors"],
            "tags": [],
            "urls": ["/weddings/w2/vendors"],
            "prefixes": [],
        },
        {"ap-southeast": {"vendor_asset_urls": ["/weddings/w2/vendors"]}},
    ),
    (
        "vendor.unlinked",
        {"vendor_id": "v1", "wedding_id": "w2"},
        {
            "keys": ["wedding:w2:vendors"],
            "tags": [],
            "urls": ["/weddings/w2/vendors"],
            "prefixes": [],
        },
        {},
    ),
    (
        "wedding.updated",
        {"wedding_id": "w3", "destination_country": "IT", "guest_countries": ["IT", "JP"]},
        {
            "keys": ["wedding:w3", "wedding:w3:details"],
            "tags": ["wedding:w3"],
            "urls": ["/weddings/w3", "/w/w3"],
            "prefixes": [],
        },
        {
            "eu-west": {"guest_portal_urls": ["/w/w3", "/weddings/w3"]},
            "ap-southeast": {"guest_portal_urls": ["/w/w3", "/weddings/w3"]},
        },
    ),
    (
        "wedding.published",
        {
            "wedding_id": "w4",
            "slug": "ana-and-ben",
            "destination_country": "MX",
            "guest_countries": [],
        },
        {
            "keys": ["wedding:w4", "wedding:w4:details", "slug:ana-and-ben"],
            "tags": ["wedding:w4"],
            "urls": ["/weddings/w4", "/w/w4"],
            "prefixes": ["/w/w4/"],
        },
        {"us-east": {"guest_portal_urls": ["/w/w4", "/weddings/w4", "/weddings/w4/gallery"]}},
    ),
    (
        "guest_portal.updated",
        {"wedding_id": "w1", "portal_id": "pt1", "pages": ["rsvp"]},
        {"keys": ["portal:pt1"], "tags": ["portal:pt1"], "urls": ["/w/w1"], "prefixes": ["/w/w1/"]},
        {"eu-west": {"guest_portal_urls": ["/w/w1"]}, "us-east": {"guest_portal_urls": ["/w/w1"]}},
    ),
    (
        "vendor_api.changed",
        {"vendor_id": "v1", "api": "prices"},
        {"keys": [], "tags": ["vendor-api:v1:prices"], "urls": [], "prefixes": []},
        {},
    ),
]


@pytest.mark.parametrize(
    ("event_type", "fields", "purge", "warms"), CASES, ids=[c[0] for c in CASES]
)
async def test_rule_produces_exact_commands(
    event_type: str,
    fields: dict[str, Any],
    purge: dict[str, list[str]],
    warms: dict[str, dict[str, list[str]]],
) -> None:
    mapper, _ = _mapper()
    commands = await mapper.map_event(event_type, _event(event_type, **fields))
    purges = {c.region: c for c in commands if isinstance(c, PurgeCommand)}
    assert sorted(purges) == sorted(ALL), "purges go to every region"
    for region, cmd in purges.items():
        assert {k: list(getattr(cmd, k)) for k in purge} == purge, region
        assert cmd.version == T0 and cmd.origin_event_type == event_type
    got_warms: dict[str, dict[str, list[str]]] = {}
    for c in commands:
        if isinstance(c, WarmCommand):
            entry = got_warms.setdefault(c.region, {})
            for name in ("photo_urls", "vendor_asset_urls", "guest_portal_urls"):
                if getattr(c, name):
                    entry.setdefault(name, []).extend(getattr(c, name))
    assert got_warms == warms


async def test_every_event_type_has_a_case() -> None:
    assert {c[0] for c in CASES} == set(KNOWN)


async def test_index_is_kept_from_events() -> None:
    mapper, index = _mapper()
    await mapper.map_event(
        "vendor.linked", _event("vendor.linked", vendor_id="v9", wedding_id="w1")
    )
    assert await index.weddings_of("v9") == ["w1"]
    await mapper.map_event(
        "vendor.unlinked", _event("vendor.unlinked", vendor_id="v9", wedding_id="w1")
    )
    assert await index.weddings_of("v9") == []
    await mapper.map_event("vendor.deleted", _event("vendor.deleted", vendor_id="v1"))
    assert await index.weddings_of("v1") == []


async def test_command_ids_are_deterministic() -> None:
    """The same event mapped twice (a retry, a replay) yields the same command ids."""
    mapper, _ = _mapper()
    a = await mapper.map_event("photo.uploaded", _event("photo.uploaded", **PHOTO))
    b = await mapper.map_event("photo.uploaded", _event("photo.uploaded", **PHOTO))
    assert [c.command_id for c in a] == [c.command_id for c in b]
    assert len({c.command_id for c in a}) == len(a)


def test_command_ids_stay_what_earlier_versions_made() -> None:
    """An id is a keyed BLAKE2b of the event, region, kind and part, in UUID form: a
    replay of topics written by an earlier version must name its commands the same."""
    assert command_id("e1", "eu-west", "purge") == "6a77d3d6-6c20-1e1d-8869-493e5439e031"
    assert command_id("e1", "eu-west", "purge", "#part1") != command_id("e1", "eu-west", "purge")


async def test_a_new_rule_needs_no_code_change(tmp_path: Path) -> None:
    """A rule added in a topology file produces its commands."""
    data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    data["rules"]["guest_portal.updated"]["purge"]["keys"].append("portal:{portal_id}:page:{pages}")
    data["rules"]["vendor_api.changed"]["purge"]["urls"] = ["/vendors/{vendor_id}/api/{api}"]
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    mapper, _ = _mapper(load_topology(path, known_events=KNOWN))
    cmds = await mapper.map_event(
        "guest_portal.updated",
        _event("guest_portal.updated", wedding_id="w1", portal_id="pt1", pages=["rsvp", "travel"]),
    )
    assert "portal:pt1:page:travel" in cmds[0].keys  # type: ignore[union-attr]
    cmds = await mapper.map_event(
        "vendor_api.changed", _event("vendor_api.changed", vendor_id="v1", api="reviews")
    )
    assert cmds[0].urls == ("/vendors/v1/api/reviews",)  # type: ignore[union-attr]


async def test_template_with_missing_field_is_a_rule_error(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    data["rules"]["photo.deleted"]["purge"]["keys"] = ["photo:{photographer_id}"]
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    mapper, _ = _mapper(load_topology(path))  # loaded unchecked, as a stale deployment might be
    with pytest.raises(RuleError, match="photographer_id"):
        await mapper.map_event("photo.deleted", _event("photo.deleted", **PHOTO))
