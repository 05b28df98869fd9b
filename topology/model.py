"""The pydantic model of `topology.yaml`, and its loader.

Loading fails with `TopologyError`, whose message lists every problem with the
file, the rule and the field, so one `cachesync topology check` shows them all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cachesync.topology.templates import fields_of

DEFAULT_TOPOLOGY = Path(__file__).parent / "topology.yaml"

IndexAction = Literal["link_vendor", "unlink_vendor", "forget_vendor", "wedding_regions"]
Fanout = Literal["vendor_weddings"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopicSpec(_Strict):
    name: str
    partitions: int = Field(default=3, ge=1, le=1000)
    retention_ms: int | None = Field(default=None, ge=-1)
    compacted: bool = False


class ContentTopic(TopicSpec):
    events: list[str] = Field(min_length=1)


class Topics(_Strict):
    content: list[ContentTopic] = Field(min_length=1)
    commands: TopicSpec
    dead_letter: TopicSpec
    audit: TopicSpec

    @field_validator("commands")
    @classmethod
    def _has_region_placeholder(cls, v: TopicSpec) -> TopicSpec:
        if "{region}" not in v.name:
            raise ValueError("the commands topic name must contain {region}")
        return v


class RegionSpec(_Strict):
    redis_url: str | None = None
    countries: list[str] = Field(default_factory=list)
    # The region's CDNs and edge (consumers/sinks/*); a sink whose target is not set
    # is not configured in that region (`run all` skips it with a note).
    cloudflare_zone: str | None = None
    cloudfront_distribution: str | None = None
    # The region's HTTP edge (Varnish/Fastly style): the HTTP-purge sink sends PURGE/BAN
    # here and the warmer GETs through it. EDGE_URL_<REGION> overrides.
    edge_url: str | None = None
    # How the HTTP-purge sink purges URLs at that edge: "xkey", many URLs per request by
    # the surrogate key the edge gives each object for its URL (deploy/varnish/default.vcl
    # does; keys.url_xkey), or "purge", one PURGE per URL, for an edge without that key.
    # Switch an edge to "xkey" once the objects it cached before it tagged URLs are gone
    # (their TTL and grace, or a ban): an object without its URL key is not purged by it.
    edge_purge: Literal["xkey", "purge"] = "purge"
    # The site as the CDN caches it: Cloudflare purges files by full URL and prefixes
    # by host/path, so paths from the rules are joined to this.
    public_url: str | None = None
    # The zone's plan rate for purge_cache, if it differs from cdn.cloudflare.rate_per_s.
    cloudflare_rate_per_s: float | None = Field(default=None, gt=0)
    # The tier whose cache serves the region's public URLs to guests: http_purge (the HTTP
    # edge at edge_url), cloudflare or cloudfront (public_url). The warmer warms through it
    # and waits only for that tier's purge of the same event (for CloudFront, until the
    # invalidation completes). None: the HTTP edge.
    front: Literal["http_purge", "cloudflare", "cloudfront"] | None = None


class CloudflarePolicy(_Strict):
    """Cloudflare purge_cache: per-request item limit, the plan's rate, when to escalate."""

    api_url: str = "https://api.cloudflare.com"
    max_items_per_request: int = Field(default=100, ge=1)
    rate_per_s: float = Field(default=5.0, gt=0)  # token bucket per zone
    burst: int = Field(default=10, ge=1)
    # More URLs than this under one entity root (/weddings/w1/) become one prefix purge.
    escalate_urls_over: int = Field(default=30, ge=1)
    # Cost budget: requests per flush; beyond it URLs escalate to prefixes.
    max_requests_per_flush: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=10.0, gt=0)
    attempts: int = Field(default=4, ge=1)  # 5xx / timeouts, jittered backoff


class CloudFrontPolicy(_Strict):
    """CloudFront invalidations: the per-distribution in-progress limits and path budget."""

    max_paths_in_progress: int = Field(default=3000, ge=1)
    max_wildcards_in_progress: int = Field(default=15, ge=1)
    # Cost budget: paths per flush (each path or wildcard is billed once); beyond it,
    # the entity roots with the most paths become wildcards, invalidating pages nobody
    # asked for. None: no such budget; a flush with more paths than the in-progress limit
    # leaves free is sent as several invalidations, one after another.
    max_paths_per_flush: int | None = Field(default=None, ge=1)
    escalate_paths_over: int = Field(default=30, ge=1)
    # How long to wait (partition paused) when the in-progress limits are full.
    busy_retry_s: float = Field(default=30.0, gt=0)
    # Its own, longer upper bound on coalescing: an invalidation takes minutes and is billed
    # per path, so gathering longer (in a burst) costs little and saves calls and paths.
    window_ms: int = Field(default=10000, ge=0)
    # CreateInvalidation calls per second and their bucket: a purge goes out at once when
    # a token is free; purges gather while it is empty (the API throttles faster callers).
    rate_per_s: float = Field(default=2.0, gt=0)
    burst: int = Field(default=5, ge=1)
    # After a quiet spell (no call for as long as the bucket takes to refill), the first
    # invalidation waits until its oldest purge is this old: the first commands of a burst
    # look like a lone event, and an invalidation sent for them alone is one more call than
    # the burst needs (of a minimum of 2 per distribution in the 10,000-event burst). On
    # this project's 2-core bench, the mapper wrote a region's first ~200 commands of that
    # burst over a second (not yet a burst by rate), so 1 s still let one such call out
    # (1 run in 4); by 2 s its batches are large. A steady flow keeps the bucket from
    # filling and never waits for it; a lone event's invalidation is created 2 s later,
    # against the minutes CloudFront takes to complete it.
    settle_ms: int = Field(default=2000, ge=0)
    # A warm through CloudFront waits for its invalidation to complete; GetInvalidation is
    # asked at most this often per distribution (the API's rate is low).
    completion_poll_s: float = Field(default=1.0, gt=0)
    timeout_s: float = Field(default=20.0, gt=0)
    attempts: int = Field(default=4, ge=1)


class HttpPurgePolicy(_Strict):
    """Varnish/Fastly-style edge: PURGE by URL, xkey surrogate keys, BAN by prefix."""

    max_keys_per_request: int = Field(default=256, ge=1)
    # The longest xkey header value sent: Varnish refuses (400) a request header line
    # over its http_req_hdr_len (8 KiB by default), so a request takes fewer keys than
    # max_keys_per_request when they are long.
    max_header_bytes: int = Field(default=8000, ge=256)
    soft: bool = False  # xkey-softpurge: keep serving stale while the origin refetches
    concurrency: int = Field(default=16, ge=1)
    timeout_s: float = Field(default=5.0, gt=0)
    attempts: int = Field(default=3, ge=1)


class WarmPolicy(_Strict):
    """The warmer: how hard it may hit a region's edge, and what confirms a warm."""

    concurrency: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=10.0, gt=0)
    attempts: int = Field(default=3, ge=1)
    cache_status_header: str = "X-Cache"
    confirm: bool = True  # GET again after a MISS: warm only when the edge says HIT
    wait_retry_s: float = Field(default=1.0, gt=0)  # purge not yet applied: look again
    # A warm whose purge is still not applied this long after it was issued is dropped,
    # so one lost purge cannot hold its partition's other warms until the deadline.
    max_wait_s: float = Field(default=60.0, gt=0)


class CdnPolicy(_Strict):
    """The purge budget and the CDN sinks' limits (`cdn:` in topology.yaml)."""

    # The longest a purge waits to be coalesced with others (sinks/budget.py `coalesce_s`):
    # it goes out at once unless a call is in flight, the provider's bucket is empty or a
    # burst is arriving, and never later than this after it was written.
    window_ms: int = Field(default=1000, ge=0)
    # Commands per second, per region, above which the CDN sinks take the traffic as a
    # burst: its purges gather until it pauses (or the window closes), so a burst costs the
    # providers' minimum number of calls.
    burst_records_per_s: float = Field(default=500.0, gt=0)
    # How long an edge holds a purge whose event the region's Redis sink has not applied,
    # counted from when the command was issued; then it purges anyway, so a stopped Redis
    # sink never stops the edges for longer (pipeline/roles.py `hold_for_earlier_tiers`).
    tier_max_wait_s: float = Field(default=30.0, gt=0)
    max_batch_records: int = Field(default=5000, ge=1)
    # Path segments that make an entity root (/weddings/w1/): the unit of escalation.
    root_depth: int = Field(default=2, ge=1)
    # An item purged after an event happened (less this clock-skew margin) is not purged
    # again for that event; purge times are remembered this long.
    clock_skew_ms: int = Field(default=1000, ge=0)
    remember_purged_s: float = Field(default=300.0, ge=0)
    cloudflare: CloudflarePolicy = Field(default_factory=CloudflarePolicy)
    cloudfront: CloudFrontPolicy = Field(default_factory=CloudFrontPolicy)
    http_purge: HttpPurgePolicy = Field(default_factory=HttpPurgePolicy)
    warm: WarmPolicy = Field(default_factory=WarmPolicy)


class PurgeTemplate(_Strict):
    keys: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    urls: list[str] = Field(default_factory=list)
    prefixes: list[str] = Field(default_factory=list)

    def templates(self) -> list[str]:
        return [*self.keys, *self.tags, *self.urls, *self.prefixes]


class WarmTemplate(_Strict):
    photos: list[str] = Field(default_factory=list)
    vendor_assets: list[str] = Field(default_factory=list)
    guest_portal: list[str] = Field(default_factory=list)
    priority: int = Field(default=5, ge=0, le=9)
    deadline_s: int = Field(default=300, ge=1)

    def templates(self) -> list[str]:
        return [*self.photos, *self.vendor_assets, *self.guest_portal]


class Rule(_Strict):
    entity: str
    scope: Literal["wedding", "vendor", "photo", "portal", "vendor_api"]
    purge: PurgeTemplate = Field(default_factory=PurgeTemplate)
    per_wedding: PurgeTemplate | None = None
    warm: WarmTemplate | None = None
    fanout: Fanout | None = None
    index: IndexAction | None = None

    @model_validator(mode="after")
    def _per_wedding_needs_fanout(self) -> Rule:
        if self.per_wedding is not None and self.fanout is None:
            raise ValueError("per_wedding needs fanout: vendor_weddings")
        return self


class VendorApiPolicy(_Strict):
    """How the vendor API cache calls and caches one external integration (`vendor_apis.<api>`).

    Freshness is the vendor's `Cache-Control` when `trust_cache_control` (capped by
    `max_ttl_s`), else `ttl_s`. Past freshness an entry is served while it is refreshed
    in the background for `stale_while_revalidate_s`, and, when the vendor errs or times
    out, for up to `max_stale_s` (stale-if-error). Redis drops it after the longer of the two.
    """

    base_url: str
    ttl_s: int = Field(default=300, ge=0)
    max_ttl_s: int = Field(default=86_400, ge=0)
    stale_while_revalidate_s: int = Field(default=60, ge=0)
    max_stale_s: int = Field(default=3_600, ge=0)
    trust_cache_control: bool = True
    connect_timeout_s: float = Field(default=2.0, gt=0)
    read_timeout_s: float = Field(default=5.0, gt=0)
    total_timeout_s: float = Field(default=8.0, gt=0)
    max_body_bytes: int = Field(default=1_000_000, ge=1)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")


class Topology(_Strict):
    topics: Topics
    regions: dict[str, RegionSpec] = Field(min_length=1)
    default_region: str
    rules: dict[str, Rule]
    vendor_apis: dict[str, VendorApiPolicy] = Field(default_factory=dict)
    cdn: CdnPolicy = Field(default_factory=CdnPolicy)
    # Event types the platform publishes that deliberately cause no cache work. Any
    # other event type in schemas/ without a rule is reported by `topology check`.
    ignored_events: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_checks(self) -> Topology:
        if self.default_region not in self.regions:
            raise ValueError(f"default_region {self.default_region!r} is not a declared region")
        seen: dict[str, str] = {}
        for region, spec in self.regions.items():
            for country in spec.countries:
                if country in seen:
                    raise ValueError(f"country {country} is in both {seen[country]} and {region}")
                seen[country] = region
        return self

    # -- derived views -------------------------------------------------------
    def commands_topic(self, region: str, prefix: str = "") -> str:
        return prefix + self.topics.commands.name.format(region=region)

    def content_topic_for(self, event_type: str) -> ContentTopic:
        for topic in self.topics.content:
            if event_type in topic.events:
                return topic
        raise KeyError(event_type)

    def region_of_country(self, country: str) -> str | None:
        for region, spec in self.regions.items():
            if country.upper() in spec.countries:
                return region
        return None


class TopologyError(ValueError):
    """The topology file is unreadable or invalid; `problems` lists each one."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


def load_topology(
    path: Path | str | None = None, *, known_events: dict[str, frozenset[str]] | None = None
) -> Topology:
    """Load and validate a topology file.

    `known_events` maps each event type to its schema's field names; when given,
    every rule must name a known event and every template only its fields.
    """
    path = Path(path or os.environ.get("CACHESYNC_TOPOLOGY") or DEFAULT_TOPOLOGY)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TopologyError(path, [f"cannot read: {exc.strerror}"]) from exc
    except yaml.YAMLError as exc:
        raise TopologyError(path, [f"not valid YAML: {exc}"]) from exc
    try:
        topology = Topology.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise TopologyError(path, problems) from None
    problems = check_rules(topology, known_events) if known_events is not None else []
    if problems:
        raise TopologyError(path, problems)
    return topology


def unhandled_events(topology: Topology, known_events: Iterable[str]) -> list[str]:
    """Event types with a schema but neither a rule nor a place in `ignored_events`: the
    mapper drops them (and counts them), which is a mistake unless someone said so."""
    return sorted(set(known_events) - set(topology.rules) - set(topology.ignored_events))


def check_rules(topology: Topology, known_events: dict[str, frozenset[str]]) -> list[str]:
    """Rules against schemas: unknown events, templates naming absent fields, unrouted events."""
    problems: list[str] = []
    routed = {e for t in topology.topics.content for e in t.events}
    for event in sorted(routed - set(known_events)):
        problems.append(f"topics.content: event {event!r} has no schema in schemas/")
    for event in topology.ignored_events:
        if event not in known_events:
            problems.append(f"ignored_events: no schema for event type {event!r}")
        elif event in topology.rules:
            problems.append(f"ignored_events: {event!r} has a rule; ignore it or map it, not both")
    for event_type, rule in topology.rules.items():
        where = f"rules.{event_type}"
        if event_type not in known_events:
            problems.append(f"{where}: no schema for event type {event_type!r}")
            continue
        if event_type not in routed:
            problems.append(f"{where}: event is not on any content topic")
        available = set(known_events[event_type])
        if rule.fanout == "vendor_weddings":
            available.add("wedding_id")
        groups: list[tuple[str, list[str], set[str]]] = [
            ("entity", [rule.entity], set(known_events[event_type])),
        ]
        for section in ("keys", "tags", "urls", "prefixes"):
            groups.append(
                (f"purge.{section}", getattr(rule.purge, section), set(known_events[event_type]))
            )
            if rule.per_wedding is not None:
                groups.append(
                    (f"per_wedding.{section}", getattr(rule.per_wedding, section), available)
                )
        if rule.warm is not None:
            for section in ("photos", "vendor_assets", "guest_portal"):
                groups.append((f"warm.{section}", getattr(rule.warm, section), available))
        for section, templates, fields in groups:
            for i, template in enumerate(templates):
                try:
                    names = fields_of(template)
                except ValueError as exc:
                    problems.append(f"{where}.{section}[{i}]: {exc}")
                    continue
                for name in names:
                    if name not in fields:
                        problems.append(
                            f"{where}.{section}[{i}]: {template!r} references {name!r}, "
                            f"which {event_type} does not have"
                        )
    return problems
