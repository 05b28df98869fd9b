"""Benchmark: the vendor API cache against calling the vendor directly, under a realistic mix.

    .venv/bin/python -m bench.vendor_api_cache [--requests 6000] [--concurrency 8]

A local vendor API (the stand-in the tests use, `deploy/local/standins/vendor_api.py`,
under uvicorn) answers in 20-50 ms with `Cache-Control: max-age=30,
stale-while-revalidate=30` and ETags. Requests pick one of `--keys` vendor endpoints
with Zipf-like popularity (s=1.1), from `--concurrency` concurrent callers. The same request sequence runs twice: straight through httpx
(uncached), then through `VendorApiClient` on a cold cache in the us-east Redis of
the local stack (`bash deploy/local/up.sh`). The vendor runs in its own process.
Prints figures; there is no pass/fail.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from multiprocessing.synchronize import Event

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.common import first_line, one_command_app
from cachesync.consumers.vendor_api import VendorApiClient
from cachesync.topology import VendorApiPolicy, load_topology
from deploy.local.standins.serve import free_port, serve
from deploy.local.standins.vendor_api import Behaviour, VendorApiStub


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


def serve_vendor(port: int, stop: Event) -> None:
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


@contextmanager
def vendor_process() -> Iterator[str]:
    """The vendor (`serve_vendor`) in a process of its own; yields its base URL."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    port = free_port()
    vendor = ctx.Process(target=serve_vendor, args=(port, stop), daemon=True)
    vendor.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        vendor.join(timeout=10)


@dataclass(frozen=True)
class Endpoints:
    """The run's vendor endpoints: ids carry the run, so a run never meets another's cache."""

    run: str

    def vendor_id(self, i: int) -> str:
        return f"bench-{self.run}-{i}"

    def path(self, i: int) -> str:
        return f"/vendors/{self.vendor_id(i)}/availability"


@dataclass
class Figures:
    uncached: list[float]  # latencies (ms)
    uncached_wall: float
    uncached_calls: int  # what reached the vendor
    cached: list[float]
    cached_wall: float
    cached_calls: int
    outcomes: dict[str, list[float]]  # cached latencies by cache status
    hit: list[float]  # a pure cache hit, one caller at a time


async def _until_up(http: httpx.AsyncClient) -> None:
    for _ in range(200):
        try:
            await http.get("/__stats")
            return
        except httpx.TransportError:
            await asyncio.sleep(0.05)


async def _upstream_calls(http: httpx.AsyncClient, reset: bool = False) -> int:
    """Calls that reached the vendor (since the last reset)."""
    resp = await http.get("/__stats", params={"reset": "1"} if reset else {})
    return int(resp.json()["calls"])


async def _hits(client: VendorApiClient, endpoints: Endpoints, hot: int) -> list[float]:
    """A pure cache hit, one caller at a time, on the hottest key after the run."""
    latencies: list[float] = []
    for _ in range(500):
        started = time.perf_counter()
        await client.get("availability", endpoints.path(hot), vendor_id=endpoints.vendor_id(hot))
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def measure(
    sequence: list[int], concurrency: int, endpoints: Endpoints, base_url: str, redis_url: str
) -> Figures:
    """The same sequence straight to the vendor, then through VendorApiClient on a cold cache."""
    async with httpx.AsyncClient(base_url=base_url) as http:
        await _until_up(http)

        async def uncached(i: int) -> str:
            resp = await http.get(endpoints.path(i), headers={"accept": "application/json"})
            resp.raise_for_status()
            resp.json()
            return "UPSTREAM"

        await drive(sequence[:50], 8, uncached)  # warm the connection pool
        await _upstream_calls(http, reset=True)
        u_lat, _, u_wall = await drive(sequence, concurrency, uncached)
        u_calls = await _upstream_calls(http, reset=True)

        policy = VendorApiPolicy(base_url=base_url, ttl_s=30, stale_while_revalidate_s=30)
        async with VendorApiClient({"availability": policy}, redis_url) as client:

            async def cached(i: int) -> str:
                resp = await client.get(
                    "availability", endpoints.path(i), vendor_id=endpoints.vendor_id(i)
                )
                resp.json()
                return resp.cache_status + ("+coalesced" if resp.coalesced else "")

            c_lat, outcomes, c_wall = await drive(sequence, concurrency, cached)
            c_calls = await _upstream_calls(http, reset=True)
            hit_lat = await _hits(client, endpoints, sequence[0])
    return Figures(u_lat, u_wall, u_calls, c_lat, c_wall, c_calls, outcomes, hit_lat)


def print_figures(f: Figures, requests: int, keys: int, distinct: int, concurrency: int) -> None:
    answered_from_cache = sum(len(v) for k, v in f.outcomes.items() if k != "MISS")
    print("vendor API cache benchmark")
    print(
        f"mix: {requests} GETs over {keys} endpoints (Zipf s=1.1, {distinct} distinct "
        f"requested), {concurrency} concurrent callers; vendor latency 20-50 ms uniform, "
        "max-age=30; cold cache; Redis and vendor on loopback"
    )
    print()
    print(line("uncached (direct)", f.uncached, f.uncached_wall))
    print(line("cached (all calls)", f.cached, f.cached_wall))
    for outcome, lat in sorted(f.outcomes.items()):
        print(line(f"  of which {outcome}", lat))
    print(line("cached (hit, 1 caller)", f.hit, sum(f.hit) / 1000))
    print()
    print(
        f"hit ratio: {answered_from_cache / len(f.cached):.1%} answered without an own upstream call"
    )
    print(
        f"upstream calls: uncached {f.uncached_calls}, cached {f.cached_calls} "
        f"({f.cached_calls / f.uncached_calls:.1%} of uncached)"
    )
    print(
        f"speed-up: p50 x{pct(f.uncached, 50) / pct(f.cached, 50):.1f}, "
        f"p99 x{pct(f.uncached, 99) / pct(f.cached, 99):.1f}, "
        f"throughput x{f.uncached_wall / f.cached_wall:.1f}"
    )


app = one_command_app()


@app.command(help=first_line(__doc__))
def main(requests: int = 6000, keys: int = 2000, concurrency: int = 8) -> None:
    redis_url = os.environ.get("REDIS_URL_US_EAST") or load_topology().regions["us-east"].redis_url
    assert redis_url, "no Redis URL for us-east"
    endpoints = Endpoints(uuid.uuid4().hex[:6])
    sequence = zipf_sequence(keys, requests, 1.1, seed=42)
    with vendor_process() as base_url:
        figures = asyncio.run(measure(sequence, concurrency, endpoints, base_url, redis_url))
    print_figures(figures, requests, keys, len(set(sequence)), concurrency)


if __name__ == "__main__":
    app()
