"""Bad settings fail at start-up with the variable's name."""

from __future__ import annotations

import pytest

from cachesync.consumers.errors import ConfigError
from cachesync.consumers.settings import load_settings


def test_bad_bootstrap_servers_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "localhost")
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS"):
        load_settings()


def test_bad_region_redis_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL_EU_WEST", "http://nope")
    with pytest.raises(ConfigError, match="REDIS_URL_EU_WEST"):
        load_settings()


def test_region_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL_AP_SOUTHEAST", "redis://10.0.0.9:6390/2")
    assert load_settings().region_redis_urls["ap-southeast"] == "redis://10.0.0.9:6390/2"


def test_broken_topology_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "t.yaml"
    bad.write_text("topics: [")
    monkeypatch.setenv("CACHESYNC_TOPOLOGY", str(bad))
    with pytest.raises(ConfigError, match=str(bad)):
        load_settings()


def test_secrets_do_not_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", "cf-very-secret")
    settings = load_settings()
    assert "cf-very-secret" not in repr(settings)
    assert "cf-very-secret" not in str(settings.model_dump())
