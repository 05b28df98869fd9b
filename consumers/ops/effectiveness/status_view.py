"""The hit ratios `cachesync status` shows, read on demand from each tier's own counters.

Redis and Varnish are read as totals: between two refreshes the table shows the interval's
hit ratio (on the first, the ratio since the tier started). Cloudflare and CloudWatch are
asked for the last `RANGED_WINDOW_S` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence

from rich.table import Table

from cachesync.consumers.errors import ConfigError
from cachesync.consumers.ops.effectiveness.config import load_effectiveness_settings
from cachesync.consumers.ops.effectiveness.tiers import (
    TIERS,
    CloudflareAnalytics,
    CloudFrontMetrics,
    Reading,
    Targets,
    read_redis,
    read_varnish,
)
from cachesync.consumers.settings import Settings

RANGED_WINDOW_S = 300
READ_TIMEOUT_S = 5.0


async def read_tiers(settings: Settings) -> list[Reading]:
    """Every (region, tier) reading; a tier that does not answer in time is an error row."""
    try:
        eff = load_effectiveness_settings()
        targets = Targets.from_settings(settings, eff)
    except ConfigError as exc:
        return [Reading("-", "-", "-", error=str(exc))]
    now = time.time() * 1000
    since = now - RANGED_WINDOW_S * 1000
    cloudflare = CloudflareAnalytics.from_settings(settings) if targets.cloudflare else None
    cloudfront = CloudFrontMetrics.from_settings(settings, eff) if targets.cloudfront else None
    reads: list[tuple[str, str, str, Awaitable[Reading]]] = []
    reads += [(r, "redis", u, read_redis(r, u)) for r, u in sorted(targets.redis.items())]
    reads += [(r, "varnish", n, read_varnish(r, n)) for r, n in sorted(targets.varnish.items())]
    if cloudflare is not None:
        reads += [
            (r, "cloudflare", z, cloudflare.read(r, z, since, now))
            for r, z in sorted(targets.cloudflare.items())
        ]
    if cloudfront is not None:
        reads += [
            (r, "cloudfront", d, cloudfront.read(r, d, since, now))
            for r, d in sorted(targets.cloudfront.items())
        ]

    async def bounded(region: str, tier: str, instance: str, read: Awaitable[Reading]) -> Reading:
        try:
            return await asyncio.wait_for(read, timeout=READ_TIMEOUT_S)
        except TimeoutError:
            return Reading(region, tier, instance, error=f"no answer in {READ_TIMEOUT_S:g} s")

    try:
        return list(await asyncio.gather(*(bounded(*r) for r in reads)))
    finally:
        if cloudflare is not None:
            await cloudflare.aclose()
        if cloudfront is not None:
            await cloudfront.aclose()


def hit_ratio_table(cur: Sequence[Reading], prev: Sequence[Reading] | None) -> Table:
    """One row per region, a column per tier: hit ratio and lookups."""
    table = Table(title="hit ratio per region and tier (each tier's own counters)", expand=True)
    table.add_column("region")
    tiers = [t for t in TIERS if any(r.tier == t for r in cur)]
    for tier in tiers:
        table.add_column(tier)
    before = {(r.region, r.tier): r for r in prev or ()}
    by_region: dict[str, dict[str, str]] = {}
    for r in cur:
        by_region.setdefault(r.region, {})[r.tier] = _cell(r, before.get((r.region, r.tier)))
    for region, cells in sorted(by_region.items()):
        table.add_row(region, *(cells.get(t, "") for t in tiers))
    return table


def _cell(cur: Reading, prev: Reading | None) -> str:
    if cur.error is not None:
        return f"[red]unreadable[/red] [dim]{cur.error[:60]}[/dim]"
    hits, misses = cur.hits, cur.misses
    span = "since start" if cur.cumulative else f"last {RANGED_WINDOW_S // 60} min"
    if (
        cur.cumulative
        and prev is not None
        and prev.error is None
        and cur.hits >= prev.hits
        and cur.misses >= prev.misses
    ):
        hits, misses = cur.hits - prev.hits, cur.misses - prev.misses
        span = "since refresh"
    if hits + misses <= 0:
        return f"[dim]idle ({span})[/dim]"
    return f"{hits / (hits + misses):.1%} of {hits + misses:,.0f} ({span})"
