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
    """Each sink is built by its class; edges follow Redis; the warmer its region's front."""
    sinks = {kind: registry.build_sink(configured, EU, kind) for kind in registry.SINK_KINDS}
    try:
        for kind, sink in sinks.items():
            assert type(sink) is registry.SINKS[kind] and sink.region == EU
        assert sinks["redis"].after == ()
        for edge in ("cloudflare", "cloudfront", "http_purge"):
            assert sinks[edge].after == ("redis",), edge
        assert sinks["warmer"].after == ("http_purge",)
        cloudflare = sinks["cloudflare"]
        assert isinstance(cloudflare, CloudflareSink) and cloudflare.zone == "zone-eu"
        cloudfront = sinks["cloudfront"]
        assert isinstance(cloudfront, CloudFrontSink) and cloudfront.distribution == "DIST-EU"
    finally:
        for sink in sinks.values():
            await sink.close()


async def test_the_warmer_waits_only_for_the_tier_it_warms_through(bare: Settings) -> None:
    """Built by the registry, the warmer waits for its region's front tier (the HTTP edge
    here), not for CDNs its guests do not reach through that edge."""
    warmer = registry.build_sink(bare, EU, "warmer")
    await warmer.close()
    assert isinstance(warmer, WarmerSink)
    assert warmer.after == ("http_purge",) and warmer.fenced_by == ("http_purge",)
    assert warmer.edge_url == bare.region_edge_urls[EU]
    assert warmer.after_max_wait_s == bare.topology.cdn.warm.max_wait_s
    assert warmer.after_retry_s == bare.topology.cdn.warm.wait_retry_s


def _front(settings: Settings, front: str) -> Settings:
    regions = dict(settings.topology.regions)
    # (Over plain HTTP: the warmer's edge client speaks nothing else.)
    public = "http://eu.weddings.example"
    regions[EU] = regions[EU].model_copy(update={"front": front, "public_url": public})
    topology = settings.topology.model_copy(update={"regions": regions})
    return settings.model_copy(update={"topology": topology})


async def test_through_cloudfront_the_warmer_waits_for_completed_invalidations(
    configured: Settings, bare: Settings
) -> None:
    """A region fronted by CloudFront: warms go to its public URL, after the invalidation
    completed; without CloudFront configured there, the warmer cannot run."""
    warmer = registry.build_sink(_front(configured, "cloudfront"), EU, "warmer")
    await warmer.close()
    assert isinstance(warmer, WarmerSink)
    assert warmer.after == ("cloudfront:completed",) and warmer.fenced_by == ("cloudfront",)
    assert warmer.edge_url == "http://eu.weddings.example"
    assert "cloudfront" in str(registry.unavailable(_front(bare, "cloudfront"), EU, "warmer"))
