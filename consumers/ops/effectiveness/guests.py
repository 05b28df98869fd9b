"""Guests reading the demo's weddings, so the caches have real hits and misses to count.

Each page view picks a region, a wedding (a few are far more popular than the rest) and one of
its pages, and reads it the way the platform would: through the region's HTTP edge (the local
Varnish), through its Cloudflare zone (the stand-in edge, by the region's public host) where
one is configured, and from the region's Redis, read-through: a miss reads the source of
truth and writes the key back with its tags (`platform_cache`). Guests send a browser-like
User-Agent, so the edges' logs tell them from the warmer and the consistency checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachesync.consumers import telemetry
from cachesync.consumers.ops.demo import DemoWorld
from cachesync.consumers.ops.effectiveness.config import EffectivenessSettings
from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.settings import Settings

log = logging.getLogger(__name__)

GUEST_AGENT = "Mozilla/5.0 (X11; Linux x86_64) cachesync-demo-guest"


@dataclass(frozen=True, slots=True)
class Page:
    path: str
    key: str  # the platform's Redis entry behind the page
    tags: tuple[str, ...]


def pages_of(wedding: str, vendors: list[str]) -> list[Page]:
    """A wedding's pages, with the cache entry each one reads (as the demo's world caches them)."""
    pages = [
        Page(f"/w/{wedding}", f"portal:p-{wedding}", (f"portal:p-{wedding}",)),
        Page(f"/weddings/{wedding}", f"wedding:{wedding}", (f"wedding:{wedding}",)),
        Page(
            f"/weddings/{wedding}/gallery",
            f"wedding:{wedding}:gallery",
            (f"wedding:{wedding}:photos",),
        ),
        Page(f"/weddings/{wedding}/vendors", f"wedding:{wedding}:vendors", (f"wedding:{wedding}",)),
    ]
    pages += [Page(f"/vendors/{v}", f"vendor:{v}", (f"vendor:{v}",)) for v in vendors]
    return pages


@dataclass
class GuestStats:
    views: int = 0
    errors: int = 0
    redis_misses: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)


class Guests:
    """`rate` page views per second across the regions, until stopped."""

    def __init__(
        self,
        settings: Settings,
        eff: EffectivenessSettings,
        *,
        weddings: int = 20,
        rate: float = 15.0,
        seed: int | None = None,
        pages: list[list[Page]] | None = None,
        regions: list[str] | None = None,
    ) -> None:
        """`pages`: each wedding's pages, most popular first (default: the demo's weddings);
        `regions`: where guests are (default: every region)."""
        self.settings = settings
        self.rate = rate
        self.rng = random.Random(seed)
        if pages is None:
            world = DemoWorld(weddings=weddings, vendors=max(10, weddings * 2), seed=seed)
            pages = [pages_of(w.wedding_id, sorted(w.vendors)) for w in world.weddings]
        self.pages = pages
        self.regions = sorted(regions or settings.region_redis_urls)
        # Popularity: wedding i is visited in proportion to 1/(i+1).
        self.weights = [1 / (i + 1) for i in range(len(self.pages))]
        self.edges = dict(settings.region_edge_urls)
        self.cloudflare_url = eff.cloudflare_edge_url
        self.cloudflare_hosts = {
            region: urlsplit(spec.public_url).netloc
            for region, spec in settings.topology.regions.items()
            if spec.public_url and region in settings.region_cloudflare_zones
        }
        self.stats = GuestStats()

    async def run(self, stop: asyncio.Event) -> GuestStats:
        regions = self.regions
        redis = {r: Redis.from_url(self.settings.region_redis_urls[r]) for r in regions}
        http = httpx.AsyncClient(timeout=5.0, headers={"User-Agent": GUEST_AGENT})
        interval = 1.0 / self.rate if self.rate > 0 else 1.0
        next_at = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                region = self.rng.choice(regions)
                pages = self.rng.choices(self.pages, weights=self.weights)[0]
                page = self.rng.choice(pages)
                task = asyncio.create_task(self.view(region, page, http, redis[region]))
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=delay)
                else:
                    next_at = time.monotonic()  # behind: never burst to catch up
            if pending:
                await asyncio.wait(pending, timeout=10)
        finally:
            await http.aclose()
            for client in redis.values():
                await client.aclose()
        return self.stats

    async def view(self, region: str, page: Page, http: httpx.AsyncClient, redis: Redis) -> None:
        """One guest's look at one page, through each tier of the region."""
        self.stats.views += 1
        reads = [self._redis(page, redis)]
        edge = self.edges.get(region)
        if edge:
            reads.append(self._get("varnish", http, edge + page.path, None))
        host = self.cloudflare_hosts.get(region)
        if self.cloudflare_url and host:
            reads.append(self._get("cloudflare", http, self.cloudflare_url + page.path, host))
        # A guest's reads belong to no event: outside any span, each would start a trace
        # of its own (sampled as a root), a tenth of the guests' cost in `run all`.
        with telemetry.untraced():
            await asyncio.gather(*reads)

    async def _get(self, tier: str, http: httpx.AsyncClient, url: str, host: str | None) -> None:
        try:
            response = await http.get(url, headers={"Host": host} if host else None)
            response.raise_for_status()
            self.stats.by_tier[tier] = self.stats.by_tier.get(tier, 0) + 1
        except httpx.HTTPError as exc:
            self.stats.errors += 1
            log.debug("guest GET %s: %s", url, exc)

    async def _redis(self, page: Page, redis: Redis) -> None:
        try:
            if await redis.get(page.key) is None:
                self.stats.redis_misses += 1
                await cache_put(
                    redis, page.key, f"{page.path} from the source", tags=page.tags, ttl_s=600
                )
            self.stats.by_tier["redis"] = self.stats.by_tier.get("redis", 0) + 1
        except (RedisError, OSError) as exc:
            self.stats.errors += 1
            log.debug("guest read of %s: %s", page.key, exc)
