"""An event type with a schema and no rule is visible: `topology check` lists it, the mapper counts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cachesync.consumers.cli.app import app
from cachesync.topology import DEFAULT_TOPOLOGY, TopologyError, load_topology, unhandled_events
from tests.conftest import metric_points
from tests.unit.test_mapper_rules import KNOWN, _event, _mapper


def _topology_without(tmp_path: Path, event_type: str, *, ignore: bool = False) -> Path:
    data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    del data["rules"][event_type]
    if ignore:
        data["ignored_events"] = [event_type]
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_shipped_topology_handles_every_event_type() -> None:
    """Every event type in schemas/ has a rule in topology.yaml."""
    assert unhandled_events(load_topology(DEFAULT_TOPOLOGY, known_events=KNOWN), KNOWN) == []


def test_an_event_type_without_a_rule_is_unhandled_unless_ignored(tmp_path: Path) -> None:
    """Removing a rule makes its event type unhandled; listing it under ignored_events does not."""
    path = _topology_without(tmp_path, "album.published")
    assert unhandled_events(load_topology(path, known_events=KNOWN), KNOWN) == ["album.published"]
    path = _topology_without(tmp_path, "album.published", ignore=True)
    assert unhandled_events(load_topology(path, known_events=KNOWN), KNOWN) == []


def test_ignoring_an_event_with_a_rule_or_without_a_schema_is_a_problem(tmp_path: Path) -> None:
    """ignored_events names only schema'd event types that have no rule."""
    data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    data["ignored_events"] = ["photo.uploaded", "photo.teleported"]
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TopologyError) as caught:
        load_topology(path, known_events=KNOWN)
    assert "'photo.uploaded' has a rule" in str(caught.value)
    assert "no schema for event type 'photo.teleported'" in str(caught.value)


def test_topology_check_lists_unhandled_types_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cachesync topology check` names the unhandled type and exits non-zero."""
    monkeypatch.setenv("CACHESYNC_TOPOLOGY", str(_topology_without(tmp_path, "album.published")))
    result = CliRunner().invoke(app, ["topology", "check"])
    assert result.exit_code == 1
    assert "album.published" in result.output
    monkeypatch.setenv("CACHESYNC_TOPOLOGY", str(DEFAULT_TOPOLOGY))
    assert CliRunner().invoke(app, ["topology", "check"]).exit_code == 0


async def test_the_mapper_counts_unhandled_events(tmp_path: Path, metric_reader: Any) -> None:
    """An event with no rule yields no command and adds to cachesync.events.unhandled."""

    def count() -> int:
        return sum(
            p.value
            for p in metric_points(metric_reader, "cachesync.events.unhandled")
            if p.attributes.get("event_type") == "album.published"
        )

    before = count()
    mapper, _ = _mapper(load_topology(_topology_without(tmp_path, "album.published")))
    event = _event("album.published", wedding_id="w1", album_id="a1")
    assert await mapper.map_event("album.published", event) == []
    assert count() == before + 1
    mapper, _ = _mapper(load_topology(_topology_without(tmp_path, "album.published", ignore=True)))
    assert await mapper.map_event("album.published", event) == []
    assert count() == before + 1
