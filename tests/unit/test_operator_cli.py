"""The operator's first day, without services: one-line errors when Kafka or a Redis does not
answer, publish's validation and keys, the configuration reference and README's copy of it,
help screens, and the stop that no terminal can undo."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka.errors import GroupCoordinatorNotAvailableError
from typer.testing import CliRunner

from cachesync.consumers.cli.app import app
from cachesync.consumers.cli.terminal import RoutineKafkaErrors, TerminalConsole
from cachesync.consumers.errors import ConfigError
from cachesync.consumers.ops import config_reference
from cachesync.consumers.ops.demo import DemoStats
from cachesync.consumers.ops.publish import EntityKeys, InvalidEvent, event_key, prepare_event
from cachesync.consumers.pipeline import assemble
from cachesync.consumers.settings import Settings, load_settings
from cachesync.schemas import SchemaCatalog
from cachesync.topology import load_topology
from deploy.local.standins.serve import free_port

REPO = Path(__file__).resolve().parents[2]
CACHESYNC = str(Path(sys.executable).with_name("cachesync"))
PHOTO = {
    "wedding_id": "w-1",
    "photo_id": "p-1",
    "path": "/weddings/w-1/photos/p-1.jpg",
    "content_type": "image/jpeg",
    "size_bytes": 1000,
}


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, str, float]:
    """`cachesync ARGS` as a process: its exit code, its output (both streams), its seconds."""
    started = time.monotonic()
    proc = subprocess.run(
        [CACHESYNC, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CACHESYNC_METRICS_PORT": "0", "COLUMNS": "200", **(env or {})},
        check=False,
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip(), time.monotonic() - started


# -- item 4: one line, naming the variable and the address -------------------------------
@pytest.mark.parametrize(
    "command",
    [
        ["run", "mapper"],
        ["run", "all"],
        ["run", "sink", "--region", "eu-west", "--sink", "redis"],
        ["topology", "apply"],
        ["trace", "--wedding", "w-1"],
        ["trace", "00000000-0000-0000-0000-000000000000"],
        ["status", "--once"],
        ["demo", "--count", "1"],
        ["publish", "photo.uploaded", "--json", '{"wedding_id": "w-1"}'],
        ["dlq", "list"],
        ["replay", "--since", "1m", "--dry-run"],
        ["consistency", "--duration", "1"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_every_command_that_talks_to_kafka_says_in_one_line_that_it_cannot(
    command: list[str],
) -> None:
    """Nothing listens on the port: exit 2 in seconds, one line with the variable and address."""
    address = f"127.0.0.1:{free_port()}"
    code, output, seconds = _cli(*command, env={"KAFKA_BOOTSTRAP_SERVERS": address})
    assert code == 2, output
    assert output.count("\n") == 0, output
    assert f"KAFKA_BOOTSTRAP_SERVERS={address}" in output
    assert "Traceback" not in output and "ERROR" not in output
    assert seconds < 15


def test_a_region_redis_that_does_not_answer_is_named_before_the_run_starts() -> None:
    """A wrong REDIS_URL_EU_WEST stops `run sink` at once, naming it; not when traffic comes."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, output, seconds = _cli(
        "run", "sink", "--region", "eu-west", env={"REDIS_URL_EU_WEST": url}
    )
    # Kafka may be down too on this machine; the Redis check runs either way.
    assert code == 2
    assert f"REDIS_URL_EU_WEST={url}" in output or "KAFKA_BOOTSTRAP_SERVERS" in output
    code, output, _ = _cli(
        "vendor-api",
        "get",
        "availability",
        "/x",
        "--vendor",
        "v1",
        "--region",
        "eu-west",
        env={"REDIS_URL_EU_WEST": url},
    )
    assert code == 2
    assert (
        output
        == f"cannot start: REDIS_URL_EU_WEST={url}: region eu-west does not answer (Connection refused)"
    )
    assert seconds < 15


def test_aiokafka_waiting_for_a_group_coordinator_is_no_red_error() -> None:
    """The routine GroupCoordinatorNotAvailableError at start-up is hidden (DEBUG with -v)."""

    def record(level: int, *args: object) -> logging.LogRecord:
        return logging.LogRecord(
            "aiokafka.consumer.group_coordinator", level, __file__, 1, "%s", args, None
        )

    quiet, verbose = RoutineKafkaErrors(verbose=False), RoutineKafkaErrors(verbose=True)
    waiting = record(logging.ERROR, GroupCoordinatorNotAvailableError())
    assert not quiet.filter(waiting)
    assert verbose.filter(waiting) and waiting.levelno == logging.DEBUG
    other = record(logging.ERROR, RuntimeError("a real problem"))
    assert quiet.filter(other) and other.levelno == logging.ERROR


# -- item 1: the stop never depends on the terminal --------------------------------------
def test_the_stop_is_set_when_printing_about_it_fails() -> None:
    """The stop handler's report raising (Rich's SystemExit on a broken pipe) does not undo it."""

    def report() -> None:
        raise SystemExit(1)

    async def main(stop: asyncio.Event) -> bool:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
        await asyncio.wait_for(stop.wait(), timeout=5)
        return stop.is_set()

    assert assemble.run_until_signal(main, on_stop=report)


def test_a_console_whose_reader_left_goes_quiet_instead_of_exiting() -> None:
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as pipe:
        console = TerminalConsole(file=pipe, force_terminal=False)
        console.print("\n".join(["x" * 99] * 1000), highlight=False)  # more than a pipe holds
        console.print("and again")
        assert console.gone


# -- item 3: publish ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings()


def test_publish_fills_the_envelope_and_keys_the_event_by_its_topics_entity(
    settings: Settings,
) -> None:
    event = prepare_event(
        settings, "photo.uploaded", {**PHOTO, "occurred_at": "2026-12-01T10:00:00Z"}
    )
    assert set(event.filled) == {"event_id", "source"}
    assert re.fullmatch(r"[0-9a-f-]{36}", event.record["event_id"])
    assert event.record["occurred_at"].isoformat() == "2026-12-01T10:00:00+00:00"
    assert event.record["visibility"] == "guests"  # the schema's default, as the mapper reads it
    assert (event.topic, event.key) == ("content.photos", b"w-1")
    assert "photo:p-1" in event.purges["keys"]
    # vendor.linked's rule entity is the wedding, but its topic is keyed by vendor: a
    # vendor's links stay in order with its updates.
    linked = prepare_event(
        settings, "vendor.linked", {"vendor_id": "v-1", "wedding_id": "w-1", "role": "florist"}
    )
    assert linked.key == b"v-1" == event_key("vendor.linked", linked.record)


def test_publish_names_every_problem_by_field(settings: Settings) -> None:
    with pytest.raises(InvalidEvent) as caught:
        prepare_event(settings, "photo.uploaded", {**PHOTO, "weding_id": "w", "size_bytes": "big"})
    assert caught.value.problems == [
        "unknown field 'weding_id' (did you mean wedding_id?)",
        "size_bytes: 'big' is not an integer",
    ]
    partial = {k: v for k, v in PHOTO.items() if k != "path"}
    with pytest.raises(InvalidEvent, match=r"path: required \(a string\)"):
        prepare_event(settings, "photo.uploaded", partial)
    with pytest.raises(InvalidEvent, match="wedding_id='w 1' is not a valid id"):
        prepare_event(settings, "photo.uploaded", {**PHOTO, "wedding_id": "w 1"})
    with pytest.raises(InvalidEvent, match=r"did you mean photo\.uploaded"):
        prepare_event(settings, "photo.uplaoded", PHOTO)
    with pytest.raises(InvalidEvent, match="expected a JSON object"):
        prepare_event(settings, "photo.uploaded", [PHOTO])


def test_publish_checks_from_the_command_line_and_sends_nothing_when_invalid() -> None:
    result = CliRunner().invoke(app, ["publish", "photo.uploaded", "--json", '{"wedding_id": 5}'])
    assert result.exit_code == 2
    assert "invalid photo.uploaded" in result.output
    assert "wedding_id: 5 is not a string" in result.output
    result = CliRunner().invoke(app, ["publish", "photo.uploaded", "--json", "{not json"])
    assert result.exit_code == 2 and "--json: not JSON" in result.output
    result = CliRunner().invoke(
        app, ["publish", "photo.uploaded", "--dry-run"], input=__import__("json").dumps(PHOTO)
    )
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and "nothing sent" in result.output


def test_a_new_event_type_needs_a_schema_and_a_rule_not_code(tmp_path: Path) -> None:
    """The key of a new type comes from its rule's entity: no table in the publisher."""
    import json

    import yaml

    events = tmp_path / "avro" / "events"
    events.mkdir(parents=True)
    for source in (REPO / "schemas" / "avro" / "events").glob("*.avsc"):
        (events / source.name).write_text(source.read_text())
    envelope = json.loads((events / "album.published.v1.avsc").read_text())["fields"][:4]
    (events / "gift.added.v1.avsc").write_text(
        json.dumps(
            {
                "type": "record",
                "name": "GiftAdded",
                "namespace": "cachesync.events",
                "fields": [
                    *envelope,
                    {"name": "registry_id", "type": "string"},
                    {"name": "gift_id", "type": "string"},
                ],
            }
        )
    )
    raw = yaml.safe_load((REPO / "topology" / "topology.yaml").read_text())
    raw["topics"]["content"].append({"name": "content.gifts", "events": ["gift.added"]})
    raw["rules"]["gift.added"] = {
        "entity": "registry:{registry_id}",
        "scope": "wedding",
        "purge": {"keys": ["registry:{registry_id}"]},
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(raw))
    keys = EntityKeys(load_topology(path), SchemaCatalog(tmp_path / "avro"))
    assert keys.key("gift.added", {"registry_id": "r-9", "gift_id": "g-1"}) == b"r-9"


# -- item 6: the demo says what rate it achieved -----------------------------------------
def test_the_demo_says_when_it_falls_behind_the_rate_asked() -> None:
    stats = DemoStats(rate_asked=20.0, traffic=90, traffic_started=0.0, traffic_ended=10.0)
    assert stats.achieved_rate == pytest.approx(9.0)
    assert stats.behind
    stats = DemoStats(rate_asked=20.0, traffic=199, traffic_started=0.0, traffic_ended=10.0)
    assert not stats.behind


# -- item 9: the configuration reference -------------------------------------------------
def test_readme_configuration_section_is_the_one_generated_from_the_settings_model() -> None:
    """README and the model cannot drift: regenerate with `cachesync config --markdown`."""
    readme = (REPO / "README.md").read_text()
    assert config_reference.readme_section(readme) == config_reference.markdown_table(), (
        "README's configuration section differs from the settings model: paste the output "
        "of `cachesync config --markdown` between its markers"
    )


def test_every_setting_says_what_it_is() -> None:
    missing = [row.variable for row in config_reference.rows() if not row.description]
    assert not missing, f"settings without a description: {missing}"


def test_every_variable_the_core_reads_is_in_the_reference() -> None:
    """A variable read straight from the environment in settings.py or telemetry.py is listed
    (the standard OTEL_* family is the SDK's, listed by its main members)."""
    listed = {row.variable for row in config_reference.rows()}
    read: set[str] = set()
    for module in ("settings.py", "telemetry.py"):
        text = (REPO / "consumers" / module).read_text()
        read |= set(re.findall(r'environ\.get\("([A-Z0-9_]+)"', text))
        read |= {
            f"{p}<REGION>" for p in re.findall(r'(?:region_var|_per_region)\("([A-Z_]+_)"', text)
        }
    undocumented = sorted(v for v in read - listed if not v.startswith("OTEL_"))
    assert not undocumented, f"read but not in `cachesync config`: {undocumented}"


def test_config_prints_every_variable_with_its_value_and_source_and_masks_secrets() -> None:
    env = {
        "COLUMNS": "400",
        "CLOUDFLARE_API_TOKEN": "tok-very-secret",
        "CACHESYNC_STATE_REDIS_URL": "redis://:hunter2@127.0.0.1:16382/0",
        "EDGE_URL_EU_WEST": "http://edge.eu.example",
        "CACHESYNC_MAX_RECORDS": "250",
    }
    result = CliRunner().invoke(app, ["config"], env=env)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "tok-very-secret" not in out and "hunter2" not in out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 4}
    assert (
        "********" in lines["CLOUDFLARE_API_TOKEN"]
        and "environment" in lines["CLOUDFLARE_API_TOKEN"]
    )
    assert "redis://:********@127.0.0.1:16382/0" in lines["CACHESYNC_STATE_REDIS_URL"]
    assert (
        "250" in lines["CACHESYNC_MAX_RECORDS"] and "environment" in lines["CACHESYNC_MAX_RECORDS"]
    )
    assert "http://edge.eu.example" in lines["EDGE_URL_EU_WEST"]
    assert "topology" in lines["EDGE_URL_US_EAST"]
    for variable in (
        "CACHESYNC_METRICS_HOST",
        "CACHESYNC_GROUP_PREFIX",
        "AWS_DEFAULT_REGION",
        "CLOUDFLARE_ZONE_AP_SOUTHEAST",
        "CLOUDFRONT_DISTRIBUTION_US_EAST",
    ):
        assert variable in lines, variable


def test_cloudflare_limits_can_be_set_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDFLARE_MAX_ITEMS_PER_REQUEST", "500")
    monkeypatch.setenv("CLOUDFLARE_RATE_PER_S", "50")
    cloudflare = load_settings().topology.cdn.cloudflare
    assert (cloudflare.max_items_per_request, cloudflare.rate_per_s) == (500, 50.0)
    assert cloudflare.burst == load_topology().cdn.cloudflare.burst  # untouched
    monkeypatch.setenv("CLOUDFLARE_MAX_ITEMS_PER_REQUEST", "0")
    with pytest.raises(ConfigError, match="CLOUDFLARE_MAX_ITEMS_PER_REQUEST"):
        load_settings()


# -- item 11: help screens --------------------------------------------------------------
def test_help_screens_show_no_bool_types_and_no_braces() -> None:
    for command in (
        ["--help"],
        ["run", "mapper", "--help"],
        ["trace", "--help"],
        ["dlq", "show", "--help"],
    ):
        out = CliRunner().invoke(app, command, env={"COLUMNS": "200"}).output
        assert "<bool>" not in out, command
        assert not re.search(r"\{[a-z_]+\}", out), command
    assert (
        "dlq show [OPTIONS] DEAD_LETTER_ID"
        in CliRunner().invoke(app, ["dlq", "show", "--help"], env={"COLUMNS": "200"}).output
    )
    verbose = CliRunner().invoke(app, ["run", "mapper", "--help"], env={"COLUMNS": "200"}).output
    assert "--no-verbose" not in verbose and "debug logs" in verbose
