"""HTTP purge at edge speed (issue 14): the HTTP-purge sink and the warmer on one core, against the real Varnish.

    .venv/bin/python -m bench.http_purge run [--smoke] [--reps N]   # this part alone, JSON to a temp file
    .venv/bin/python -m bench                                      # part of the whole run (`make bench`)

1. The HTTP-purge sink in its role (`SinkRole`: consume, decode, tier order, the flush:
   ledger, budget plan, edge requests, audit records, commit), pinned to one core, over
   `urls` one-URL purge commands after `warmup`: URLs/s and CPU us per URL (the process's
   CPU time over the window). The rate is given on one free core, the window's wall time
   less the time the process waited for a CPU (/proc/self/schedstat: the machine's other
   work takes turns on the pinned core), and as measured. Once with the region's edge in xkey mode (URLs as keys,
   many per request), once in plain mode (a PURGE per URL). Each command carries a W3C
   trace context, one in `SAMPLED_EVERY` sampled (the platform's decision), so sampled
   commands get their spans and the others none, as in production. The Redis tier has
   applied every event beforehand (its markers are written), so no batch waits for it.
   A sample of the URLs is cached in Varnish first and must be fetched again afterwards
   (asked of Varnish: `X-Varnish` with one transaction id), or the run fails.
2. Next to each, the ceiling: a bare asyncio loop (streams, no client library) sending the
   very requests the sink sends for the same URLs (the same keys in the same xkey-purge
   requests of at most max_keys_per_request keys and max_header_bytes, cut at the sink's
   flush size; or one PURGE per URL), pipelined as deep over as many persistent
   connections, pinned to the same core.
3. The warmer in its role over `warms` one-URL warm commands, its pages cached (a HIT
   needs one GET): fetches/s and CPU us per URL; its ceiling, bare GETs of the same URLs
   over the same number of persistent connections.
4. The reference: Wikimedia's purged (Go, librdkafka) on the same Varnish and Kafka, from
   issue 14's table, quoted as measured elsewhere on this machine's kind, not re-measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import bench_settings, one_command_app, stack_env
from bench.worker import Window

if TYPE_CHECKING:
    from cachesync.consumers.pipeline.roles import SinkRole
    from cachesync.consumers.settings import Settings

REGION = "eu-west"
# One command in this many is in a sampled trace (its traceparent's flag says so).
SAMPLED_EVERY = 100
# Issue 14's figure for Wikimedia's purged with its defaults (two tiers: 2 PURGEs per URL).
REFERENCE = {
    "what": "Wikimedia purged (Go, librdkafka), defaults",
    "urls_per_s": 9_731,
    "cpu_us_per_url": 66,
    "source": "issue 14: measured elsewhere on this machine's kind, not re-measured here",
}
TARGET_URLS_PER_S = 10_000
TARGET_CPU_US = 100


@dataclass(frozen=True)
class Sizes:
    urls: int  # measured one-URL purges
    warmup: int  # purges before the window (the window's end has TAIL more behind it)
    cached: int  # of them cached in Varnish first, checked fetched again after
    warm_pages: int  # distinct pages the warms fetch (cached first)
    warms: int  # measured one-URL warms
    warm_warmup: int


FULL = Sizes(
    urls=100_000, warmup=5_000, cached=1_000, warm_pages=2_000, warms=20_000, warm_warmup=1_000
)
# The smoke run's counts span at least two of the sink's flushes (at most max_batch_records,
# 5,000, each): a window inside one flush cannot be timed.
SMOKE = Sizes(urls=6_000, warmup=1_000, cached=50, warm_pages=100, warms=1_000, warm_warmup=200)


# Commands behind the measured ones, so that the window's last flush fills up at once
# (max_batch_records) instead of waiting out its coalescing window (window_ms).
TAIL = 5_000


def _page(tag: str, i: int) -> str:
    """The i-th purged URL of a run: a wedding's photo page, 20 photos per wedding."""
    return f"/weddings/{tag}-w{i // 20:05d}/photos/ph{i:06d}"


# -- the measured processes ----------------------------------------------------------


def _emit(tag: str, payload: Any = None) -> None:
    sys.stdout.write(tag if payload is None else f"{tag} {json.dumps(payload)}")
    sys.stdout.write("\n")
    sys.stdout.flush()


def _runqueue_s() -> float:
    """How long this process has waited, runnable, for a CPU (Linux's /proc/self/schedstat:
    time on a CPU, time waiting on the run queue, timeslices; in ns)."""
    with open("/proc/self/schedstat") as stat:
        return int(stat.read().split()[1]) / 1e9


def _time_batches(role: SinkRole, window: Window) -> list[float]:
    """Count each batch the role handles into `window` (its effect applied); the
    run-queue waits where the window starts and ends go to the list returned."""
    waits: list[float] = []

    def committed(count: int) -> None:
        started, ended = window.started, window.ended
        window.add(count)
        if (started is None and window.started) or (ended is None and window.ended):
            waits.append(_runqueue_s())

    role.loop.on_handled = committed
    return waits


async def _run_role(role: SinkRole, warmup: int, count: int, limit_s: float) -> dict[str, Any]:
    """Run one sink role until it committed warmup + count records; its window's figures."""
    import signal

    from cachesync.consumers.pipeline.assemble import tune_gc
    from cachesync.consumers.pipeline.roles import run_roles

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    window = Window(warmup, count, stop)
    waits = _time_batches(role, window)
    tune_gc()  # as `cachesync run` does
    task = asyncio.create_task(run_roles([role], stop))
    for _ in range(600):
        if task.done():
            task.result()
        if role.consumer.assignment():
            break
        await asyncio.sleep(0.05)
    _emit("READY")
    deadline = loop.time() + limit_s
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if loop.time() > deadline:
            stop.set()
    task.result()
    out = window.result()
    if "rate" in out and len(waits) == 2:
        # On a machine shared with other work the rate is also the neighbours'; less the
        # time the process waited for a CPU, it is what one free core would do.
        out["runqueue_s"] = waits[1] - waits[0]
        out["free_core_rate"] = out["records"] / (out["seconds"] - out["runqueue_s"])
    return {"window": out, "applied": role.stats.applied}


async def sink_worker(prefix: str, mode: str, warmup: int, count: int, limit_s: float) -> Any:
    """The HTTP-purge sink in its role, its edge in `mode` (xkey or purge)."""
    from cachesync.consumers.pipeline.roles import SinkRole
    from cachesync.consumers.sinks.http_purge import HttpPurgeSink
    from cachesync.consumers.telemetry import setup_telemetry

    settings = bench_settings(prefix)
    setup_telemetry("cachesync-bench", metrics_port=None)
    sink = HttpPurgeSink(
        REGION,
        edge_url=settings.region_edge_urls[REGION],
        redis=settings.region_redis_urls[REGION],
        policy=settings.topology.cdn,
        edge_purge=mode,  # type: ignore[arg-type]
    )
    out = await _run_role(SinkRole(settings, sink), warmup, count, limit_s)
    return {**out, "requests": sink.calls}


async def warmer_worker(prefix: str, warmup: int, count: int, limit_s: float) -> Any:
    """The warmer in its role, after the region's Redis and HTTP-purge tiers."""
    from cachesync.consumers.pipeline.roles import SinkRole
    from cachesync.consumers.sinks.warmer import WarmerSink
    from cachesync.consumers.telemetry import setup_telemetry

    settings = bench_settings(prefix)
    setup_telemetry("cachesync-bench", metrics_port=None)
    sink = WarmerSink(
        REGION,
        edge_url=settings.region_edge_urls[REGION],
        redis=settings.region_redis_urls[REGION],
        after=("redis", "http_purge"),
        policy=settings.topology.cdn,
    )
    out = await _run_role(SinkRole(settings, sink), warmup, count, limit_s)
    results = list(sink.results)
    return {
        **out,
        "fetched": len(results),
        "hits": sum(r.confirmed for r in results),
    }


# -- the ceilings: bare asyncio streams ----------------------------------------------


def purge_requests(
    urls: list[str], mode: str, *, per_request: int, header_bytes: int, flush: int
) -> list[bytes]:
    """The requests the sink sends for `urls` (one-URL commands, `flush` to a flush), on the
    wire: xkey-purge requests of the URLs' keys, or a PURGE per URL."""
    from cachesync.consumers.keys import url_xkey

    host = _edge_host()
    if mode == "purge":
        return [b"PURGE %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (u.encode(), host) for u in urls]
    out: list[bytes] = []
    for start in range(0, len(urls), flush):
        chunk: list[str] = []
        size = 0
        for url in sorted(urls[start : start + flush]):
            key = url_xkey(url)
            if chunk and (len(chunk) >= per_request or size + 1 + len(key) > header_bytes):
                out.append(_xkey_request(chunk, host))
                chunk, size = [], 0
            size += len(key) + (1 if chunk else 0)
            chunk.append(key)
        if chunk:
            out.append(_xkey_request(chunk, host))
    return out


def _xkey_request(keys: list[str], host: bytes) -> bytes:
    return b"PURGE / HTTP/1.1\r\nHost: %s\r\nxkey-purge: %s\r\n\r\n" % (
        host,
        " ".join(keys).encode(),
    )


def _edge_host() -> bytes:
    from urllib.parse import urlsplit

    from cachesync.consumers.settings import load_settings

    return urlsplit(load_settings().region_edge_urls[REGION]).netloc.encode()


async def _bare_lane(
    host: str, port: int, requests: list[bytes], depth: int, statuses: list[int]
) -> None:
    """One persistent connection: `depth` requests written at a time, answers read in order."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for start in range(0, len(requests), depth):
            chunk = requests[start : start + depth]
            writer.write(b"".join(chunk))
            for _ in chunk:
                head = await reader.readuntil(b"\r\n\r\n")
                statuses.append(int(head[9:12]))
                lower = head.lower()
                at = lower.find(b"\r\ncontent-length:")
                length = int(lower[at + 17 : lower.find(b"\r\n", at + 2)]) if at >= 0 else 0
                if length:
                    await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()


async def bare_loop(requests: list[bytes], connections: int, depth: int) -> dict[str, Any]:
    """Every request over `connections` persistent connections; wall and CPU time."""
    from urllib.parse import urlsplit

    from cachesync.consumers.settings import load_settings

    edge = urlsplit(load_settings().region_edge_urls[REGION])
    host, port = edge.hostname or "127.0.0.1", edge.port or 80
    lanes = [requests[i::connections] for i in range(connections)]
    statuses: list[int] = []
    wall, cpu, queued = time.perf_counter(), time.process_time(), _runqueue_s()
    await asyncio.gather(*(_bare_lane(host, port, lane, depth, statuses) for lane in lanes if lane))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    queued = _runqueue_s() - queued
    bad = sum(s >= 400 for s in statuses)
    if bad or len(statuses) != len(requests):
        raise RuntimeError(f"bare loop: {bad} refused, {len(statuses)} of {len(requests)} answered")
    return {"seconds": wall, "cpu_s": cpu, "runqueue_s": queued, "requests": len(requests)}


async def purge_ceiling_worker(tag: str, mode: str, start: int, count: int) -> Any:
    from cachesync.consumers.settings import load_settings

    hp = load_settings().topology.cdn
    urls = [_page(tag, i) for i in range(start, start + count)]
    requests = purge_requests(
        urls,
        mode,
        per_request=hp.http_purge.max_keys_per_request,
        header_bytes=hp.http_purge.max_header_bytes,
        flush=hp.max_batch_records,
    )
    await bare_loop(requests[:16], hp.http_purge.concurrency, 64)  # connections warm, as the sink's
    _emit("READY")
    out = await bare_loop(requests, hp.http_purge.concurrency, 64)
    return {**out, "urls": count}


async def warm_ceiling_worker(tag: str, pages: int, count: int) -> Any:
    from cachesync.consumers.settings import load_settings

    w = load_settings().topology.cdn.warm
    host = _edge_host()
    urls = [_page(f"{tag}-warm", i % pages) for i in range(count)]
    requests = [
        b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: cachesync-warmer\r\n\r\n" % (u.encode(), host)
        for u in urls
    ]
    _emit("READY")
    # The warmer sends one request at a time per connection (no pipelining): depth 1.
    out = await bare_loop(requests, w.concurrency, 1)
    return {**out, "urls": count}


# -- the harness's part ---------------------------------------------------------------


async def _fill(settings: Settings, tag: str, sizes: Sizes) -> None:
    """The purge commands on the region's command topic, with their traces, and the Redis
    tier's applied markers for their events."""
    from redis.asyncio import Redis

    from cachesync.consumers import keys
    from cachesync.consumers.commands import PurgeCommand
    from cachesync.consumers.pipeline.codecs import codec_for
    from cachesync.consumers.pipeline.kafka import make_producer

    codec = codec_for(settings)
    topic = settings.commands_topic(REGION)
    now = int(time.time() * 1000)
    producer = make_producer(
        settings.kafka_bootstrap_servers, client_id="cachesync-bench-fill", linger_ms=20
    )
    redis = Redis.from_url(settings.region_redis_urls[REGION])
    await producer.start()
    try:
        pending = []
        pipe = redis.pipeline(transaction=False)
        for i in range(sizes.warmup + sizes.urls + TAIL):
            cmd = PurgeCommand(
                command_id=f"{tag}-c{i}",
                origin_event_id=f"{tag}-e{i}",
                origin_event_type="photo.updated",
                origin_occurred_at=now,
                region=REGION,
                entity=f"wedding:{tag}-w{i // 20:05d}",
                version=now + i,
                issued_at=now,
                scope="wedding",
                urls=(_page(tag, i),),
            )
            flag = "01" if i % SAMPLED_EVERY == 0 else "00"
            traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-{flag}"
            pending.append(
                await producer.send(
                    topic,
                    codec.encode(cmd.schema_type, cmd.to_record()),
                    key=cmd.entity.encode(),
                    headers=[("traceparent", traceparent.encode())],
                )
            )
            pipe.set(keys.applied_event("redis", cmd.origin_event_id), now, ex=keys.APPLIED_TTL_S)
            if len(pending) >= 5_000:
                await asyncio.gather(*pending)
                await pipe.execute()
                pending, pipe = [], redis.pipeline(transaction=False)
        await asyncio.gather(*pending)
        await pipe.execute()
    finally:
        await producer.stop()
        await redis.aclose()


async def _fill_warms(settings: Settings, tag: str, sizes: Sizes) -> None:
    """One-URL warm commands over `warm_pages` pages, their purges applied by both tiers."""
    from redis.asyncio import Redis

    from cachesync.consumers import keys
    from cachesync.consumers.commands import WarmCommand
    from cachesync.consumers.pipeline.codecs import codec_for
    from cachesync.consumers.pipeline.kafka import make_producer

    codec = codec_for(settings)
    topic = settings.commands_topic(REGION)
    now = int(time.time() * 1000)
    producer = make_producer(
        settings.kafka_bootstrap_servers, client_id="cachesync-bench-fill", linger_ms=20
    )
    redis = Redis.from_url(settings.region_redis_urls[REGION])
    await producer.start()
    try:
        pending = []
        pipe = redis.pipeline(transaction=False)
        for i in range(sizes.warm_warmup + sizes.warms + TAIL):
            page = _page(f"{tag}-warm", i % sizes.warm_pages)
            cmd = WarmCommand(
                command_id=f"{tag}-wc{i}",
                origin_event_id=f"{tag}-we{i}",
                origin_event_type="photo.updated",
                origin_occurred_at=now,
                region=REGION,
                entity=f"wedding:{tag}-warm-w{i % sizes.warm_pages // 20:05d}",
                version=now + i,
                issued_at=now,
                photo_urls=(page,),
                deadline=now + 3_600_000,
            )
            traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-00"
            pending.append(
                await producer.send(
                    topic,
                    codec.encode(cmd.schema_type, cmd.to_record()),
                    key=cmd.entity.encode(),
                    headers=[("traceparent", traceparent.encode())],
                )
            )
            for tier in ("redis", "http_purge"):
                pipe.set(keys.applied_event(tier, cmd.origin_event_id), now, ex=keys.APPLIED_TTL_S)
            if len(pending) >= 5_000:
                await asyncio.gather(*pending)
                await pipe.execute()
                pending, pipe = [], redis.pipeline(transaction=False)
        await asyncio.gather(*pending)
        await pipe.execute()
    finally:
        await producer.stop()
        await redis.aclose()


async def _cache(edge: str, paths: list[str]) -> list[str]:
    """Fetch each page through the edge until it is cached; the ones Varnish did not keep."""
    import httpx

    gate = asyncio.Semaphore(8)

    async def one(http: httpx.AsyncClient, path: str) -> bool:
        async with gate:
            await http.get(path)
            return len((await http.get(path)).headers.get("X-Varnish", "").split()) == 2

    async with httpx.AsyncClient(base_url=edge, timeout=10) as http:
        kept = await asyncio.gather(*(one(http, p) for p in paths))
    return [p for p, ok in zip(paths, kept, strict=True) if not ok]


async def _still_cached(edge: str, paths: list[str]) -> list[str]:
    """The pages Varnish still serves from its cache (asked once each)."""
    import httpx

    gate = asyncio.Semaphore(8)

    async def one(http: httpx.AsyncClient, path: str) -> bool:
        async with gate:
            return len((await http.get(path)).headers.get("X-Varnish", "").split()) == 2

    async with httpx.AsyncClient(base_url=edge, timeout=10) as http:
        hits = await asyncio.gather(*(one(http, p) for p in paths))
    return [p for p, hit in zip(paths, hits, strict=True) if hit]


async def _applied(settings: Settings, tag: str, measured: list[int], sizes: Sizes) -> list[bool]:
    """Whether the sink recorded each of these measured commands as applied (its marker)."""
    from redis.asyncio import Redis

    from cachesync.consumers import keys

    redis = Redis.from_url(settings.region_redis_urls[REGION])
    try:
        markers = await redis.mget(
            [keys.applied("http_purge", f"{tag}-c{sizes.warmup + i}") for i in measured]
        )
    finally:
        await redis.aclose()
    return [m is not None for m in markers]


def _figures(window: dict[str, Any], ceiling: dict[str, Any]) -> dict[str, float]:
    """URLs/s (as measured, and on a free core: less the waits for a CPU) and CPU per URL,
    of the role's window and of its ceiling."""
    if "free_core_rate" not in window or "cpu_us_per_record" not in window:
        raise RuntimeError(f"the window was not timed: {window}")
    return {
        "urls_per_s": window["rate"],
        "free_core_urls_per_s": window["free_core_rate"],
        "cpu_us_per_url": window["cpu_us_per_record"],
        "ceiling_urls_per_s": ceiling["urls"] / ceiling["seconds"],
        "ceiling_free_core_urls_per_s": ceiling["urls"]
        / (ceiling["seconds"] - ceiling["runqueue_s"]),
        "ceiling_cpu_us_per_url": ceiling["cpu_s"] / ceiling["urls"] * 1e6,
    }


async def bench_sink_mode(
    topics: Any, run: str, rep: int, mode: str, sizes: Sizes, cpu: int
) -> dict[str, Any]:
    """The sink in `mode` and its ceiling, on fresh commands and a fresh group."""
    from bench.harness import BenchError, run_worker

    prefix = f"bench-{run}-hp{mode[0]}{rep}"
    settings = await topics.create(prefix)
    tag = f"{run}hp{mode[0]}{rep}"
    edge = settings.region_edge_urls[REGION]
    await _fill(settings, tag, sizes)
    step = max(1, sizes.urls // sizes.cached)
    sample = [_page(tag, sizes.warmup + i) for i in range(0, sizes.urls, step)]
    evicted = await _cache(edge, sample)
    sink = await run_worker(
        f"http-purge-{mode}",
        "http-purge",
        *("--prefix", prefix, "--mode", mode, "--cpu", cpu),
        *("--warmup", sizes.warmup, "--count", sizes.urls),
        module="bench.http_purge",
    )
    # The window ends at a record count over six partitions: some measured commands may be
    # left unread (the tail's read instead). Checked are the sampled pages whose commands
    # the sink says it applied; whether each was purged, Varnish says.
    applied = await _applied(settings, tag, [i for i in range(0, sizes.urls, step)], sizes)
    checked = [p for p, done in zip(sample, applied, strict=True) if done and p not in evicted]
    if len(checked) < len(sample) // 2:
        raise BenchError(f"http_purge ({mode}): {len(checked)} of {len(sample)} sampled applied")
    left = await _still_cached(edge, checked)
    if left:
        raise BenchError(f"http_purge ({mode}) left {len(left)} sampled pages cached: {left[:3]}")
    ceiling = await run_worker(
        f"http-purge-ceiling-{mode}",
        "purge-ceiling",
        *("--tag", tag, "--mode", mode, "--cpu", cpu),
        *("--warmup", sizes.warmup, "--count", sizes.urls),
        module="bench.http_purge",
    )
    return {
        "mode": mode,
        **_figures(sink["window"], ceiling),
        "requests": sink["requests"],
        "checked_purged": len(checked),
        "ceiling_requests": ceiling["requests"],
        "sink": sink,
        "ceiling": ceiling,
    }


async def bench_warmer(topics: Any, run: str, rep: int, sizes: Sizes, cpu: int) -> dict[str, Any]:
    from bench.harness import BenchError, run_worker

    prefix = f"bench-{run}-hw{rep}"
    settings = await topics.create(prefix)
    tag = f"{run}hw{rep}"
    edge = settings.region_edge_urls[REGION]
    pages = [_page(f"{tag}-warm", i) for i in range(sizes.warm_pages)]
    if evicted := await _cache(edge, pages):
        raise BenchError(f"warmer: Varnish did not keep {len(evicted)} of {len(pages)} pages")
    await _fill_warms(settings, tag, sizes)
    warmer = await run_worker(
        "warmer",
        "warmer",
        *("--prefix", prefix, "--cpu", cpu),
        *("--warmup", sizes.warm_warmup, "--count", sizes.warms),
        module="bench.http_purge",
    )
    ceiling = await run_worker(
        "warm-ceiling",
        "warm-ceiling",
        *("--tag", tag, "--cpu", cpu, "--pages", sizes.warm_pages, "--count", sizes.warms),
        module="bench.http_purge",
    )
    return {
        **_figures(warmer["window"], ceiling),
        "hits": warmer["hits"],
        "warmer": warmer,
        "ceiling": ceiling,
    }


async def bench_http_purge(topics: Any, run: str, *, smoke: bool, reps: int) -> dict[str, Any]:
    """Every figure of this part, `reps` times each; the rows for the results table."""
    sizes = SMOKE if smoke else FULL
    cpu = max(os.sched_getaffinity(0))  # the core the harness pins "on one core" figures to
    out: dict[str, Any] = {"sizes": asdict(sizes), "reference": REFERENCE, "reps": reps}
    for mode in ("xkey", "purge"):
        runs = []
        for rep in range(reps):
            runs.append(await bench_sink_mode(topics, run, rep, mode, sizes, cpu))
            r = runs[-1]
            print(
                f"  http_purge {mode}: {r['free_core_urls_per_s']:,.0f} URLs/s on a free core "
                f"(measured {r['urls_per_s']:,.0f}), {r['cpu_us_per_url']:.1f} us CPU/URL, "
                f"{r['requests']:,} requests; ceiling {r['ceiling_free_core_urls_per_s']:,.0f}",
                flush=True,
            )
        out[mode] = runs
    out["warmer"] = []
    for rep in range(reps):
        out["warmer"].append(await bench_warmer(topics, run, rep, sizes, cpu))
        w = out["warmer"][-1]
        print(
            f"  warmer: {w['free_core_urls_per_s']:,.0f} fetches/s on a free core (measured "
            f"{w['urls_per_s']:,.0f}), {w['cpu_us_per_url']:.1f} us CPU/URL; ceiling "
            f"{w['ceiling_free_core_urls_per_s']:,.0f}/s",
            flush=True,
        )
    out["rows"] = rows(out)
    return out


# -- the rows -----------------------------------------------------------------------


def _spread(values: list[float], digits: int = 0) -> str:
    med, lo, hi = statistics.median(values), min(values), max(values)
    text = f"{med:,.{digits}f}"
    return text if lo == hi else f"{text} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def _row(
    figure: str, value: str, ceiling: str, ratio: str, target: str, met: str
) -> dict[str, str]:
    return {
        "figure": figure,
        "value": value,
        "ceiling": ceiling,
        "ratio": ratio,
        "target": target,
        "met": met,
    }


def rows(out: dict[str, Any]) -> list[dict[str, str]]:
    """The results table's rows: each mode's rate and CPU, the warmer's, the reference.

    A rate is given on one free core (the window's wall time less the time the process
    waited for a CPU, from /proc/self/schedstat), then as measured on this shared machine;
    the target is judged on the first. The ratio is the sink's to its ceiling's, both so.
    """
    n = out["sizes"]["urls"]
    table: list[dict[str, str]] = []

    def rate_cells(runs: list[dict[str, Any]]) -> tuple[list[float], str, str, str]:
        free = [r["free_core_urls_per_s"] for r in runs]
        ceiling = [r["ceiling_free_core_urls_per_s"] for r in runs]
        value = f"{_spread(free)} (measured {_spread([r['urls_per_s'] for r in runs])})"
        ceil = f"{_spread(ceiling)} (measured {_spread([r['ceiling_urls_per_s'] for r in runs])})"
        ratio = _spread([f / c for f, c in zip(free, ceiling, strict=True)], 2)
        return free, value, ceil, ratio

    for mode, how in (
        ("xkey", "URLs as xkey keys, many per request"),
        ("purge", "a PURGE per URL"),
    ):
        runs = out.get(mode, [])
        if not runs:
            continue
        free, value, ceil, ratio = rate_cells(runs)
        cpu = [r["cpu_us_per_url"] for r in runs]
        table.append(
            _row(
                f"HTTP purge sink, 1 core, {how} (URLs/s on a free core; {n:,} one-URL purges "
                f"through its role against Varnish; {runs[0]['requests']:,} requests with the "
                "warm-up's)",
                value,
                f"{ceil}: bare asyncio loop, same {runs[0]['ceiling_requests']:,} requests",
                ratio,
                f"≥ {TARGET_URLS_PER_S:,}",
                "yes" if statistics.median(free) >= TARGET_URLS_PER_S else "**no**",
            )
        )
        table.append(
            _row(
                f"HTTP purge sink CPU per URL, {how} (µs; process CPU over the same window)",
                _spread(cpu, 1),
                _spread([r["ceiling_cpu_us_per_url"] for r in runs], 1) + " (bare loop)",
                "—",
                f"≤ {TARGET_CPU_US}",
                "yes" if statistics.median(cpu) <= TARGET_CPU_US else "**no**",
            )
        )
    warmer = out.get("warmer", [])
    if warmer:
        _, value, ceil, ratio = rate_cells(warmer)
        table.append(
            _row(
                f"Warmer, 1 core (fetches/s on a free core; {out['sizes']['warms']:,} one-URL "
                "warms through its role, pages cached: one GET each)",
                value,
                f"{ceil}: bare GETs, same connections",
                ratio,
                "—",
                "—",
            )
        )
        table.append(
            _row(
                "Warmer CPU per URL (µs; process CPU over the same window)",
                _spread([w["cpu_us_per_url"] for w in warmer], 1),
                _spread([w["ceiling_cpu_us_per_url"] for w in warmer], 1) + " (bare GETs)",
                "—",
                "—",
                "—",
            )
        )
    ref = out["reference"]
    table.append(
        _row(
            f"Reference: {ref['what']} (URLs/s; µs CPU per URL) — {ref['source']}",
            f"{ref['urls_per_s']:,} URLs/s; {ref['cpu_us_per_url']} µs",
            "—",
            "—",
            "—",
            "—",
        )
    )
    return table


# -- the commands -----------------------------------------------------------------------

app = one_command_app()


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


@app.command("http-purge", help="a measured process: the HTTP-purge sink in its role")
def http_purge_cmd(
    prefix: str = "", mode: str = "xkey", cpu: int | None = None, warmup: int = 0, count: int = 0
) -> None:
    _pin(cpu)
    stack_env()
    _emit("RESULT", asyncio.run(sink_worker(prefix, mode, warmup, count, 900)))


@app.command("purge-ceiling", help="a measured process: the bare loop of the same requests")
def purge_ceiling_cmd(
    tag: str = "", mode: str = "xkey", cpu: int | None = None, warmup: int = 0, count: int = 0
) -> None:
    _pin(cpu)
    stack_env()
    _emit("RESULT", asyncio.run(purge_ceiling_worker(tag, mode, warmup, count)))


@app.command("warmer", help="a measured process: the warmer in its role")
def warmer_cmd(prefix: str = "", cpu: int | None = None, warmup: int = 0, count: int = 0) -> None:
    _pin(cpu)
    stack_env()
    _emit("RESULT", asyncio.run(warmer_worker(prefix, warmup, count, 900)))


@app.command("warm-ceiling", help="a measured process: bare GETs of the warmer's pages")
def warm_ceiling_cmd(tag: str = "", cpu: int | None = None, pages: int = 1, count: int = 0) -> None:
    _pin(cpu)
    stack_env()
    _emit("RESULT", asyncio.run(warm_ceiling_worker(tag, pages, count)))


@app.command("run", help="this part alone; its JSON goes to a temp file, not bench/results")
def run_cmd(
    smoke: Annotated[bool, typer.Option("--smoke")] = False,
    reps: Annotated[int, typer.Option()] = 1,
) -> None:
    import logging

    from bench.harness import _scenarios

    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    stack_env()

    async def go() -> dict[str, Any]:
        run = uuid.uuid4().hex[:8]
        async with _scenarios(run) as topics:
            return await bench_http_purge(topics, run, smoke=smoke, reps=reps)

    out = asyncio.run(go())
    for row in out["rows"]:
        print(" | ".join(row.values()))
    fd, path = tempfile.mkstemp(prefix="bench-http-purge-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(out, f, indent=2)
    print(f"written: {path}")


if __name__ == "__main__":
    app()
