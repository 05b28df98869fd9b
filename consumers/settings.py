"""Run-time settings from the environment, validated at start-up.

Every address and secret comes from an environment variable; a wrong value fails
with a `ConfigError` that names the variable. Per-region Redis URLs default to the
topology's and are overridden by `REDIS_URL_<REGION>` (`REDIS_URL_EU_WEST`).
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import (
    AnyHttpUrl,
    Field,
    RedisDsn,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from cachesync.consumers.errors import ConfigError
from cachesync.schemas import SchemaCatalog
from cachesync.topology import DEFAULT_TOPOLOGY, Topology, TopologyError, load_topology

_REDIS_DSN = TypeAdapter(RedisDsn)


def region_var(prefix: str, region: str) -> str:
    """The environment variable that overrides a region's setting: `EDGE_URL_` + eu-west
    gives EDGE_URL_EU_WEST."""
    return prefix + region.upper().replace("-", "_")


def region_env_var(region: str) -> str:
    return region_var("REDIS_URL_", region)


class Settings(BaseSettings):
    """Addresses, limits and secrets. Field `x` is read from env var `X` (or CACHESYNC_X)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    kafka_bootstrap_servers: str = Field(default="127.0.0.1:19092", alias="KAFKA_BOOTSTRAP_SERVERS")
    topology_file: Path = Field(default=DEFAULT_TOPOLOGY, alias="CACHESYNC_TOPOLOGY")
    topic_prefix: str = Field(
        default="",
        alias="CACHESYNC_TOPIC_PREFIX",
        description="Prepended to every topic name; lets tests and tenants share a cluster.",
    )
    state_redis_url: RedisDsn = Field(
        default=RedisDsn("redis://127.0.0.1:16382/0"), alias="CACHESYNC_STATE_REDIS_URL"
    )
    max_event_bytes: int = Field(default=1_000_000, ge=1024, alias="CACHESYNC_MAX_EVENT_BYTES")
    consumer_max_records: int = Field(default=500, ge=1, alias="CACHESYNC_MAX_RECORDS")
    group_prefix: str = Field(default="cachesync", alias="CACHESYNC_GROUP_PREFIX")
    metrics_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        alias="CACHESYNC_METRICS_PORT",
        description="Prometheus /metrics of `cachesync run`; 0 turns it off.",
    )
    encoding: Literal["single-object", "confluent"] = Field(
        default="single-object", alias="CACHESYNC_ENCODING"
    )
    schema_registry_url: AnyHttpUrl | None = Field(
        default=None, alias="CACHESYNC_SCHEMA_REGISTRY_URL"
    )
    # Secrets for the CDN sinks; held as SecretStr so they never print.
    cloudflare_api_token: SecretStr | None = Field(default=None, alias="CLOUDFLARE_API_TOKEN")
    aws_access_key_id: SecretStr | None = Field(default=None, alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: SecretStr | None = Field(default=None, alias="AWS_SECRET_ACCESS_KEY")
    # CDN endpoints: unset means the real providers (the topology's cdn.cloudflare.api_url,
    # AWS's own endpoint); tests and the local stack point them at stubs.
    cloudflare_api_url: str | None = Field(default=None, alias="CLOUDFLARE_API_URL")
    cloudfront_endpoint_url: str | None = Field(default=None, alias="CLOUDFRONT_ENDPOINT_URL")

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        for part in value.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    @model_validator(mode="after")
    def _registry_for_confluent(self) -> Settings:
        if self.encoding == "confluent" and self.schema_registry_url is None:
            raise ValueError(
                "CACHESYNC_SCHEMA_REGISTRY_URL must be set when CACHESYNC_ENCODING=confluent"
            )
        return self

    @cached_property
    def catalog(self) -> SchemaCatalog:
        return SchemaCatalog()

    @cached_property
    def topology(self) -> Topology:
        known = {t: self.catalog.latest(t).field_names for t in self.catalog.types("events")}
        try:
            return load_topology(self.topology_file, known_events=known)
        except TopologyError as exc:
            raise ConfigError(f"CACHESYNC_TOPOLOGY={exc}") from None

    @cached_property
    def region_redis_urls(self) -> dict[str, str]:
        """Redis URL per region: REDIS_URL_<REGION> if set, else the topology's."""
        urls: dict[str, str] = {}
        for region, spec in self.topology.regions.items():
            var = region_env_var(region)
            value = os.environ.get(var) or spec.redis_url
            if not value:
                raise ConfigError(
                    f"{var} is not set and region {region!r} has no redis_url in {self.topology_file}"
                )
            try:
                urls[region] = str(_REDIS_DSN.validate_python(value))
            except ValidationError as exc:
                raise ConfigError(f"{var}: not a Redis URL ({exc.errors()[0]['msg']})") from None
        return urls

    @cached_property
    def region_edge_urls(self) -> dict[str, str]:
        """Each region's HTTP edge: EDGE_URL_<REGION> if set, else the topology's edge_url."""
        urls = self._per_region("EDGE_URL_", "edge_url")
        for region, value in urls.items():
            if not value.startswith(("http://", "https://")):
                var = region_var("EDGE_URL_", region)
                raise ConfigError(f"{var}: expected an http(s) URL, got {value!r}")
        return {region: value.rstrip("/") for region, value in urls.items()}

    @cached_property
    def region_cloudflare_zones(self) -> dict[str, str]:
        """Each region's Cloudflare zone: CLOUDFLARE_ZONE_<REGION> if set, else the topology's."""
        return self._per_region("CLOUDFLARE_ZONE_", "cloudflare_zone")

    @cached_property
    def region_cloudfront_distributions(self) -> dict[str, str]:
        """Each region's CloudFront distribution: CLOUDFRONT_DISTRIBUTION_<REGION> or the topology's."""
        return self._per_region("CLOUDFRONT_DISTRIBUTION_", "cloudfront_distribution")

    def _per_region(self, env_prefix: str, field: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for region, spec in self.topology.regions.items():
            value = os.environ.get(region_var(env_prefix, region)) or getattr(spec, field)
            if value:
                out[region] = str(value)
        return out

    def topic(self, name: str) -> str:
        return self.topic_prefix + name

    def commands_topic(self, region: str) -> str:
        return self.topology.commands_topic(region, self.topic_prefix)

    @property
    def dead_letter_topic(self) -> str:
        return self.topic(self.topology.topics.dead_letter.name)

    @property
    def audit_topic(self) -> str:
        return self.topic(self.topology.topics.audit.name)

    @property
    def content_topics(self) -> list[str]:
        return [self.topic(t.name) for t in self.topology.topics.content]

    def group_id(self, *parts: str) -> str:
        return ".".join((self.group_prefix, *parts))


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, turning validation errors into ConfigError."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        fields = Settings.model_fields
        lines = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            alias = fields[name].alias if name in fields and fields[name].alias else name
            lines.append(f"{alias}: {err['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(lines)) from None
    # Touch the derived views so a broken topology or region URL fails at start-up.
    _ = settings.topology, settings.region_redis_urls
    return settings
