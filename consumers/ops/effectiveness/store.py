"""What the recorder read, kept in the state Redis for the report (one stream per group prefix).

Three kinds of entries, each a JSON document:
- `sample`: each (region, tier)'s hits and misses over one interval, from its own counters;
- `requests`: per-request outcomes an edge or a Redis server reported in an interval
  (`Outcome` rows: time, resource, outcome, who asked, cache tags);
- `consistency`: the consistency checker's tallies (purges probed and converged) so far.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from cachesync.consumers import keys

# Who made a request, from its User-Agent: the warmer, another cachesync reader (the
# consistency checker's read-backs, an edge fetching from its origin), or a guest.
WARMER_AGENT = "cachesync-warmer"
INTERNAL_AGENTS = ("cachesync-", "python-httpx/", "cloudflare-standin")
# An edge's answers that went to the origin; in Redis, a key written again after a miss.
EDGE_ORIGIN = frozenset({"miss", "pass", "expired", "bypass"})
REDIS_ORIGIN = frozenset({"fill"})


def who(user_agent: str) -> str:
    if user_agent.startswith(WARMER_AGENT):
        return "warmer"
    if user_agent.startswith(INTERNAL_AGENTS):
        return "internal"
    return "guest"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request a tier answered: at (epoch ms), what (a URL path, a host+path, or a Redis
    key), how (hit, miss, pass, expired, bypass; `fill` for a Redis key written after a
    miss), by whom (guest, warmer, internal), and the cache tags the answer carried."""

    at: int
    resource: str
    outcome: str
    by: str
    tags: tuple[str, ...] = ()

    def origin(self, tier: str) -> bool:
        """Whether the request went to the origin (in Redis: the key was written again)."""
        return self.outcome in (REDIS_ORIGIN if tier == "redis" else EDGE_ORIGIN)

    def row(self) -> list[Any]:
        return [self.at, self.resource, self.outcome, self.by, " ".join(self.tags)]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Outcome:
        return cls(int(row[0]), str(row[1]), str(row[2]), str(row[3]), tuple(str(row[4]).split()))


@dataclass(frozen=True, slots=True)
class Entry:
    at: int
    kind: str
    data: dict[str, Any]


class EffectivenessStore:
    def __init__(self, redis: Redis, group_prefix: str, *, retention_s: int) -> None:
        self.redis = redis
        self.key = keys.effectiveness(group_prefix)
        self.retention_s = retention_s

    async def add(self, kind: str, data: dict[str, Any]) -> None:
        oldest = int((time.time() - self.retention_s) * 1000)
        await self.redis.xadd(
            self.key,
            {"kind": kind, "data": json.dumps(data, separators=(",", ":"))},
            minid=str(oldest),
            approximate=True,
        )

    async def read(self, since_ms: int, until_ms: int | None = None) -> list[Entry]:
        out: list[Entry] = []
        start = f"{since_ms}-0"
        end = f"{until_ms}-0" if until_ms is not None else "+"
        while True:
            page = await self.redis.xrange(self.key, min=start, max=end, count=1000) or []
            for entry_id, fields in page:
                found = {_text(k): _text(v) for k, v in (fields or {}).items()}
                out.append(
                    Entry(
                        int(_text(entry_id).split("-")[0]),
                        found.get("kind", ""),
                        json.loads(found.get("data", "{}")),
                    )
                )
            if len(page) < 1000:
                return out
            start = "(" + _text(page[-1][0])


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
