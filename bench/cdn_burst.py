"""CDN burst benchmark: 10,000 events touching 500 weddings through the whole pipeline.

Real Kafka, Redis and Varnish from the local stack; the Cloudflare API stub (whose
zones allow fewer calls per second than the sinks' configured plan, so 429s happen)
and moto for CloudFront. Prints, per provider and region: API calls against the
minimum the providers' batch limits allow for the distinct items of the burst, 429s
seen, the collateral (pages of the origin that what the provider received purges and
no command asked for), the items escalated and the limit that forced it, whether every
purge was applied (each expected item covered by what the provider received), and the
purge latency from event time to the provider's acknowledgement (p50/p99). No
pass/fail: it prints figures.

The origin's pages are those of `--catalog` weddings (each: its pages, gallery,
vendors, three albums, ten photos, its guest portal and one portal page), of which the
burst touches `--weddings`, chosen at random: collateral is counted against all of them,
as a purge wider than asked would drop the untouched weddings' pages too.

    .venv/bin/python -m bench.cdn_burst [--events 10000] [--weddings 500] [--catalog 2000]
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import aioboto3
import typer
from pydantic import SecretStr

from bench.common import (
    REPO,
    first_line,
    measured_commit,
    one_command_app,
    percentile,
    stack_env,
)
from cachesync.consumers.commands import command_id
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.pipeline.roles import Role, SinkRole, run_roles
from cachesync.consumers.settings import Settings, load_settings
from cachesync.consumers.sinks.base import Sink
from cachesync.consumers.sinks.cdn import CdnPurgeSink
from cachesync.consumers.sinks.cloudflare import CloudflareSink
from cachesync.consumers.sinks.cloudfront import CloudFrontSink
from cachesync.consumers.sinks.http_purge import HttpPurgeSink
from cachesync.consumers.sinks.ledger import PurgeAck
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.topology import render_all
from cachesync.topology.admin import apply_topics, delete_topics
from cachesync.topology.model import CdnPolicy, CloudflarePolicy, Topology
from deploy.local.standins.aws import create_distribution, moto_server
from deploy.local.standins.cloudflare import CloudflareStub
from deploy.local.standins.origin import surrogate_keys
from deploy.local.standins.serve import serve

TOKEN = "bench-token"
PUBLIC = "https://{region}.weddings.example"
PROVIDERS = ("cloudflare", "cloudfront", "http_purge")
MIX = {
    "photo.uploaded": 45,
    "photo.updated": 25,
    "album.published": 5,
    "guest_portal.updated": 15,
    "wedding.updated": 10,
}

Events = list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Options:
    events: int
    weddings: int
    catalog: int
    window_ms: int
    plan_rate: float  # the sinks' configured Cloudflare rate, per zone
    zone_rate: float  # what the stub's zones allow
    timeout: float


def catalog_weddings(run: str, n: int) -> list[str]:
    return [f"w{run}-{i:04d}" for i in range(n)]


def make_events(weddings: list[str], n: int, touched: int, seed: int = 7) -> Events:
    """`n` events on `touched` of `weddings`, chosen at random (so untouched weddings sit
    between them, as they would on the platform)."""
    rng = random.Random(seed)
    burst = rng.sample(weddings, touched)
    out: Events = []
    for _ in range(n):
        event_type = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        w = rng.choice(burst)
        album = f"a-{w}-{rng.randrange(3)}"
        photo = f"p-{w}-{rng.randrange(10)}"
        path = f"/weddings/{w}/photos/{photo}.jpg"
        fields: dict[str, Any]
        if event_type == "photo.uploaded":
            fields = dict(
                wedding_id=w,
                photo_id=photo,
                album_id=album,
                path=path,
                content_type="image/jpeg",
                size_bytes=2_000_000,
            )
        elif event_type == "photo.updated":
            fields = dict(
                wedding_id=w, photo_id=photo, album_id=album, path=path, changed_fields=["caption"]
            )
        elif event_type == "album.published":
            fields = dict(wedding_id=w, album_id=album, photo_ids=[photo])
        elif event_type == "guest_portal.updated":
            fields = dict(wedding_id=w, portal_id=f"portal-{w}", pages=["schedule"])
        else:
            fields = dict(
                wedding_id=w,
                destination_country="IT",
                guest_countries=["IT", "GB"],
                changed_fields=["venue"],
            )
        out.append((event_type, new_event(event_type, **fields)))
    return out


def origin_pages(weddings: list[str]) -> list[str]:
    """Every page the origin serves for these weddings, sorted (prefixes find theirs by
    bisection): what the rules name, per wedding, as make_events makes its ids."""
    pages: list[str] = []
    for w in weddings:
        pages += [f"/weddings/{w}", f"/weddings/{w}/gallery", f"/weddings/{w}/vendors"]
        pages += [f"/weddings/{w}/albums/a-{w}-{k}" for k in range(3)]
        pages += [f"/weddings/{w}/photos/p-{w}-{k}.jpg" for k in range(10)]
        pages += [f"/w/{w}", f"/w/{w}/schedule"]
    return sorted(pages)


@dataclass(frozen=True)
class Catalog:
    """The origin's pages, and the surrogate keys (cache tags) each carries."""

    pages: list[str]
    tagged: dict[str, set[str]]  # tag -> pages

    @classmethod
    def of(cls, weddings: list[str]) -> Catalog:
        pages = origin_pages(weddings)
        tagged: dict[str, set[str]] = defaultdict(set)
        for page in pages:
            for tag in surrogate_keys(page):
                tagged[tag].add(page)
        return cls(pages, dict(tagged))

    def covered(
        self, *, urls: Set[str], prefixes: Set[str], tags: Set[str] = frozenset()
    ) -> set[str]:
        """The pages these items purge: a URL itself, everything under a prefix (or
        wildcard), every page carrying a tag."""
        out = {u for u in urls if self._has(u)}
        for prefix in prefixes:
            i = bisect.bisect_left(self.pages, prefix)
            while i < len(self.pages) and self.pages[i].startswith(prefix):
                out.add(self.pages[i])
                i += 1
        for tag in tags:
            out |= self.tagged.get(tag, set())
        return out

    def _has(self, page: str) -> bool:
        i = bisect.bisect_left(self.pages, page)
        return i < len(self.pages) and self.pages[i] == page


def expected_items(topology: Topology, events: Events) -> dict[str, set[str]]:
    """What the rules say the burst must purge, rendered independently of the sinks."""
    items: dict[str, set[str]] = defaultdict(set)
    for event_type, record in events:
        rule = topology.rules[event_type]
        for kind in ("tags", "urls", "prefixes"):
            items[kind].update(render_all(getattr(rule.purge, kind), record))
    return items


def covered_by(item: str, exact: set[str], prefixes: set[str]) -> bool:
    return item in exact or any(item.startswith(p) for p in prefixes)


def minimal(items: dict[str, set[str]]) -> dict[str, set[str]]:
    """Distinct items after dropping those under a purged prefix: what a perfect purger sends."""
    prefixes = {
        p
        for p in items["prefixes"]
        if not any(p != q and p.startswith(q) for q in items["prefixes"])
    }
    urls = {u for u in items["urls"] if not any(u.startswith(p) for p in prefixes)}
    return {"tags": set(items["tags"]), "urls": urls, "prefixes": prefixes}


async def invalidation_paths(endpoint: str, distribution: str) -> list[list[str]]:
    session = aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    out: list[list[str]] = []
    async with session.client("cloudfront", endpoint_url=endpoint) as client:
        listed = await client.list_invalidations(DistributionId=distribution, MaxItems="1000")
        for item in listed["InvalidationList"].get("Items", []):
            got = await client.get_invalidation(DistributionId=distribution, Id=item["Id"])
            out.append(list(got["Invalidation"]["InvalidationBatch"]["Paths"].get("Items", [])))
    return out


class Acks:
    """What the providers acknowledged, as the sinks report it (their `on_ack` hook)."""

    def __init__(self) -> None:
        self.commands: dict[tuple[str, str], set[str]] = defaultdict(set)  # (provider, region)
        self.latencies: dict[str, list[float]] = defaultdict(list)  # provider -> ms

    def __call__(self, ack: PurgeAck) -> None:
        for cid, occurred in ack.commands:
            self.commands[(ack.provider, ack.region)].add(cid)
            self.latencies[ack.provider].append(ack.acked_at_ms - occurred)


@dataclass
class Burst:
    """One run: where its stand-ins listen, its sinks, what they must and did acknowledge."""

    options: Options
    run: str
    settings: Settings
    policy: CdnPolicy
    stub: CloudflareStub
    cloudflare_url: str
    moto_url: str
    distributions: dict[str, str]  # region -> CloudFront distribution id
    acks: Acks
    catalog: Catalog

    @property
    def regions(self) -> list[str]:
        return list(self.settings.topology.regions)

    def zone(self, region: str) -> str:
        return f"zone-{region}-{self.run}"


def _sinks(burst: Burst) -> list[Sink]:
    """Per region: the Redis sink, then Cloudflare, CloudFront and HTTP purge (the local edge)."""
    settings, policy, acks = burst.settings, burst.policy, burst.acks
    edge = settings.region_edge_urls.get("eu-west") or "http://127.0.0.1:16081"
    sinks: list[Sink] = []
    for region in burst.regions:
        redis_url = settings.region_redis_urls[region]
        sinks.append(RedisSink(region, redis_url))
        sinks.append(
            CloudflareSink(
                region,
                zone=burst.zone(region),
                token=SecretStr(TOKEN),
                public_url=PUBLIC.format(region=region),
                redis=redis_url,
                policy=policy,
                api_url=burst.cloudflare_url,
                on_ack=acks,
            )
        )
        sinks.append(
            CloudFrontSink(
                region,
                distribution=burst.distributions[region],
                redis=redis_url,
                policy=policy,
                endpoint_url=burst.moto_url,
                aws_access_key_id=SecretStr("testing"),
                aws_secret_access_key=SecretStr("testing"),
                on_ack=acks,
            )
        )
        sinks.append(
            HttpPurgeSink(region, edge_url=edge, redis=redis_url, policy=policy, on_ack=acks)
        )
    return sinks


class MapperProcess:
    """The mapper in its own process, as in production: sharing this event loop with
    twelve sinks would make it, not the CDNs, the bottleneck being measured."""

    def __init__(self, settings: Settings) -> None:
        env = {
            **os.environ,
            "CACHESYNC_TOPIC_PREFIX": settings.topic_prefix,
            "CACHESYNC_GROUP_PREFIX": settings.group_prefix,
            "CACHESYNC_METRICS_PORT": "0",  # no /metrics server: the port may be taken
        }
        log_dir = Path(os.environ.get("CACHESYNC_STACK_DIR", REPO / ".stack")) / "log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "bench-cdn-burst-mapper.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in wait)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cachesync.consumers", "run", "mapper"],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._stopping = False

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"the mapper exited ({self.proc.returncode}): see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM once: the mapper drains its batch and exits (a second one would abort it)."""
        if not self._stopping and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self._stopping = True

    def wait(self) -> None:
        try:
            self.proc.wait(timeout=60)
        finally:
            self._log.close()


@contextmanager
def mapper_process(settings: Settings) -> Iterator[MapperProcess]:
    mapper = MapperProcess(settings)
    try:
        yield mapper
    finally:
        mapper.stop()
        mapper.wait()


async def _start_sinks(
    settings: Settings, sinks: list[Sink], stop: asyncio.Event
) -> asyncio.Task[None]:
    """Every sink's role, started and holding its partitions (from the end: `latest`)."""
    roles: list[Role] = [SinkRole(settings, s, auto_offset_reset="latest") for s in sinks]
    task = asyncio.create_task(run_roles(roles, stop))
    while not all(r.consumer.assignment() for r in roles):
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    for r in roles:
        for tp in r.consumer.assignment():
            await r.consumer.position(tp)
    return task


async def _publish(settings: Settings, events: Events) -> None:
    publisher = EventPublisher(settings)
    await publisher.start()
    for event_type, record in events:
        await publisher.publish(event_type, record, wait=False)
    await publisher.flush()
    await publisher.stop()


def _wanted(events: Events, regions: list[str]) -> dict[str, set[str]]:
    """Per region, the id of every purge command the burst must have acknowledged."""
    return {
        region: {command_id(str(rec["event_id"]), region, "purge") for _, rec in events}
        for region in regions
    }


async def _until_acknowledged(
    burst: Burst, want: dict[str, set[str]], mapper: MapperProcess
) -> None:
    """Until every provider acknowledged every purge in every region, or the timeout."""
    deadline = time.monotonic() + burst.options.timeout
    while time.monotonic() < deadline:
        mapper.check()
        if all(want[r] <= burst.acks.commands[(p, r)] for p in PROVIDERS for r in burst.regions):
            break
        await asyncio.sleep(0.25)


# -- the report -------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One provider in one region: calls against the minimum, the collateral, the
    escalations by cause, and whether all was applied."""

    provider: str
    region: str
    calls: int
    minimum: int
    throttled: int | str  # 429 answers, "-" where the provider has none
    acked: int
    wanted: int
    verdict: str
    collateral: int | str = "-"  # pages purged beyond those commanded; "-": not observable
    escalated: str = "none"  # items escalated, by the limit that forced it

    def line(self) -> str:
        return (
            f"{self.provider:<11} {self.region:<13} {self.calls:>6} {self.minimum:>8} "
            f"{self.calls / self.minimum:>6.2f} {self.throttled:>5} {self.collateral:>10} "
            f"{self.acked:>5}/{self.wanted:<6} {self.verdict:>11}  {self.escalated}"
        )


# What forced an escalation (budget.Escalation.reason), as the table says it.
CAUSES = {
    "per_root": "policy (escalate_urls_over)",
    "max_items": "cost budget (max_paths_per_flush)",
    "max_prefixes": "provider limit (wildcards in progress)",
    "max_requests": "cost budget (max_requests_per_flush)",
}


def _escalated(sinks: list[Sink], kind: type[Sink], region: str) -> str:
    counts: Counter[str] = Counter()
    for sink in sinks:
        if isinstance(sink, kind) and isinstance(sink, CdnPurgeSink) and sink.region == region:
            counts.update(sink.escalations)
    return ", ".join(f"{n} items: {CAUSES.get(r, r)}" for r, n in sorted(counts.items())) or "none"


def _commanded(catalog: Catalog, items: dict[str, set[str]], *, tags: bool) -> set[str]:
    return catalog.covered(
        urls=items["urls"], prefixes=items["prefixes"], tags=items["tags"] if tags else set()
    )


def _cloudflare_rows(
    burst: Burst,
    sinks: list[Sink],
    items: dict[str, set[str]],
    best: dict[str, set[str]],
    want: dict[str, set[str]],
) -> list[Row]:
    stub = burst.stub
    commanded = _commanded(burst.catalog, items, tags=True)
    rows = []
    for region in burst.regions:
        zone = burst.zone(region)
        calls = len(stub.applied(zone))
        minimum = sum(math.ceil(len(best[k]) / 100) for k in ("tags", "urls", "prefixes"))
        host = PUBLIC.format(region=region).split("://", 1)[1]
        files = {f[len(PUBLIC.format(region=region)) :] for f in stub.purged("files", zone)}
        prefixes = {p[len(host) :] for p in stub.purged("prefixes", zone)}
        if stub.purged("hosts", zone):
            prefixes.add("/")
        ok = (
            items["tags"] <= stub.purged("tags", zone)
            and all(covered_by(u, files, prefixes) for u in items["urls"])
            and all(covered_by(p, set(), prefixes) for p in items["prefixes"])
        )
        got = len(want[region] & burst.acks.commands[("cloudflare", region)])
        verdict = "yes" if ok else "NO"
        purged = burst.catalog.covered(
            urls=files,
            prefixes=prefixes,
            tags=stub.purged("tags", zone),
        )
        rows.append(
            Row(
                "cloudflare",
                region,
                calls,
                minimum,
                stub.count(429, zone),
                got,
                len(want[region]),
                verdict,
                collateral=len(purged - commanded),
                escalated=_escalated(sinks, CloudflareSink, region),
            )
        )
    return rows


async def _cloudfront_rows(
    burst: Burst,
    sinks: list[Sink],
    items: dict[str, set[str]],
    best: dict[str, set[str]],
    want: dict[str, set[str]],
) -> list[Row]:
    commanded = _commanded(burst.catalog, items, tags=False)
    rows = []
    for region in burst.regions:
        batches = await invalidation_paths(burst.moto_url, burst.distributions[region])
        paths = [p for b in batches for p in b]
        exact = {p for p in paths if not p.endswith("*")}
        wild = {p[:-1] for p in paths if p.endswith("*")}
        distinct = len(best["urls"]) + len(best["prefixes"])
        minimum = max(1, math.ceil(distinct / burst.policy.cloudfront.max_paths_in_progress))
        ok = all(covered_by(u, exact, wild) for u in items["urls"]) and all(
            covered_by(p, set(), wild) for p in items["prefixes"]
        )
        got = len(want[region] & burst.acks.commands[("cloudfront", region)])
        verdict = "yes" if ok else "NO"
        purged = burst.catalog.covered(urls=exact, prefixes=wild)
        rows.append(
            Row(
                "cloudfront",
                region,
                len(batches),
                minimum,
                0,
                got,
                len(want[region]),
                verdict,
                collateral=len(purged - commanded),
                escalated=_escalated(sinks, CloudFrontSink, region),
            )
        )
    return rows


def _http_purge_rows(
    burst: Burst, sinks: list[Sink], best: dict[str, set[str]], want: dict[str, set[str]]
) -> list[Row]:
    # One PURGE per URL or prefix; xkeys go 256 to a call.
    minimum = len(best["urls"]) + len(best["prefixes"]) + math.ceil(len(best["tags"]) / 256)
    rows = []
    for sink in sinks:
        if isinstance(sink, HttpPurgeSink):
            wanted = len(want[sink.region])
            got = len(want[sink.region] & burst.acks.commands[("http_purge", sink.region)])
            verdict = "acked" if got == wanted else "NO"
            # Varnish keeps no ledger to read back; the sink escalates nothing (no limits).
            rows.append(
                Row(
                    "http_purge",
                    sink.region,
                    sink.calls,
                    minimum,
                    "-",
                    got,
                    wanted,
                    verdict,
                    escalated=_escalated(sinks, HttpPurgeSink, sink.region),
                )
            )
    return rows


def _header(
    burst: Burst,
    events: Events,
    items: dict[str, set[str]],
    best: dict[str, set[str]],
    published_s: float,
    done_s: float,
) -> list[str]:
    opts, policy = burst.options, burst.policy
    weddings = {rec["wedding_id"] for _, rec in events}
    cf = policy.cloudfront
    no_collateral = max(
        math.ceil((len(best["urls"]) + len(best["prefixes"])) / cf.max_paths_in_progress),
        math.ceil(len(best["prefixes"]) / cf.max_wildcards_in_progress),
    )
    return [
        f"cdn_burst: {len(events)} events, {len(weddings)} weddings of {opts.catalog} "
        f"({len(burst.catalog.pages):,} origin pages), {len(burst.regions)} regions",
        f"  published in {published_s:.1f}s; every provider acknowledged every purge after {done_s:.1f}s",
        f"  adaptive coalescing: at once when the budget allows, within {policy.window_ms} ms "
        f"(CloudFront {cf.window_ms} ms, {cf.rate_per_s:g} calls/s); a burst (over "
        f"{policy.burst_records_per_s:g} commands/s) gathers until it pauses; Cloudflare plan "
        f"{opts.plan_rate:g} req/s per zone, stub zones allow {opts.zone_rate:g} req/s (so 429s happen)",
        f"  distinct items: {len(items['tags'])} tags, {len(items['urls'])} URLs, {len(items['prefixes'])} prefixes "
        f"({len(best['urls'])} URLs not under a purged prefix)",
        f"  CloudFront without collateral would need {no_collateral} invalidations per distribution: "
        f"{len(best['prefixes'])} prefixes, {cf.max_wildcards_in_progress} wildcards in progress",
        "",
        "calls: purge calls the provider applied (429 answers counted apart); minimum: the fewest",
        "calls the batch limits allow for the burst's distinct items (100 per Cloudflare call, one",
        "kind per call; 3,000 paths per CloudFront invalidation; one PURGE per URL, 256 xkeys per call)",
        "collateral: origin pages that what the provider received purges and no command asked for",
        "(Varnish keeps no ledger: not observable there); escalated: items replaced by a wider one, by cause",
        "",
        f"{'provider':<11} {'region':<13} {'calls':>6} {'minimum':>8} {'ratio':>6} {'429s':>5} "
        f"{'collateral':>10} {'acked':>12} {'all applied':>11}  escalated",
    ]


def _totals(rows: list[Row]) -> list[str]:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in rows:
        totals[row.provider][0] += row.calls
        totals[row.provider][1] += row.minimum
        totals[row.provider][2] += row.collateral if isinstance(row.collateral, int) else 0
    return [
        f"total {provider:<11} {calls:>6} calls, minimum {minimum:>6}: "
        f"{(calls / minimum - 1) * 100:+.1f}% over the minimum; collateral {collateral} pages"
        for provider, (calls, minimum, collateral) in totals.items()
    ]


def _wildcards(sinks: list[Sink]) -> str:
    escalated = [
        e
        for s in sinks
        if isinstance(s, CloudFrontSink)
        for rec in s.invalidations
        for e in rec.paths
        if e.endswith("*")
    ]
    sizes = {
        s.region: [len(r.paths) for r in s.invalidations if not r.deduplicated]
        for s in sinks
        if isinstance(s, CloudFrontSink)
    }
    shown = sorted(set(escalated))
    more = f" and {len(shown) - 20} more" if len(shown) > 20 else ""
    return (
        f"CloudFront invalidations, paths in each: {sizes}\n"
        f"CloudFront wildcards used (escalations to fit 15 wildcards in progress): {shown[:20]}{more}"
    )


def _latencies(acks: Acks) -> list[str]:
    lines = ["purge latency, event time -> provider acknowledgement (ms):"]
    for provider in PROVIDERS:
        values = acks.latencies[provider]
        lines.append(
            f"  {provider:<11} n={len(values):>6}  p50={percentile(values, 0.5):>8.0f}  "
            f"p99={percentile(values, 0.99):>8.0f}  max={max(values) if values else float('nan'):>8.0f}  "
            f"mean={statistics.fmean(values) if values else float('nan'):>8.0f}"
        )
    return lines


async def report(
    burst: Burst,
    sinks: list[Sink],
    events: Events,
    want: dict[str, set[str]],
    published_s: float,
    done_s: float,
) -> str:
    """The figures, while the stand-ins still run (CloudFront's are read back from moto)."""
    items = expected_items(burst.settings.topology, events)
    best = minimal(items)
    rows = [
        *_cloudflare_rows(burst, sinks, items, best, want),
        *await _cloudfront_rows(burst, sinks, items, best, want),
        *_http_purge_rows(burst, sinks, best, want),
    ]
    lines = [
        *_header(burst, events, items, best, published_s, done_s),
        *(row.line() for row in rows),
        "",
        *_totals(rows),
        _wildcards(sinks),
        "",
        *_latencies(burst.acks),
    ]
    return "\n".join(lines)


# -- the run ----------------------------------------------------------------------


async def run_burst(opts: Options) -> str:
    stack_env()
    run = uuid.uuid4().hex[:8]
    settings = load_settings(topic_prefix=f"bench-{run}.", group_prefix=f"bench-{run}")
    await apply_topics(settings.kafka_bootstrap_servers, settings.topology, settings.topic_prefix)
    try:
        return await _run_burst(opts, run, settings)
    finally:
        with contextlib.suppress(Exception):
            await delete_topics(settings.kafka_bootstrap_servers, settings.topic_prefix)


async def _run_burst(opts: Options, run: str, settings: Settings) -> str:
    policy = CdnPolicy(
        window_ms=opts.window_ms,
        max_batch_records=20_000,
        cloudflare=CloudflarePolicy(rate_per_s=opts.plan_rate, burst=10),
    )
    stub = CloudflareStub(token=TOKEN, rate_per_s=opts.zone_rate, burst=5)
    with serve(stub.app) as cf_url, moto_server() as moto_url:
        distributions = {
            r: create_distribution(moto_url, comment=f"bench {r}")
            for r in settings.topology.regions
        }
        weddings = catalog_weddings(run, opts.catalog)
        burst = Burst(
            opts,
            run,
            settings,
            policy,
            stub,
            cf_url,
            moto_url,
            distributions,
            Acks(),
            Catalog.of(weddings),
        )
        sinks = _sinks(burst)
        with mapper_process(settings) as mapper:
            stop = asyncio.Event()
            task = await _start_sinks(settings, sinks, stop)
            events = make_events(weddings, opts.events, opts.weddings)
            t0 = time.monotonic()
            await _publish(settings, events)
            published_s = time.monotonic() - t0
            want = _wanted(events, burst.regions)
            await _until_acknowledged(burst, want, mapper)
            done_s = time.monotonic() - t0
            stop.set()
            mapper.stop()
            await asyncio.wait_for(task, timeout=60)
        return await report(burst, sinks, events, want, published_s, done_s)


app = one_command_app()


@app.command(help=first_line(__doc__))
def main(
    events: int = 10_000,
    weddings: int = 500,
    catalog: Annotated[int, typer.Option(help="weddings the origin serves")] = 2_000,
    window_ms: int = 2000,
    plan_rate: Annotated[float, typer.Option(help="the sinks' configured rate")] = 10.0,
    zone_rate: Annotated[float, typer.Option(help="what the stub zones allow")] = 4.0,
    timeout: float = 300.0,
) -> None:
    opts = Options(
        events, weddings, max(catalog, weddings), window_ms, plan_rate, zone_rate, timeout
    )
    measured = measured_commit()
    print(f"commit {measured}\n{asyncio.run(run_burst(opts))}")


if __name__ == "__main__":
    app()
