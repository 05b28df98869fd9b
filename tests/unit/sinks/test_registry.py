"""The sink registry: kinds come from the sink classes, each class says why it cannot run."""

from __future__ import annotations

import pytest

from cachesync.consumers.errors import ConfigError
from cachesync.consumers.settings import Settings, load_settings
from cachesync.consumers.sinks import registry
from cachesync.consumers.sinks.cloudflare import CloudflareSink
from cachesync.consumers.sinks.cloudfront import CloudFrontSink
from cachesync.consumers.sinks.http_purge import HttpPurgeSink
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.consumers.sinks.warmer import WarmerSink

EU = "eu-west"
_AWS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@pytest.fixture
def bare(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with no CDN provider configured in any region (the topology's default)."""
    for var in (*_AWS, "CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ZONE_EU_WEST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("CLOUDFRONT_DISTRIBUTION_EU_WEST", raising=False)
    return load_settings()


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch, bare: Settings) -> Settings:
    """Every provider configured in eu-west (and only there)."""
    monkeypatch.setenv("CLOUDFLARE_ZONE_EU_WEST", "zone-eu")
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", "cf-token")
    monkeypatch.setenv("CLOUDFRONT_DISTRIBUTION_EU_WEST", "DIST-EU")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return load_settings()


def test_kinds_come_from_the_classes_in_tier_order() -> None:
    """The registry is kind -> class; the kind lists are derived from it, Redis first."""
    classes = (RedisSink, CloudflareSink, CloudFrontSink, HttpPurgeSink, WarmerSink)
    assert list(registry.SINKS.items()) == [(cls.kind, cls) for cls in classes]
    assert registry.SINK_KINDS == ["redis", "cloudflare", "cloudfront", "http_purge", "warmer"]
    assert registry.PURGE_KINDS == ["redis", "cloudflare", "cloudfront", "http_purge"]
    assert registry.WARM_KINDS == ["warmer"]


def test_each_class_says_why_it_cannot_run(bare: Settings) -> None:
    """Unconfigured providers are refused with the variable to set; Redis and the edge run."""
    assert registry.unavailable(bare, EU, "redis") is None
    assert registry.unavailable(bare, EU, "http_purge") is None
    assert registry.unavailable(bare, EU, "warmer") is None
    assert "CLOUDFLARE_ZONE_EU_WEST" in str(registry.unavailable(bare, EU, "cloudflare"))
    assert "CLOUDFRONT_DISTRIBUTION_EU_WEST" in str(registry.unavailable(bare, EU, "cloudfront"))
    assert "unknown sink 'memcached'" in str(registry.unavailable(bare, EU, "memcached"))
    assert "unknown region 'mars'" in str(registry.unavailable(bare, "mars", "redis"))
    with pytest.raises(ConfigError, match="sink cloudflare in eu-west"):
        registry.build_sink(bare, EU, "cloudflare")


def test_cloudflare_needs_a_token_and_cloudfront_credentials(
    monkeypatch: pytest.MonkeyPatch, bare: Settings
) -> None:
    monkeypatch.setenv("CLOUDFLARE_ZONE_EU_WEST", "zone-eu")
    monkeypatch.setenv("CLOUDFRONT_DISTRIBUTION_EU_WEST", "DIST-EU")
    settings = load_settings()
    assert registry.unavailable(settings, EU, "cloudflare") == "CLOUDFLARE_API_TOKEN is not set"
    assert "no AWS credentials" in str(registry.unavailable(settings, EU, "cloudfront"))
    monkeypatch.setenv("AWS_PROFILE", "cachesync")  # a profile is enough: boto3 finds the keys
    assert registry.unavailable(load_settings(), EU, "cloudfront") is None


async def test_build_sink_uses_each_class_from_settings_and_tier_order(
    configured: Settings,
) -> None:
    """Each sink is built by its class; edges follow Redis; the warmer every purge sink here."""
    sinks = {kind: registry.build_sink(configured, EU, kind) for kind in registry.SINK_KINDS}
    try:
        for kind, sink in sinks.items():
            assert type(sink) is registry.SINKS[kind] and sink.region == EU
        assert sinks["redis"].after == ()
        for edge in ("cloudflare", "cloudfront", "http_purge"):
            assert sinks[edge].after == ("redis",), edge
        assert sinks["warmer"].after == ("redis", "cloudflare", "cloudfront", "http_purge")
        cloudflare = sinks["cloudflare"]
        assert isinstance(cloudflare, CloudflareSink) and cloudflare.zone == "zone-eu"
        cloudfront = sinks["cloudfront"]
        assert isinstance(cloudfront, CloudFrontSink) and cloudfront.distribution == "DIST-EU"
    finally:
        for sink in sinks.values():
            await sink.close()


async def test_the_warmer_follows_only_the_purge_sinks_configured_in_its_region(
    bare: Settings,
) -> None:
    """Built by the registry, the warmer waits for the purge tiers that run in its region."""
    warmer = registry.build_sink(bare, EU, "warmer")
    await warmer.close()
    assert isinstance(warmer, WarmerSink)
    assert warmer.after == ("redis", "http_purge")
    assert warmer.after_max_wait_s == bare.topology.cdn.warm.max_wait_s
    assert warmer.after_retry_s == bare.topology.cdn.warm.wait_retry_s


def test_the_warmer_follows_every_purge_tier() -> None:
    """The warmer's list of purge tiers is the registry's: a new purge sink is not forgotten."""
    from cachesync.consumers.sinks.registry import PURGE_KINDS
    from cachesync.consumers.sinks.warmer import PURGE_TIERS

    assert list(PURGE_TIERS) == PURGE_KINDS
