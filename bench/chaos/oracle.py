"""The suite's oracle: what each event's purge must remove, armed in the caches and checked there.

Never the project's own reports (audit topic, metrics, the consistency checker): the
expectation comes from the topology's rules run offline on the very bytes published
(`Expectations`, the project's `Mapper` with an index of its own), and the
observation from the caches and the providers' records:

| sink | armed before the event is published | observed after |
|---|---|---|
| redis | each key it purges, and one entry under each tag it purges, SET in the region's Redis | the key is gone |
| http_purge | each URL it purges (a page under each prefix, a page carrying each surrogate key) fetched through the region's Varnish; its `X-Origin-Generation` noted | that URL now has another generation: the copy was dropped |
| cloudflare | each file, tag and prefix of the region's zone | a purge call accepted by the stand-in after the event, naming or covering it (prefix, host, everything) |
| cloudfront | each path and prefix of the region's distribution | an invalidation created in moto after the event, naming or covering it (wildcard) |

The warmer only fetches; what it must never do (bring a stale page back) is what the
http_purge row checks.

A target armed again by a later event while still pending joins the pending group: the
copy now in the cache was written before both events, and one purge after them
removes it (the purge budget's own rule, `RecentPurges`). So a lost purge shows as
a copy that survives, and is reported with the event that armed it last.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

from bench.chaos.cloudflare import ChaosCloudflare
from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.mapping.index import RelationshipIndex
from cachesync.consumers.mapping.mapper import Mapper
from cachesync.consumers.pipeline.codecs import decode_event
from cachesync.consumers.settings import Settings
from cachesync.schemas import Codec
from deploy.local.standins.origin import surrogate_keys

SINKS = ("redis", "cloudflare", "cloudfront", "http_purge")
PROBE = "chaos-probe"
REDIS_CHUNK = 2000
EXISTS_GROUP = 500  # keys per EXISTS when looking: one command says "all of these are gone"


class Expectations:
    """The purges each event must cause, by the topology's rules applied to the published bytes.

    The project's Mapper with a relationship index of its own (another database of the
    state Redis), fed the same events in the same order: computing what is expected is
    the rules' business; observing it is the caches'.
    """

    def __init__(self, settings: Settings, codec: Codec, index_url: str) -> None:
        self.settings = settings
        self.codec = codec
        self.redis = Redis.from_url(index_url)
        self.mapper = Mapper(settings.topology, RelationshipIndex(self.redis, settings.topology))

    async def purges(self, value: bytes) -> list[PurgeCommand]:
        decoded = await decode_event(self.codec, value, max_bytes=len(value) + 1)
        commands = await self.mapper.map_event(decoded.type_name, decoded.record)
        return [c for c in commands if isinstance(c, PurgeCommand)]

    async def close(self) -> None:
        await self.redis.aclose()


@dataclass(slots=True, eq=False)
class Arm:
    """One event's expectation on one target: the copy written before it must go."""

    sink: str
    region: str
    item: str
    event_id: str
    event_type: str
    occurred_s: float
    armed_at: float
    satisfied_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "sink": self.sink,
            "region": self.region,
            "item": self.item,
            "event_id": self.event_id,
            "event_type": self.event_type,
        }


@dataclass(slots=True, eq=False)
class Target:
    sink: str
    region: str
    kind: str  # redis: key | member; http_purge: page; cloudflare: files | tags | prefixes;
    # cloudfront: path | prefix
    item: str
    pending: list[Arm] = field(default_factory=list)
    generation: str | None = None  # http_purge: the copy's origin generation when armed


TargetKey = tuple[str, str, str, str]


class Edge:
    """GETs through one Varnish on a few kept-alive connections: a page's origin generation.

    A tiny HTTP/1.1 client, because the oracle fetches hundreds of pages a second on a
    two-core machine that also runs the whole pipeline. The Host header is the edge's
    address, as the http_purge sink and the warmer send it, so it is the same object.
    """

    def __init__(self, url: str, *, connections: int = 8) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.host_header = parts.netloc
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._gate = asyncio.Semaphore(connections)
        self.errors = 0

    async def generation(self, path: str) -> str | None:
        async with self._gate:
            failures = 0
            while failures < 4:
                conn = self._idle.pop() if self._idle else None
                reused = conn is not None
                try:
                    if conn is None:
                        conn = await asyncio.open_connection(self.host, self.port)
                    generation, keep = await asyncio.wait_for(self._get(conn, path), timeout=10)
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                    if conn is not None:
                        conn[1].close()
                    if reused:  # Varnish closed it while idle: the others too, likely
                        await self.close()
                        continue
                    failures += 1
                    # The origin's listen queue is short: a burst of misses gets 503s.
                    await asyncio.sleep(0.2 * failures)
                    continue
                if keep:
                    self._idle.append(conn)
                else:
                    conn[1].close()
                return generation
        self.errors += 1
        return None

    async def _get(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: str
    ) -> tuple[str | None, bool]:
        reader, writer = conn
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
            "User-Agent: cachesync-chaos\r\n\r\n".encode()
        )
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers: dict[str, str] = {}
        for line in head[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await reader.readexactly(int(headers.get("content-length", "0")))
        if status != 200:
            raise ValueError(f"HTTP {status}")
        return headers.get("x-origin-generation"), headers.get("connection") != "close"

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


def tag_probe(tag: str) -> str | None:
    """A page of the local origin that carries surrogate key `tag` and that no URL or prefix
    purge names (a query string, or a wedding no event names); None if no page carries it."""
    kind, _, rest = tag.partition(":")
    if kind == "wedding" and rest.endswith(":photos"):
        path = f"/weddings/{rest.removesuffix(':photos')}/gallery?{PROBE}"
    elif kind == "wedding" and ":" not in rest:
        path = f"/weddings/{rest}?{PROBE}"
    elif kind == "photo":
        path = f"/weddings/{PROBE}/photos/{rest}.jpg"
    elif kind == "album":
        path = f"/weddings/{PROBE}/albums/{rest}"
    elif kind == "vendor" and ":" not in rest:
        path = f"/vendors/{rest}?{PROBE}"
    else:
        return None  # portal:, vendor-api: pages are not the edge's
    return path if tag in surrogate_keys(path.split("?", 1)[0]) else None


def _redis_key(target: Target) -> str:
    return target.item if target.kind == "key" else member_key(target.item)


def member_key(tag: str) -> str:
    """The platform cache entry the suite files under `tag` (the Redis sink deletes members)."""
    return f"chaos:entry:{tag}"


class Oracle:
    def __init__(
        self,
        settings: Settings,
        *,
        redis_urls: dict[str, str],
        edge_urls: dict[str, str],
        cloudflare: ChaosCloudflare,
        cloudflare_zones: dict[str, str],
        cloudfront_endpoint: str,
        cloudfront_distributions: dict[str, str],
    ) -> None:
        self.settings = settings
        self.regions = list(redis_urls)
        self.hosts = {
            r: urlsplit(settings.topology.regions[r].public_url or "").netloc for r in self.regions
        }
        self.redis = {
            r: Redis.from_url(u, socket_timeout=3, socket_connect_timeout=2)
            for r, u in redis_urls.items()
        }
        self.edges = {r: Edge(u) for r, u in edge_urls.items()}
        self.cloudflare = cloudflare
        self.zone_region = {zone: r for r, zone in cloudflare_zones.items()}
        self.cloudfront_endpoint = cloudfront_endpoint
        self.distributions = cloudfront_distributions
        self._seen_invalidations: set[str] = set()
        self._cf_client: Any = None
        self.redis_down: set[str] = set()  # regions whose Redis the fault has taken away
        self.targets: dict[TargetKey, Target] = {}
        self.pending: dict[tuple[str, str], set[TargetKey]] = defaultdict(set)
        self.arms: list[Arm] = []
        self.unarmed: dict[str, int] = defaultdict(int)  # sink -> arms skipped (region down...)

    # -- arming ---------------------------------------------------------------
    async def arm(
        self,
        event_id: str,
        event_type: str,
        occurred_ms: int,
        purges: Sequence[PurgeCommand],
        *,
        page_sample: int | None = None,
    ) -> None:
        """Before the event is published: write and fetch what its purges must remove."""
        occurred_s = occurred_ms / 1000
        jobs = []
        for region, targets in _by_region(purges).items():
            if region not in self.redis:
                continue
            redis_items = [("key", k) for k in targets.keys] + [("member", t) for t in targets.tags]
            pages = self._pages(targets, page_sample)
            jobs.append(self._arm_redis(region, redis_items, event_id, event_type, occurred_s))
            jobs.append(self._arm_pages(region, pages, event_id, event_type, occurred_s))
            self._arm_cdn(region, targets, event_id, event_type, occurred_s)
        await asyncio.gather(*jobs)

    def _pages(self, targets: RegionTargets, sample: int | None) -> list[str]:
        pages = list(targets.urls) + [p + PROBE for p in targets.prefixes]
        pages += [probe for t in targets.tags if (probe := tag_probe(t)) is not None]
        pages = list(dict.fromkeys(pages))
        if sample is not None and len(pages) > sample:
            step = len(pages) / sample
            pages = [pages[int(i * step)] for i in range(sample)]
        return pages

    def _new_arm(
        self, target: Target, event_id: str, event_type: str, occurred_s: float, now: float
    ) -> None:
        arm = Arm(target.sink, target.region, target.item, event_id, event_type, occurred_s, now)
        target.pending.append(arm)
        self.arms.append(arm)
        self.pending[(target.sink, target.region)].add(
            (target.sink, target.region, target.kind, target.item)
        )

    def _target(self, sink: str, region: str, kind: str, item: str) -> Target:
        key = (sink, region, kind, item)
        target = self.targets.get(key)
        if target is None:
            target = self.targets[key] = Target(sink, region, kind, item)
        return target

    def _satisfy(self, target: Target, at: float, *, up_to_s: float | None = None) -> None:
        """Mark pending arms satisfied at `at`; only those whose event happened by `up_to_s`."""
        if not target.pending:
            return
        keep = []
        for arm in target.pending:
            if up_to_s is None or arm.occurred_s <= up_to_s:
                arm.satisfied_at = at
            else:
                keep.append(arm)
        target.pending = keep
        if not keep:
            self.pending[(target.sink, target.region)].discard(
                (target.sink, target.region, target.kind, target.item)
            )

    async def _arm_redis(
        self,
        region: str,
        items: list[tuple[str, str]],
        event_id: str,
        event_type: str,
        occurred_s: float,
    ) -> None:
        if region in self.redis_down:
            self.unarmed["redis"] += len(items)
            return
        redis = self.redis[region]
        for start in range(0, len(items), REDIS_CHUNK):
            chunk = items[start : start + REDIS_CHUNK]
            pipe = redis.pipeline(transaction=False)
            for kind, item in chunk:
                key = item if kind == "key" else member_key(item)
                pipe.exists(key)
                pipe.set(key, f"stale before {event_id}", ex=3600)
                if kind == "member":
                    pipe.sadd(keys.tag_index(item), key)
                    pipe.expire(keys.tag_index(item), 3600)
            try:
                results = await pipe.execute()
            except Exception:  # a Redis the fault just took away: nothing written, nothing armed
                self.unarmed["redis"] += len(chunk)
                continue
            now = time.time()
            at = 0
            for kind, item in chunk:
                existed = bool(results[at])
                at += 4 if kind == "member" else 2
                target = self._target("redis", region, kind, item)
                if not existed:
                    self._satisfy(target, now)  # gone since it was last armed: purged
                self._new_arm(target, event_id, event_type, occurred_s, now)

    async def _arm_pages(
        self, region: str, pages: list[str], event_id: str, event_type: str, occurred_s: float
    ) -> None:
        edge = self.edges[region]
        generations = await asyncio.gather(*(edge.generation(p) for p in pages))
        now = time.time()
        for page, generation in zip(pages, generations, strict=True):
            if generation is None:
                self.unarmed["http_purge"] += 1
                continue
            target = self._target("http_purge", region, "page", page)
            if target.pending and generation != target.generation:
                self._satisfy(target, now)  # another copy since it was armed: purged
            if not target.pending:
                target.generation = generation
            self._new_arm(target, event_id, event_type, occurred_s, now)

    def _arm_cdn(
        self,
        region: str,
        targets: RegionTargets,
        event_id: str,
        event_type: str,
        occurred_s: float,
    ) -> None:
        now = time.time()
        host = self.hosts[region]
        cloudflare = (
            [("files", host + u) for u in targets.urls]
            + [("tags", t) for t in targets.tags]
            + [("prefixes", host + p) for p in targets.prefixes]
        )
        for kind, item in cloudflare:
            target = self._target("cloudflare", region, kind, item)
            self._new_arm(target, event_id, event_type, occurred_s, now)
        cloudfront = [("path", u) for u in targets.urls] + [("prefix", p) for p in targets.prefixes]
        for kind, item in cloudfront:
            target = self._target("cloudfront", region, kind, item)
            self._new_arm(target, event_id, event_type, occurred_s, now)

    # -- observing --------------------------------------------------------------
    async def poll(self, *, pages: bool = True) -> None:
        """Look at every cache for the pending targets once."""
        jobs = [self._poll_redis(r) for r in self.regions if r not in self.redis_down]
        if pages:
            jobs += [self._poll_pages(r) for r in self.regions]
        jobs.append(self._poll_cloudfront())
        self._poll_cloudflare()
        await asyncio.gather(*jobs)

    async def _poll_redis(self, region: str) -> None:
        """EXISTS over many keys at once (the count): a group with none left is done in one
        command; only a group with some left is looked at key by key."""
        pending = [self.targets[k] for k in self.pending[("redis", region)]]
        redis = self.redis[region]
        groups = [pending[i : i + EXISTS_GROUP] for i in range(0, len(pending), EXISTS_GROUP)]
        try:
            counts: list[int] = []
            for start in range(0, len(groups), REDIS_CHUNK // EXISTS_GROUP):
                pipe = redis.pipeline(transaction=False)
                for group in groups[start : start + REDIS_CHUNK // EXISTS_GROUP]:
                    pipe.exists(*(_redis_key(t) for t in group))
                counts += [int(c) for c in await pipe.execute()]
            mixed = [g for g, c in zip(groups, counts, strict=True) if 0 < c < len(g)]
            now = time.time()
            for group, count in zip(groups, counts, strict=True):
                if count == 0:
                    for target in group:
                        self._satisfy(target, now)
            for group in mixed:
                pipe = redis.pipeline(transaction=False)
                for target in group:
                    pipe.exists(_redis_key(target))
                results = await pipe.execute()
                now = time.time()
                for target, exists in zip(group, results, strict=True):
                    if not exists:
                        self._satisfy(target, now)
        except Exception:  # frozen or restarting: look again next time
            return

    async def _poll_pages(self, region: str) -> None:
        pending = [self.targets[k] for k in self.pending[("http_purge", region)]]
        edge = self.edges[region]
        generations = await asyncio.gather(*(edge.generation(t.item) for t in pending))
        now = time.time()
        for target, generation in zip(pending, generations, strict=True):
            if generation is not None and generation != target.generation:
                self._satisfy(target, now)

    def _poll_cloudflare(self) -> None:
        for call in self.cloudflare.new_accepted():
            region = self.zone_region.get(call.zone)
            if region is None:
                continue
            if call.kind in ("files", "tags"):
                kind = call.kind
                for item in call.items:
                    name = _bare(item) if kind == "files" else item
                    target = self.targets.get(("cloudflare", region, kind, name))
                    if target is not None:
                        self._satisfy(target, call.at, up_to_s=call.at)
                continue
            if call.kind == "prefixes":
                covers = tuple(call.items)
            elif call.kind == "hosts":
                covers = tuple(h + "/" for h in call.items)
            elif call.kind == "purge_everything":
                covers = ("",)
            else:
                continue
            for key in list(self.pending[("cloudflare", region)]):
                target = self.targets[key]
                if (target.kind != "tags" or covers == ("",)) and target.item.startswith(covers):
                    self._satisfy(target, call.at, up_to_s=call.at)

    async def _poll_cloudfront(self) -> None:
        if not any(self.pending[("cloudfront", r)] for r in self.regions):
            return
        invalidations = await asyncio.to_thread(self._new_invalidations)
        for region, created, paths in invalidations:
            exact = [p for p in paths if not p.endswith("*")]
            wildcards = tuple(p[:-1] for p in paths if p.endswith("*"))
            for path in exact:
                target = self.targets.get(("cloudfront", region, "path", path))
                if target is not None:
                    self._satisfy(target, created, up_to_s=created)
            if wildcards:
                for key in list(self.pending[("cloudfront", region)]):
                    target = self.targets[key]
                    if target.item.startswith(wildcards):
                        self._satisfy(target, created, up_to_s=created)

    def _new_invalidations(self) -> list[tuple[str, float, list[str]]]:
        """Invalidations created in moto since the last look: (region, created, paths)."""
        if self._cf_client is None:
            import boto3

            self._cf_client = boto3.client(
                "cloudfront",
                endpoint_url=self.cloudfront_endpoint,
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
        client = self._cf_client
        out: list[tuple[str, float, list[str]]] = []
        for region, distribution in self.distributions.items():
            paginator = client.get_paginator("list_invalidations")
            for page in paginator.paginate(DistributionId=distribution):
                for summary in page["InvalidationList"].get("Items", []):
                    inv_id = summary["Id"]
                    if inv_id in self._seen_invalidations:
                        continue
                    got = client.get_invalidation(DistributionId=distribution, Id=inv_id)
                    inv = got["Invalidation"]
                    paths = list(inv["InvalidationBatch"]["Paths"].get("Items", []))
                    self._seen_invalidations.add(inv_id)
                    out.append((region, inv["CreateTime"].timestamp(), paths))
        return out

    # -- what it says -----------------------------------------------------------
    def pending_arms(self, sinks: Iterable[str] = SINKS) -> int:
        wanted = set(sinks)
        return sum(
            len(self.targets[k].pending)
            for (sink, _), ks in self.pending.items()
            if sink in wanted
            for k in ks
        )

    def pending_by_sink(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (sink, region), ks in self.pending.items():
            n = sum(len(self.targets[k].pending) for k in ks)
            if n:
                out[f"{region}/{sink}"] += n
        return dict(out)

    def forget(self) -> None:
        """Start the next fault with nothing armed (its events have ids of their own)."""
        self.targets.clear()
        self.pending.clear()
        self.arms = []
        self.unarmed.clear()

    async def close(self) -> None:
        for redis in self.redis.values():
            await redis.aclose()
        for edge in self.edges.values():
            await edge.close()


@dataclass
class RegionTargets:
    """What an event's purges name in one region (a big purge may come in several commands)."""

    keys: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)

    def count(self) -> int:
        return len(self.keys) + len(self.tags) + len(self.urls) + len(self.prefixes)


def _by_region(purges: Iterable[PurgeCommand]) -> dict[str, RegionTargets]:
    out: dict[str, RegionTargets] = {}
    for cmd in purges:
        t = out.setdefault(cmd.region, RegionTargets())
        t.keys += cmd.keys
        t.tags += cmd.tags
        t.urls += cmd.urls
        t.prefixes += cmd.prefixes
    for t in out.values():
        t.keys, t.tags = list(dict.fromkeys(t.keys)), list(dict.fromkeys(t.tags))
        t.urls, t.prefixes = list(dict.fromkeys(t.urls)), list(dict.fromkeys(t.prefixes))
    return out


def targets_per_region(purges: Iterable[PurgeCommand]) -> dict[str, int]:
    """How many keys, tags, URLs and prefixes the purges name in each region."""
    return {region: t.count() for region, t in _by_region(purges).items()}


def _bare(url: str) -> str:
    """`https://eu.weddings.example/x` -> `eu.weddings.example/x`, as the targets are kept."""
    return url.split("://", 1)[-1]
