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
    FilePath,
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


# Variables read outside the model below, listed so that `cachesync config` and README's
# configuration section (ops/config_reference.py) show them with the model's fields.
# Per region: prefix -> (the region's field in the topology, its default, or the variable
# it falls back to; what it is).
REGION_VARIABLES: dict[str, tuple[str, str]] = {
    "KAFKA_BOOTSTRAP_SERVERS_": (
        "KAFKA_BOOTSTRAP_SERVERS",
        "The Kafka cluster the region's sinks read (its own, fed by MirrorMaker 2).",
    ),
    "REDIS_URL_": ("redis_url", "The region's Redis: cache entries, the sinks' applied markers."),
    "EDGE_URL_": ("edge_url", "The region's HTTP edge, for the HTTP-purge sink and the warmer."),
    "CLOUDFLARE_ZONE_": (
        "cloudflare_zone",
        "The region's Cloudflare zone id; unset in both: no Cloudflare sink there.",
    ),
    "CLOUDFRONT_DISTRIBUTION_": (
        "cloudfront_distribution",
        "The region's CloudFront distribution id; unset in both: no CloudFront sink there.",
    ),
}
# Read straight from the environment (telemetry, the OpenTelemetry SDK): variable ->
# (default, what it is).
ENVIRONMENT_VARIABLES: dict[str, tuple[str, str]] = {
    "CACHESYNC_TRACE_KAFKA": (
        "off",
        "`1` adds aiokafka's span per message sent and received (half the CPU; context "
        "travels in headers either way).",
    ),
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("none", "OTLP/HTTP collector for traces and metrics."),
    "OTEL_SERVICE_NAME": ("cachesync-<role>", "The service name on spans and metrics."),
    "OTEL_TRACES_SAMPLER": (
        "parentbased always_on",
        "Standard sampler (with OTEL_TRACES_SAMPLER_ARG), always parent-based: the platform's "
        "decision wins, a ratio applies to events without a context; sample at high rates.",
    ),
}


class Settings(BaseSettings):
    """Addresses, limits and secrets. Field `x` is read from env var `X` (or CACHESYNC_X)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:19092",
        alias="KAFKA_BOOTSTRAP_SERVERS",
        description="The Kafka brokers, host:port[,host:port...].",
    )
    # How every client logs in to Kafka, on every cluster this process reaches (the home
    # one, a region's): pipeline/kafka.py (KafkaConnection) turns these into client options.
    # OAUTHBEARER is not offered: aiokafka takes it only as a token-provider object in code.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        alias="KAFKA_SECURITY_PROTOCOL",
        description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (managed clusters: SASL_SSL).",
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None,
        alias="KAFKA_SASL_MECHANISM",
        description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; needed by the SASL protocols.",
    )
    kafka_sasl_username: str | None = Field(
        default=None, alias="KAFKA_SASL_USERNAME", description="The SASL user (an API key)."
    )
    kafka_sasl_password: SecretStr | None = Field(
        default=None, alias="KAFKA_SASL_PASSWORD", description="The SASL password (an API secret)."
    )
    kafka_ssl_cafile: FilePath | None = Field(
        default=None,
        alias="KAFKA_SSL_CAFILE",
        description="PEM CAs that sign the brokers' certificates; unset: the system's CAs.",
    )
    kafka_ssl_certfile: FilePath | None = Field(
        default=None,
        alias="KAFKA_SSL_CERTFILE",
        description="PEM client certificate, for brokers that require one (mutual TLS).",
    )
    kafka_ssl_keyfile: FilePath | None = Field(
        default=None,
        alias="KAFKA_SSL_KEYFILE",
        description="The client certificate's private key (unset: inside KAFKA_SSL_CERTFILE).",
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        default=None,
        alias="KAFKA_SSL_KEY_PASSWORD",
        description="The password of an encrypted KAFKA_SSL_KEYFILE.",
    )
    topology_file: Path = Field(
        default=DEFAULT_TOPOLOGY,
        alias="CACHESYNC_TOPOLOGY",
        description="The topology file: topics, regions, rules, CDN and vendor API policy.",
    )
    topic_prefix: str = Field(
        default="",
        alias="CACHESYNC_TOPIC_PREFIX",
        description="Prepended to every topic name; lets tests and tenants share a cluster.",
    )
    state_redis_url: RedisDsn = Field(
        default=RedisDsn("redis://127.0.0.1:16382/0"),
        alias="CACHESYNC_STATE_REDIS_URL",
        description="The mapper's relationship index (vendor to weddings) and the re-drive ledger.",
    )
    max_event_bytes: int = Field(
        default=1_000_000,
        ge=1024,
        alias="CACHESYNC_MAX_EVENT_BYTES",
        description="Larger events are dead-lettered as `oversized`.",
    )
    consumer_max_records: int = Field(
        default=500,
        ge=1,
        alias="CACHESYNC_MAX_RECORDS",
        description="Records a consumer handles per batch (a sink may take more).",
    )
    commit_interval_ms: int = Field(
        default=1000,
        ge=0,
        alias="CACHESYNC_COMMIT_INTERVAL_MS",
        description=(
            "How often a consumer commits its offsets while batches keep coming (0: after "
            "every batch); it commits at once when idle, on a rebalance and on stop. Only "
            "applied batches are ever committed; a crash re-reads at most this interval."
        ),
    )
    group_prefix: str = Field(
        default="cachesync",
        alias="CACHESYNC_GROUP_PREFIX",
        description="Prefix of every consumer group (`<prefix>.mapper`, `<prefix>.sink.<region>.<sink>`).",
    )
    metrics_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        alias="CACHESYNC_METRICS_PORT",
        description="/metrics, /healthz and /readyz of `cachesync run`; 0 turns them off.",
    )
    # Health endpoints (/healthz, /readyz) share the metrics port; see consumers/health.py.
    metrics_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        alias="CACHESYNC_METRICS_HOST",
        description="The address they bind to (`::` for IPv6); the container image sets 0.0.0.0.",
    )
    liveness_timeout_s: float = Field(
        default=300.0,
        gt=0,
        alias="CACHESYNC_LIVENESS_TIMEOUT_S",
        description="/healthz fails once a consumer loop has not polled for this long "
        "(Kafka's own max.poll.interval.ms is 300 s).",
    )
    shutdown_grace_s: float = Field(
        default=25.0,
        gt=0,
        alias="CACHESYNC_SHUTDOWN_GRACE_S",
        description="After SIGTERM, how long in-flight batches may take to finish and commit "
        "before the run aborts (keep it below Kubernetes' terminationGracePeriodSeconds).",
    )
    encoding: Literal["single-object", "confluent"] = Field(
        default="single-object",
        alias="CACHESYNC_ENCODING",
        description="Wire format: `single-object` (no registry) or `confluent` (needs the registry).",
    )
    schema_registry_url: AnyHttpUrl | None = Field(
        default=None,
        alias="CACHESYNC_SCHEMA_REGISTRY_URL",
        description="The Confluent schema registry, for CACHESYNC_ENCODING=confluent.",
    )
    # Secrets for the CDN sinks; held as SecretStr so they never print.
    cloudflare_api_token: SecretStr | None = Field(
        default=None,
        alias="CLOUDFLARE_API_TOKEN",
        description="Cloudflare API token with Cache Purge permission (secret).",
    )
    aws_access_key_id: SecretStr | None = Field(
        default=None,
        alias="AWS_ACCESS_KEY_ID",
        description="AWS key for CloudFront invalidations (secret; a profile or role also works).",
    )
    aws_secret_access_key: SecretStr | None = Field(
        default=None, alias="AWS_SECRET_ACCESS_KEY", description="Its secret (secret)."
    )
    aws_default_region: str | None = Field(
        default=None,
        alias="AWS_DEFAULT_REGION",
        description="Read by the AWS SDK; CloudFront's API lives in us-east-1 whatever it says.",
    )
    # CDN endpoints: unset means the real providers (the topology's cdn.cloudflare.api_url,
    # AWS's own endpoint); tests and the local stack point them at stubs.
    cloudflare_api_url: str | None = Field(
        default=None,
        alias="CLOUDFLARE_API_URL",
        description="Cloudflare's API; unset: the topology's cdn.cloudflare.api_url (the real one).",
    )
    cloudfront_endpoint_url: str | None = Field(
        default=None,
        alias="CLOUDFRONT_ENDPOINT_URL",
        description="CloudFront's API; unset: AWS's own (the local stack points it at moto).",
    )
    # Provider limits: unset, the topology's `cdn:` values apply (see `topology` below).
    cloudflare_max_items_per_request: int | None = Field(
        default=None,
        ge=1,
        alias="CLOUDFLARE_MAX_ITEMS_PER_REQUEST",
        description="Items per purge_cache call (your plan's: 100, Enterprise 500); "
        "overrides cdn.cloudflare.max_items_per_request.",
    )
    cloudflare_rate_per_s: float | None = Field(
        default=None,
        gt=0,
        alias="CLOUDFLARE_RATE_PER_S",
        description="purge_cache calls per second per zone (the plan's rate); overrides "
        "cdn.cloudflare.rate_per_s (a region's own cloudflare_rate_per_s still wins).",
    )
    cloudflare_burst: int | None = Field(
        default=None,
        ge=1,
        alias="CLOUDFLARE_BURST",
        description="The token bucket's size per zone; overrides cdn.cloudflare.burst.",
    )

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        for part in value.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    @model_validator(mode="after")
    def _kafka_login(self) -> Settings:
        """The security settings agree with the protocol: a SASL protocol has its login, and
        no SASL or TLS setting is given to a protocol that would silently ignore it."""
        protocol = self.kafka_security_protocol
        sasl = {
            "KAFKA_SASL_MECHANISM": self.kafka_sasl_mechanism,
            "KAFKA_SASL_USERNAME": self.kafka_sasl_username,
            "KAFKA_SASL_PASSWORD": self.kafka_sasl_password,
        }
        tls = {
            "KAFKA_SSL_CAFILE": self.kafka_ssl_cafile,
            "KAFKA_SSL_CERTFILE": self.kafka_ssl_certfile,
            "KAFKA_SSL_KEYFILE": self.kafka_ssl_keyfile,
            "KAFKA_SSL_KEY_PASSWORD": self.kafka_ssl_key_password,
        }
        if protocol.startswith("SASL_"):
            missing = [var for var, value in sasl.items() if not value]
            if missing:
                raise ValueError(
                    f"{', '.join(missing)} must be set when KAFKA_SECURITY_PROTOCOL={protocol}"
                )
        elif given := [var for var, value in sasl.items() if value is not None]:
            raise ValueError(
                f"{', '.join(given)} set, but KAFKA_SECURITY_PROTOCOL={protocol} has no SASL "
                "login (SASL_SSL or SASL_PLAINTEXT)"
            )
        if protocol not in ("SSL", "SASL_SSL") and (
            given := [var for var, value in tls.items() if value is not None]
        ):
            raise ValueError(
                f"{', '.join(given)} set, but KAFKA_SECURITY_PROTOCOL={protocol} does not use "
                "TLS (SSL or SASL_SSL)"
            )
        if self.kafka_ssl_certfile is None and (
            self.kafka_ssl_keyfile is not None or self.kafka_ssl_key_password is not None
        ):
            raise ValueError("KAFKA_SSL_KEYFILE / KAFKA_SSL_KEY_PASSWORD need KAFKA_SSL_CERTFILE")
        return self

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
            topology = load_topology(self.topology_file, known_events=known)
        except TopologyError as exc:
            raise ConfigError(f"CACHESYNC_TOPOLOGY={exc}") from None
        return self._with_provider_limits(topology)

    def _with_provider_limits(self, topology: Topology) -> Topology:
        """The topology with the provider limits set in the environment (validated above)."""
        limits = {
            "max_items_per_request": self.cloudflare_max_items_per_request,
            "rate_per_s": self.cloudflare_rate_per_s,
            "burst": self.cloudflare_burst,
        }
        changed = {name: value for name, value in limits.items() if value is not None}
        if not changed:
            return topology
        cloudflare = topology.cdn.cloudflare.model_copy(update=changed)
        cdn = topology.cdn.model_copy(update={"cloudflare": cloudflare})
        return topology.model_copy(update={"cdn": cdn})

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
    def region_kafka_bootstrap_servers(self) -> dict[str, str]:
        """The cluster each region's sinks read: KAFKA_BOOTSTRAP_SERVERS_<REGION> if set (the
        region's own cluster, fed by MirrorMaker 2), else KAFKA_BOOTSTRAP_SERVERS."""
        out: dict[str, str] = {}
        for region in self.topology.regions:
            var = region_var("KAFKA_BOOTSTRAP_SERVERS_", region)
            value = os.environ.get(var) or self.kafka_bootstrap_servers
            try:
                out[region] = self._host_ports(value)
            except ValueError as exc:
                raise ConfigError(f"{var}: {exc}") from None
        return out

    def kafka_bootstrap_for(self, region: str | None = None) -> str:
        """The home cluster (None), or the cluster `region`'s sinks read."""
        if region is None:
            return self.kafka_bootstrap_servers
        return self.region_kafka_bootstrap_servers[region]

    def kafka_bootstrap_variable(self, region: str | None = None) -> str:
        """The variable that names that cluster, for messages."""
        var = region_var("KAFKA_BOOTSTRAP_SERVERS_", region) if region else ""
        return var if var and os.environ.get(var) else "KAFKA_BOOTSTRAP_SERVERS"

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
            # A check across fields (a model validator) names its variables itself.
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{alias}: {msg}" if err["loc"] else msg)
        raise ConfigError("invalid settings: " + "; ".join(lines)) from None
    # Touch the derived views so a broken topology or region URL fails at start-up.
    _ = settings.topology, settings.region_redis_urls, settings.region_kafka_bootstrap_servers
    return settings
