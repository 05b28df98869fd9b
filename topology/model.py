"""The pydantic model of `topology.yaml`, and its loader.

Loading fails with `TopologyError`, whose message lists every problem with the
file, the rule and the field, so one `cachesync topology check` shows them all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from topology.templates import fields_of

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
    # Filled in by the CDN sinks' configuration (issue 4): zone, distribution, edge.
    cloudflare_zone: str | None = None
    cloudfront_distribution: str | None = None
    edge_url: str | None = None


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


class Topology(_Strict):
    topics: Topics
    regions: dict[str, RegionSpec] = Field(min_length=1)
    default_region: str
    rules: dict[str, Rule]

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


def check_rules(topology: Topology, known_events: dict[str, frozenset[str]]) -> list[str]:
    """Rules against schemas: unknown events, templates naming absent fields, unrouted events."""
    problems: list[str] = []
    routed = {e for t in topology.topics.content for e in t.events}
    for event in sorted(routed - set(known_events)):
        problems.append(f"topics.content: event {event!r} has no schema in schemas/")
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
