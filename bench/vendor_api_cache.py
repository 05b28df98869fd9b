"""Benchmark: the vendor API cache against calling the vendor directly, under a realistic mix.

    .venv/bin/python bench/vendor_api_cache.py [--requests 6000] [--concurrency 8]

A local vendor API (the tests' stub, under uvicorn) answers in 20-50 ms with
`Cache-Control: max-age=30, stale-while-revalidate=30` and ETags. Requests pick one
of `--keys` vendor endpoints with Zipf-like popularity (s=1.1), from `--concurrency`
concurrent callers. The same request sequence runs twice: straight through httpx
(uncached), then through `VendorApiClient` on a cold cache in the us-east Redis of
the local stack (`bash deploy/local/up.sh`). The vendor runs in its own process.
Prints figures; there is no pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from itertools import accumulate
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachesync.consumers.vendor_api import VendorApiClient
from cachesync.topology import VendorApiPolicy, load_topology
from tests.stubs.serve import free_port, serve
from tests.stubs.vendor_api import Behaviour, VendorApiStub


def zipf_sequence(keys: int, n: int, s: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    cum = list(accumulate(1 / (k**s) for k in range(1, keys + 1)))
    return rng.choices(range(keys), cum_weights=cum, k=n)


async def drive(
    sequence: list[int], concurrency: int, call: Callable[[int], Awaitable[str]]
) -> tuple[list[float], dict[str, list[float]], float]:
    """Run `call` for each item from `concurrency` workers: latencies (ms), by outcome too, wall time."""
    latencies: list[float] = []
    outcomes: dict[str, list[float]] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for item in sequence:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            started = time.perf_counter()
            outcome = await call(item)
            latencies.append((time.perf_counter() - started) * 1000)
            outcomes.setdefault(outcome, []).append(latencies[-1])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, outcomes, time.perf_counter() - started


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def line(name: str, latencies: list[float], wall: float | None = None) -> str:
    rate = f"  {len(latencies) / wall:6.0f} req/s" if wall else ""
    return (
        f"{name:<24} n={len(latencies):>5}  p50={pct(latencies, 50):7.2f} ms  "
        f"p90={pct(latencies, 90):7.2f} ms  p99={pct(latencies, 99):7.2f} ms  "
        f"mean={statistics.fmean(latencies):7.2f} ms{rate}"
    )


def serve_vendor(port: int, stop: Any) -> None:
    """The vendor, in its own process so that its work does not slow the callers being timed."""
    stub = VendorApiStub(
        default=Behaviour(
            cache_control="public, max-age=30, stale-while-revalidate=30", delay_s=(0.020, 0.050)
        )
    )

    async def stats(request: Request) -> JSONResponse:
        calls = sum(stub.calls.values())
        if request.query_params.get("reset"):
            stub.calls.clear()
        return JSONResponse({"calls": calls})

    app = Starlette(routes=[Route("/__stats", stats), *stub.app().routes])
    with serve(app, port=port):
        stop.wait()


async def main(args: argparse.Namespace) -> None:
    redis_url = os.environ.get("REDIS_URL_US_EAST") or load_topology().regions["us-east"].redis_url
    assert redis_url, "no Redis URL for us-east"
    run = uuid.uuid4().hex[:6]
    sequence = zipf_sequence(args.keys, args.requests, 1.1, seed=42)
    distinct = len(set(sequence))

    def path(i: int) -> str:
        return f"/vendors/bench-{run}-{i}/availability"

    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    port = free_port()
    vendor = ctx.Process(target=serve_vendor, args=(port, stop), daemon=True)
    vendor.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base_url) as http:
            for _ in range(200):
                try:
                    await http.get("/__stats")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)

            async def upstream_calls(reset: bool = False) -> int:
                resp = await http.get("/__stats", params={"reset": "1"} if reset else {})
                return int(resp.json()["calls"])

            async def uncached(i: int) -> str:
                resp = await http.get(path(i), headers={"accept": "application/json"})
                resp.raise_for_status()
                resp.json()
                return "UPSTREAM"

            await drive(sequence[:50], 8, uncached)  # warm the connection pool
            await upstream_calls(reset=True)
            u_lat, _, u_wall = await drive(sequence, args.concurrency, uncached)
            u_calls = await upstream_calls(reset=True)

            policy = VendorApiPolicy(base_url=base_url, ttl_s=30, stale_while_revalidate_s=30)
            async with VendorApiClient({"availability": policy}, redis_url) as client:

                async def cached(i: int) -> str:
                    resp = await client.get("availability", path(i), vendor_id=f"bench-{run}-{i}")
                    resp.json()
                    return resp.cache_status + ("+coalesced" if resp.coalesced else "")

                c_lat, outcomes, c_wall = await drive(sequence, args.concurrency, cached)
                c_calls = await upstream_calls(reset=True)
                hit_lat: list[float] = []
                # A pure cache hit, one caller at a time, on the hottest key after the run.
                hot = sequence[0]
                for _ in range(500):
                    started = time.perf_counter()
                    await client.get("availability", path(hot), vendor_id=f"bench-{run}-{hot}")
                    hit_lat.append((time.perf_counter() - started) * 1000)
    finally:
        stop.set()
        vendor.join(timeout=10)

    answered_from_cache = sum(len(v) for k, v in outcomes.items() if k != "MISS")
    print("vendor API cache benchmark")
    print(
        f"mix: {args.requests} GETs over {args.keys} endpoints (Zipf s=1.1, {distinct} distinct "
        f"requested), {args.concurrency} concurrent callers; vendor latency 20-50 ms uniform, "
        "max-age=30; cold cache; Redis and vendor on loopback"
    )
    print()
    print(line("uncached (direct)", u_lat, u_wall))
    print(line("cached (all calls)", c_lat, c_wall))
    for outcome, lat in sorted(outcomes.items()):
        print(line(f"  of which {outcome}", lat))
    print(line("cached (hit, 1 caller)", hit_lat, sum(hit_lat) / 1000))
    print()
    print(
        f"hit ratio: {answered_from_cache / len(c_lat):.1%} answered without an own upstream call"
    )
    print(
        f"upstream calls: uncached {u_calls}, cached {c_calls} ({c_calls / u_calls:.1%} of uncached)"
    )
    print(
        f"speed-up: p50 x{pct(u_lat, 50) / pct(c_lat, 50):.1f}, "
        f"p99 x{pct(u_lat, 99) / pct(c_lat, 99):.1f}, throughput x{u_wall / c_wall:.1f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    asyncio.run(main(parser.parse_args()))
