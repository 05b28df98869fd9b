"""CDN burst benchmark: 10,000 events touching 500 weddings through the whole pipeline.

Real Kafka, Redis and Varnish from the local stack; the Cloudflare API stub (whose
zones allow fewer calls per second than the sinks' configured plan, so 429s happen)
and moto for CloudFront. Prints, per provider and region: API calls against the
minimum the providers' batch limits allow for the distinct items of the burst, 429s
seen, whether every purge was applied (each expected item covered by what the
provider received), and the purge latency from event time to the provider's
acknowledgement (p50/p99). No pass/fail: it prints figures.

    .venv/bin/python -m bench.cdn_burst [--events 10000] [--weddings 500]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydantic import SecretStr  # noqa: E402

from cachesync.consumers.commands import command_id  # noqa: E402
from cachesync.consumers.ops.publish import EventPublisher, new_event  # noqa: E402
from cachesync.consumers.pipeline.roles import SinkRole, run_roles  # noqa: E402
from cachesync.consumers.settings import load_settings, region_env_var  # noqa: E402
from cachesync.consumers.sinks.cloudflare import CloudflareSink  # noqa: E402
from cachesync.consumers.sinks.cloudfront import CloudFrontSink  # noqa: E402
from cachesync.consumers.sinks.http_purge import HttpPurgeSink  # noqa: E402
from cachesync.consumers.sinks.ledger import PurgeAck  # noqa: E402
from cachesync.consumers.sinks.redis import RedisSink  # noqa: E402
from cachesync.topology import render_all  # noqa: E402
from cachesync.topology.model import CdnPolicy, CloudflarePolicy  # noqa: E402
from tests.stubs.aws import create_distribution, moto_server  # noqa: E402
from tests.stubs.cloudflare import CloudflareStub  # noqa: E402
from tests.stubs.serve import serve  # noqa: E402

TOKEN = "bench-token"
PUBLIC = "https://{region}.weddings.example"
MIX = {
    "photo.uploaded": 45,
    "photo.updated": 25,
    "album.published": 5,
    "guest_portal.updated": 15,
    "wedding.updated": 10,
}


def stack_env() -> None:
    """Addresses of the local stack (started idempotently) unless the environment has them."""
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        subprocess.run(["bash", str(REPO / "deploy/local/up.sh")], check=True, capture_output=True)
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{os.environ.get('KAFKA_PORT', '19092')}"
    ports = {"us-east": "16379", "eu-west": "16380", "ap-southeast": "16381"}
    for region, port in ports.items():
        os.environ.setdefault(region_env_var(region), f"redis://127.0.0.1:{port}/0")
    os.environ.setdefault("CACHESYNC_STATE_REDIS_URL", "redis://127.0.0.1:16382/0")


def make_events(n: int, weddings: int, seed: int = 7) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:6]
    out = []
    for _ in range(n):
        event_type = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        w = f"w{run}-{rng.randrange(weddings):04d}"
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


def expected_items(topology: Any, events: list[tuple[str, dict[str, Any]]]) -> dict[str, set[str]]:
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


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def invalidation_paths(endpoint: str, distribution: str) -> list[list[str]]:
    import aioboto3

    session = aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    out = []
    async with session.client("cloudfront", endpoint_url=endpoint) as client:
        listed = await client.list_invalidations(DistributionId=distribution, MaxItems="1000")
        for item in listed["InvalidationList"].get("Items", []):
            got = await client.get_invalidation(DistributionId=distribution, Id=item["Id"])
            out.append(list(got["Invalidation"]["InvalidationBatch"]["Paths"].get("Items", [])))
    return out


async def main(args: argparse.Namespace) -> None:
    stack_env()
    run = uuid.uuid4().hex[:8]
    settings = load_settings(topic_prefix=f"bench-{run}.", group_prefix=f"bench-{run}")
    topology = settings.topology
    regions = list(topology.regions)
    from cachesync.topology.admin import apply_topics

    await apply_topics(settings.kafka_bootstrap_servers, topology, settings.topic_prefix)
    edge = settings.region_edge_urls.get("eu-west") or "http://127.0.0.1:16081"
    policy = CdnPolicy(
        window_ms=args.window_ms,
        max_batch_records=20_000,
        cloudflare=CloudflarePolicy(rate_per_s=args.plan_rate, burst=10),
    )
    stub = CloudflareStub(token=TOKEN, rate_per_s=args.zone_rate, burst=5)
    latencies: dict[str, list[float]] = defaultdict(list)
    acked: dict[tuple[str, str], set[str]] = defaultdict(set)

    def on_ack(ack: PurgeAck) -> None:
        for cid, occurred in ack.commands:
            acked[(ack.provider, ack.region)].add(cid)
            latencies[ack.provider].append(ack.acked_at_ms - occurred)

    with serve(stub.app) as cf_url, moto_server() as moto_url:
        distributions = {r: create_distribution(moto_url, comment=f"bench {r}") for r in regions}
        sinks: list[Any] = []
        for region in regions:
            redis_url = settings.region_redis_urls[region]
            sinks.append(RedisSink(region, redis_url))
            sinks.append(
                CloudflareSink(
                    region,
                    zone=f"zone-{region}-{run}",
                    token=SecretStr(TOKEN),
                    public_url=PUBLIC.format(region=region),
                    redis=redis_url,
                    policy=policy,
                    api_url=cf_url,
                    on_ack=on_ack,
                )
            )
            sinks.append(
                CloudFrontSink(
                    region,
                    distribution=distributions[region],
                    redis=redis_url,
                    policy=policy,
                    endpoint_url=moto_url,
                    aws_access_key_id=SecretStr("testing"),
                    aws_secret_access_key=SecretStr("testing"),
                    on_ack=on_ack,
                )
            )
            sinks.append(
                HttpPurgeSink(region, edge_url=edge, redis=redis_url, policy=policy, on_ack=on_ack)
            )
        # The mapper runs in its own process, as in production: sharing this event loop
        # with twelve sinks would make it, not the CDNs, the bottleneck being measured.
        env = {
            **os.environ,
            "CACHESYNC_TOPIC_PREFIX": settings.topic_prefix,
            "CACHESYNC_GROUP_PREFIX": settings.group_prefix,
            "CACHESYNC_METRICS_PORT": "0",  # no /metrics server: the port may be taken
        }
        log_dir = Path(os.environ.get("CACHESYNC_STACK_DIR", REPO / ".stack")) / "log"
        log_dir.mkdir(parents=True, exist_ok=True)
        mapper_log = open(log_dir / "bench-cdn-burst-mapper.log", "w")  # noqa: SIM115, ASYNC230
        mapper = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "consumers", "run", "mapper"],
            cwd=REPO,
            env=env,
            stdout=mapper_log,
            stderr=subprocess.STDOUT,
        )
        roles: list[Any] = [SinkRole(settings, s, auto_offset_reset="latest") for s in sinks]
        stop = asyncio.Event()
        task = asyncio.create_task(run_roles(roles, stop))
        while not all(r.consumer.assignment() for r in roles):
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        for r in roles:
            for tp in r.consumer.assignment():
                await r.consumer.position(tp)

        events = make_events(args.events, args.weddings)
        publisher = EventPublisher(settings)
        await publisher.start()
        t0 = time.monotonic()
        for event_type, record in events:
            await publisher.publish(event_type, record, wait=False)
        await publisher.flush()
        await publisher.stop()
        t_published = time.monotonic() - t0

        want = {
            region: {command_id(str(rec["event_id"]), region, "purge") for _, rec in events}
            for region in regions
        }
        providers = ["cloudflare", "cloudfront", "http_purge"]
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            if mapper.poll() is not None:
                raise SystemExit(f"the mapper exited ({mapper.returncode}): see {mapper_log.name}")
            if all(want[r] <= acked[(p, r)] for p in providers for r in regions):
                break
            await asyncio.sleep(0.25)
        t_done = time.monotonic() - t0
        stop.set()
        mapper.send_signal(signal.SIGTERM)
        await asyncio.wait_for(task, timeout=60)
        mapper.wait(timeout=60)

        items = expected_items(topology, events)
        best = minimal(items)
        weddings = {rec["wedding_id"] for _, rec in events}
        lines = [
            f"cdn_burst: {len(events)} events, {len(weddings)} weddings, {len(regions)} regions",
            f"  published in {t_published:.1f}s; every provider acknowledged every purge after {t_done:.1f}s",
            f"  coalescing window {policy.window_ms} ms (CloudFront {policy.cloudfront.window_ms} ms); "
            f"Cloudflare plan {args.plan_rate:g} req/s per zone, "
            f"stub zones allow {args.zone_rate:g} req/s (so 429s happen)",
            f"  distinct items: {len(items['tags'])} tags, {len(items['urls'])} URLs, {len(items['prefixes'])} prefixes "
            f"({len(best['urls'])} URLs not under a purged prefix)",
            "",
            "calls: purge calls the provider applied (429 answers counted apart); minimum: the fewest",
            "calls the batch limits allow for the burst's distinct items (100 per Cloudflare call, one",
            "kind per call; 3,000 paths per CloudFront invalidation; one PURGE per URL, 256 xkeys per call)",
            "",
            f"{'provider':<11} {'region':<13} {'calls':>6} {'minimum':>8} {'ratio':>6} {'429s':>5} "
            f"{'acked':>12} {'all applied':>11}",
        ]
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for region in regions:
            zone = f"zone-{region}-{run}"
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
            n429 = stub.count(429, zone)
            got = len(want[region] & acked[("cloudflare", region)])
            lines.append(
                f"{'cloudflare':<11} {region:<13} {calls:>6} {minimum:>8} {calls / minimum:>6.2f} {n429:>5} "
                f"{got:>5}/{len(want[region]):<6} {'yes' if ok else 'NO':>11}"
            )
            totals["cloudflare"][0] += calls
            totals["cloudflare"][1] += minimum
        for region in regions:
            batches = await invalidation_paths(moto_url, distributions[region])
            paths = [p for b in batches for p in b]
            exact = {p for p in paths if not p.endswith("*")}
            wild = {p[:-1] for p in paths if p.endswith("*")}
            distinct = len(best["urls"]) + len(best["prefixes"])
            minimum = max(1, math.ceil(distinct / policy.cloudfront.max_paths_in_progress))
            ok = all(covered_by(u, exact, wild) for u in items["urls"]) and all(
                covered_by(p, set(), wild) for p in items["prefixes"]
            )
            got = len(want[region] & acked[("cloudfront", region)])
            lines.append(
                f"{'cloudfront':<11} {region:<13} {len(batches):>6} {minimum:>8} {len(batches) / minimum:>6.2f} {0:>5} "
                f"{got:>5}/{len(want[region]):<6} {'yes' if ok else 'NO':>11}"
            )
            totals["cloudfront"][0] += len(batches)
            totals["cloudfront"][1] += minimum
        for sink in sinks:
            if isinstance(sink, HttpPurgeSink):
                minimum = (
                    len(best["urls"]) + len(best["prefixes"]) + math.ceil(len(best["tags"]) / 256)
                )
                got = len(want[sink.region] & acked[("http_purge", sink.region)])
                lines.append(
                    f"{'http_purge':<11} {sink.region:<13} {sink.calls:>6} {minimum:>8} {sink.calls / minimum:>6.2f} "
                    f"{'-':>5} {got:>5}/{len(want[sink.region]):<6} {'acked' if got == len(want[sink.region]) else 'NO':>11}"
                )
                totals["http_purge"][0] += sink.calls
                totals["http_purge"][1] += minimum
        lines.append("")
        for provider, (calls, minimum) in totals.items():
            lines.append(
                f"total {provider:<11} {calls:>6} calls, minimum {minimum:>6}: "
                f"{(calls / minimum - 1) * 100:+.1f}% over the minimum"
            )
        cloudfront = [s for s in sinks if isinstance(s, CloudFrontSink)]
        escalated = [
            e for s in cloudfront for rec in s.invalidations for e in rec.paths if e.endswith("*")
        ]
        lines.append(
            f"CloudFront wildcards used (escalations to fit 3,000 paths / 15 wildcards): {sorted(set(escalated))}"
        )
        lines.append("")
        lines.append("purge latency, event time -> provider acknowledgement (ms):")
        for provider in providers:
            values = latencies[provider]
            lines.append(
                f"  {provider:<11} n={len(values):>6}  p50={pct(values, 0.5):>8.0f}  "
                f"p99={pct(values, 0.99):>8.0f}  max={max(values) if values else float('nan'):>8.0f}  "
                f"mean={statistics.fmean(values) if values else float('nan'):>8.0f}"
            )
        print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--weddings", type=int, default=500)
    parser.add_argument("--window-ms", type=int, default=2000)
    parser.add_argument("--plan-rate", type=float, default=10.0, help="the sinks' configured rate")
    parser.add_argument("--zone-rate", type=float, default=4.0, help="what the stub zones allow")
    parser.add_argument("--timeout", type=float, default=300.0)
    asyncio.run(main(parser.parse_args()))
