"""The declarative topology: topics, regions, and the rules that turn events into cache work."""

from cachesync.topology.model import (
    DEFAULT_TOPOLOGY,
    ContentTopic,
    PurgeTemplate,
    RegionSpec,
    Rule,
    TopicSpec,
    Topology,
    TopologyError,
    VendorApiPolicy,
    WarmTemplate,
    load_topology,
    unhandled_events,
)
from cachesync.topology.templates import MissingField, render, render_all

__all__ = [
    "DEFAULT_TOPOLOGY",
    "ContentTopic",
    "MissingField",
    "PurgeTemplate",
    "RegionSpec",
    "Rule",
    "TopicSpec",
    "Topology",
    "TopologyError",
    "VendorApiPolicy",
    "WarmTemplate",
    "load_topology",
    "render",
    "render_all",
    "unhandled_events",
]
