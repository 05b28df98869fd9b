"""Building a region's sinks from settings and topology, and saying why one cannot be built.

`run all` asks `unavailable` first and skips, with a note, a sink whose provider is
not configured in a region (no zone, no token, no distribution, no edge); `run sink`
builds the one it is asked for and fails with the same reason.
"""

from __future__ import annotations

import os

from cachesync.consumers.errors import ConfigError
from cachesync.consumers.settings import Settings, region_var
from cachesync.consumers.sinks.base import Sink

SINK_KINDS = ["redis", "cloudflare", "cloudfront", "http_purge", "warmer"]
PURGE_KINDS = ["redis", "cloudflare", "cloudfront", "http_purge"]

# Where boto3 finds credentials without AWS_ACCESS_KEY_ID (profiles, roles, containers).
_AWS_CREDENTIAL_SOURCES = (
    "AWS_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def unavailable(settings: Settings, region: str, kind: str) -> str | None:
    """Why `kind` cannot run in `region` with this configuration, or None when it can."""
    if region not in settings.topology.regions:
        return f"unknown region {region!r}; topology has {sorted(settings.topology.regions)}"
    spec = settings.topology.regions[region]
    if kind == "redis":
        return None
    if kind == "cloudflare":
        if region not in settings.region_cloudflare_zones:
            return f"region {region} has no cloudflare_zone ({region_var('CLOUDFLARE_ZONE_', region)} or {settings.topology_file})"
        if not spec.public_url:
            return f"region {region} has no public_url in {settings.topology_file}"
        if settings.cloudflare_api_token is None:
            return "CLOUDFLARE_API_TOKEN is not set"
        return None
    if kind == "cloudfront":
        if region not in settings.region_cloudfront_distributions:
            return (
                f"region {region} has no cloudfront_distribution "
                f"({region_var('CLOUDFRONT_DISTRIBUTION_', region)} or {settings.topology_file})"
            )
        has_keys = settings.aws_access_key_id is not None and settings.aws_secret_access_key
        if not (has_keys or any(os.environ.get(v) for v in _AWS_CREDENTIAL_SOURCES)):
            return "no AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile/role)"
        return None
    if kind in ("http_purge", "warmer"):
        if region not in settings.region_edge_urls:
            var = region_var("EDGE_URL_", region)
            return f"region {region} has no edge_url ({var} or the topology)"
        return None
    return f"unknown sink {kind!r}; known: {SINK_KINDS}"


def build_sink(settings: Settings, region: str, kind: str) -> Sink:
    """The sink `kind` for `region`; ConfigError (naming what is missing) if it cannot run."""
    reason = unavailable(settings, region, kind)
    if reason is not None:
        raise ConfigError(f"sink {kind} in {region}: {reason}")
    sink = _build(settings, region, kind)
    if kind in EDGE_KINDS:
        sink.after = ("redis",)  # tier order: the edges purge after the region's Redis
    return sink


# Sinks in front of guests (CDNs and HTTP edges): they purge after Redis has.
EDGE_KINDS = ("cloudflare", "cloudfront", "http_purge")


def _build(settings: Settings, region: str, kind: str) -> Sink:
    spec = settings.topology.regions[region]
    policy = settings.topology.cdn
    redis_url = settings.region_redis_urls[region]
    if kind == "redis":
        from cachesync.consumers.sinks.redis import RedisSink

        return RedisSink(region, redis_url)
    if kind == "cloudflare":
        from cachesync.consumers.sinks.cloudflare import CloudflareSink

        assert spec.public_url and settings.cloudflare_api_token
        return CloudflareSink(
            region,
            zone=settings.region_cloudflare_zones[region],
            token=settings.cloudflare_api_token,
            public_url=spec.public_url,
            redis=redis_url,
            policy=policy,
            api_url=settings.cloudflare_api_url,
            rate_per_s=spec.cloudflare_rate_per_s,
        )
    if kind == "cloudfront":
        from cachesync.consumers.sinks.cloudfront import CloudFrontSink

        return CloudFrontSink(
            region,
            distribution=settings.region_cloudfront_distributions[region],
            redis=redis_url,
            policy=policy,
            endpoint_url=settings.cloudfront_endpoint_url,
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=settings.aws_secret_access_key,
        )
    edge_url = settings.region_edge_urls[region]
    if kind == "http_purge":
        from cachesync.consumers.sinks.http_purge import HttpPurgeSink

        return HttpPurgeSink(region, edge_url=edge_url, redis=redis_url, policy=policy)
    from cachesync.consumers.sinks.warmer import WarmerSink

    # Warm only after every purge sink configured here has applied the event's purge.
    after = [k for k in PURGE_KINDS if unavailable(settings, region, k) is None]
    return WarmerSink(region, edge_url=edge_url, redis=redis_url, after=after, policy=policy)
