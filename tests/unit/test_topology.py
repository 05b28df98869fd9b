"""The topology file's validation names the file, the rule and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cachesync.schemas import SchemaCatalog
from cachesync.topology import DEFAULT_TOPOLOGY, TopologyError, load_topology

CATALOG = SchemaCatalog()
KNOWN = {t: CATALOG.latest(t).field_names for t in CATALOG.types("events")}


def _write(tmp_path: Path, data: dict) -> Path:  # type: ignore[type-arg]
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_topology_is_valid() -> None:
    topo = load_topology(DEFAULT_TOPOLOGY, known_events=KNOWN)
    assert set(topo.regions) == {"us-east", "eu-west", "ap-southeast"}
    assert set(topo.rules) == set(KNOWN), "every event type has a rule"
    # YAML 1.1 reads a bare NO as false; Norway must still be a country string.
    assert topo.region_of_country("NO") == "eu-west"


def test_every_problem_is_reported_with_rule_and_field(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    data["rules"]["photo.uploaded"]["purge"]["keys"].append("photo:{photographer}")
    data["rules"]["vendor.updated"]["warm"]["vendor_assets"].append("/x/{nope}")
    data["rules"]["photo.exploded"] = {"entity": "x", "scope": "photo"}
    path = _write(tmp_path, data)
    with pytest.raises(TopologyError) as info:
        load_topology(path, known_events=KNOWN)
    message = str(info.value)
    assert str(path) in message
    assert "rules.photo.uploaded.purge.keys[3]" in message and "'photographer'" in message
    assert "rules.vendor.updated.warm.vendor_assets[2]" in message
    assert "rules.photo.exploded: no schema" in message
    assert len(info.value.problems) == 3


def test_structural_errors_name_the_field(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    data["topics"]["commands"]["name"] = "cache.commands"
    data["default_region"] = "mars"
    with pytest.raises(TopologyError) as info:
        load_topology(_write(tmp_path, data))
    assert "topics.commands: " in str(info.value) and "must contain {region}" in str(info.value)


def test_country_in_two_regions_is_refused(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    data["regions"]["us-east"]["countries"].append("IT")
    with pytest.raises(TopologyError, match="IT is in both"):
        load_topology(_write(tmp_path, data))
