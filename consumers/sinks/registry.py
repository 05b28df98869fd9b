"""Sink kinds and their classes: building a region's sinks, and saying why one cannot be built.

Each sink class names its `kind`, builds itself (`from_settings`) and says why it
cannot run in a region (`unavailable`); this module only maps kinds to classes.
`run all` asks `unavailable` first and skips, with a note, a sink whose provider is
not configured in a region (no zone, no token, no distribution, no edge); `run sink`
builds the one it is asked for and fails with the same reason.
"""

from __future__ import annotations

from collections.abc import Iterable

from cachesync.consumers.errors import ConfigError
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.base import PurgeSink, Sink
from cachesync.consumers.sinks.cloudflare import CloudflareSink
from cachesync.consumers.sinks.cloudfront import CloudFrontSink
from cachesync.consumers.sinks.http_purge import HttpPurgeSink
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.consumers.sinks.warmer import WarmerSink

# In tier order within a region: Redis, the edges, the warmer.
SINKS: dict[str, type[Sink]] = {
    cls.kind: cls for cls in (RedisSink, CloudflareSink, CloudFrontSink, HttpPurgeSink, WarmerSink)
}
SINK_KINDS = list(SINKS)
PURGE_KINDS = [kind for kind, cls in SINKS.items() if issubclass(cls, PurgeSink)]
WARM_KINDS = [kind for kind in SINK_KINDS if kind not in PURGE_KINDS]


def unavailable(settings: Settings, region: str, kind: str) -> str | None:
    """Why `kind` cannot run in `region` with this configuration, or None when it can."""
    if region not in settings.topology.regions:
        return f"unknown region {region!r}; topology has {sorted(settings.topology.regions)}"
    cls = SINKS.get(kind)
    if cls is None:
        return f"unknown sink {kind!r}; known: {SINK_KINDS}"
    return cls.unavailable(settings, region)


def available(settings: Settings, region: str, kinds: Iterable[str]) -> list[str]:
    """The kinds among `kinds` that can run in `region`."""
    return [k for k in kinds if unavailable(settings, region, k) is None]


def build_sink(settings: Settings, region: str, kind: str) -> Sink:
    """The sink `kind` for `region`; ConfigError (naming what is missing) if it cannot run."""
    reason = unavailable(settings, region, kind)
    if reason is not None:
        raise ConfigError(f"sink {kind} in {region}: {reason}")
    sink = SINKS[kind].from_settings(settings, region)
    # A sink follows only the tiers that run here: a region without CloudFront does not
    # hold its warms for CloudFront (nor for its completed invalidations, "cloudfront:...").
    sink.after = tuple(
        t for t in sink.after if unavailable(settings, region, t.split(":")[0]) is None
    )
    return sink
