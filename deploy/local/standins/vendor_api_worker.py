"""One process of the cross-process coalescing test: its own client, its own Redis connections.

    python -m deploy.local.standins.vendor_api_worker REDIS_URL BASE_URL VENDOR PATH CONCURRENCY BARRIER

Signals readiness by INCR `BARRIER:ready`, waits until `BARRIER:go` exists, fires
CONCURRENCY concurrent GETs for the same entry, and prints one JSON line: how many
answers had each cache status and how many were coalesced.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

from redis.asyncio import Redis

from cachesync.consumers.vendor_api import VendorApiClient
from cachesync.topology import VendorApiPolicy


async def main(
    redis_url: str, base_url: str, vendor: str, path: str, concurrency: int, barrier: str
) -> None:
    policy = VendorApiPolicy(base_url=base_url, ttl_s=60, total_timeout_s=10)
    redis = Redis.from_url(redis_url)
    async with VendorApiClient({"availability": policy}, redis_url) as client:
        await redis.incr(f"{barrier}:ready")
        for _ in range(2000):
            if await redis.exists(f"{barrier}:go"):
                break
            await asyncio.sleep(0.01)
        else:
            raise SystemExit("no go signal within 20 s")
        answers = await asyncio.gather(
            *(client.get("availability", path, vendor_id=vendor) for _ in range(concurrency))
        )
    await redis.aclose()
    print(
        json.dumps(
            {
                "statuses": Counter(a.cache_status for a in answers),
                "coalesced": sum(a.coalesced for a in answers),
                "bodies": sorted({a.content.decode() for a in answers}),
            }
        )
    )


if __name__ == "__main__":
    url, base, vendor_id, api_path, n, key = sys.argv[1:7]
    asyncio.run(main(url, base, vendor_id, api_path, int(n), key))
