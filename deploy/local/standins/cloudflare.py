"""A Cloudflare purge_cache API stub that keeps the real contract, for tests and benchmarks.

`POST /client/v4/zones/{zone}/purge_cache` with exactly one of `files`, `tags`,
`hosts`, `prefixes` or `purge_everything`; at most `max_items` items; a bearer token
(403 otherwise); a token bucket per zone answering 429 with Retry-After; faults
injected on demand (`fail_next`). Answers in Cloudflare's envelope
`{"success", "errors": [{"code", "message"}], "messages", "result"}` and records
every call, so tests can count them.

The token can be revoked and restored while it runs, as an operator rotating it would
(`revoke`, `restore`, `rotate`; over HTTP for a stub in another process, such as the
local stack's: `POST /_stub/token/revoke?status=401`, `POST /_stub/token/restore`,
`POST /_stub/token/rotate` with `{"token": ...}`). While revoked, every purge is
answered 403 (or 401) with code 10000 "Authentication error", as the API does. `GET
/_stub/purged?kind=tags&zone=Z` lists what was accepted: the ledger a test or a fault
run checks against.

It is also an edge (`cloudflare_edge.py`): given an `origin_url` and the zones' public hosts
(`zone_hosts`), it serves GETs for those hosts from a cache that the accepted purges drop,
and `POST /client/v4/graphql` answers the Analytics query for requests by cache status
from what it served.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deploy.local.standins.cloudflare_edge import CloudflareEdge

PURGE_TYPES = ("files", "tags", "hosts", "prefixes", "purge_everything")


@dataclass
class StubCall:
    zone: str
    kind: str | None
    items: list[str]
    status: int
    at: float


@dataclass
class _Bucket:
    rate: float
    burst: float
    tokens: float
    updated: float = field(default_factory=time.monotonic)

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class CloudflareStub:
    def __init__(
        self,
        *,
        token: str = "test-token",
        zones: set[str] | None = None,
        max_items: int = 100,
        rate_per_s: float = 1000.0,
        burst: int = 1000,
        origin_url: str | None = None,
        zone_hosts: dict[str, str] | None = None,
    ) -> None:
        self.token = token
        self.zones = zones  # None: any zone exists
        self.max_items = max_items
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.calls: list[StubCall] = []
        self.fail_next: list[int] = []  # statuses to answer before anything else, in order
        self.revoked: int | None = None  # the status every purge gets while the token is revoked
        self._buckets: dict[str, _Bucket] = {}
        self.edge = CloudflareEdge(origin_url, dict(zone_hosts or {}))
        self.app = Starlette(
            routes=[
                Route("/client/v4/zones/{zone}/purge_cache", self.purge, methods=["POST"]),
                Route("/client/v4/graphql", self._graphql_route, methods=["POST"]),
                Route("/_stub/token/{action}", self._token_route, methods=["POST"]),
                Route("/_stub/purged", self._purged_route, methods=["GET"]),
                # Anything else is a guest's GET for a zone's public host: the edge.
                Route("/{path:path}", self.edge.serve, methods=["GET", "HEAD"]),
            ]
        )

    # -- the token, as an operator rotates it ------------------------------------
    def revoke(self, status: int = 403) -> None:
        """From now on the token is refused (`status` 403 or 401, code 10000)."""
        if status not in (401, 403):
            raise ValueError(f"a revoked token is answered 401 or 403, not {status}")
        self.revoked = status

    def restore(self) -> None:
        """The token is accepted again."""
        self.revoked = None

    def rotate(self, token: str) -> None:
        """A new token replaces the old one, which is refused from now on."""
        self.token = token
        self.revoked = None

    def set_rate(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s, self.burst = rate_per_s, burst
        self._buckets.clear()

    # -- what tests read -------------------------------------------------------
    def applied(self, zone: str | None = None) -> list[StubCall]:
        return [c for c in self.calls if c.status == 200 and (zone is None or c.zone == zone)]

    def purged(self, kind: str, zone: str | None = None) -> set[str]:
        return {i for c in self.applied(zone) if c.kind == kind for i in c.items}

    def count(self, status: int, zone: str | None = None) -> int:
        return sum(1 for c in self.calls if c.status == status and (zone is None or c.zone == zone))

    async def _token_route(self, request: Request) -> JSONResponse:
        action = request.path_params["action"]
        if action == "revoke":
            try:
                self.revoke(int(request.query_params.get("status", "403")))
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        elif action == "restore":
            self.restore()
        elif action == "rotate":
            body = await request.json()
            token = body.get("token") if isinstance(body, dict) else None
            if not isinstance(token, str) or not token:
                return JSONResponse({"error": 'rotate takes {"token": "..."}'}, status_code=400)
            self.rotate(token)
        else:
            return JSONResponse({"error": f"no token action {action!r}"}, status_code=404)
        return JSONResponse({"revoked": self.revoked})

    async def _purged_route(self, request: Request) -> JSONResponse:
        kind = request.query_params.get("kind", "")
        if kind not in PURGE_TYPES:
            return JSONResponse({"error": f"kind is one of {', '.join(PURGE_TYPES)}"}, 400)
        zone = request.query_params.get("zone")
        return JSONResponse({"kind": kind, "items": sorted(self.purged(kind, zone))})

    async def _graphql_route(self, request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {self.token}" or self.revoked:
            return JSONResponse(
                {"data": None, "errors": [{"message": "Authentication error"}]}, 403
            )
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"data": None, "errors": [{"message": "not a JSON object"}]}, 400)
        return await self.edge.analytics(body)

    # -- the API ---------------------------------------------------------------
    async def purge(self, request: Request) -> JSONResponse:
        zone = request.path_params["zone"]
        kind: str | None = None
        items: list[str] = []

        def answer(status: int, code: int = 0, message: str = "", **headers: str) -> JSONResponse:
            self.calls.append(StubCall(zone, kind, items, status, time.monotonic()))
            if status == 200:
                body = {
                    "success": True,
                    "errors": [],
                    "messages": [],
                    "result": {"id": uuid.uuid4().hex},
                }
            else:
                body = {
                    "success": False,
                    "errors": [{"code": code, "message": message}],
                    "messages": [],
                    "result": None,
                }
            return JSONResponse(body, status_code=status, headers=headers)

        if request.headers.get("authorization") != f"Bearer {self.token}" or self.revoked:
            return answer(self.revoked or 403, 10000, "Authentication error")
        if self.zones is not None and zone not in self.zones:
            return answer(
                404,
                7003,
                "Could not route to /zones/..., perhaps your object identifier is invalid?",
            )
        if self.fail_next:
            status = self.fail_next.pop(0)
            return answer(status, 10001, f"injected fault {status}")
        bucket = self._buckets.setdefault(
            zone, _Bucket(self.rate_per_s, self.burst, float(self.burst))
        )
        wait = bucket.take()
        if wait > 0:
            return answer(
                429,
                971,
                "Please wait and consider throttling your request speed",
                **{"Retry-After": str(max(1, math.ceil(wait)))},
            )
        try:
            body: Any = await request.json()
        except ValueError:
            return answer(400, 1012, "Request body is not valid JSON")
        if not isinstance(body, dict):
            return answer(400, 1012, "Request body must be an object")
        present = [k for k in PURGE_TYPES if k in body]
        if len(present) != 1 or set(body) - set(PURGE_TYPES):
            return answer(
                400,
                1012,
                'Request must contain exactly one of "purge_everything", "files", "tags", "hosts" or "prefixes"',
            )
        kind = present[0]
        if kind == "purge_everything":
            if body[kind] is not True:
                return answer(400, 1012, "purge_everything must be true")
            self.edge.purge(zone, kind, ())
            return answer(200)
        values = body[kind]
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) and v for v in values)
        ):
            return answer(400, 1012, f"{kind} must be a non-empty list of strings")
        items = list(values)
        if len(items) > self.max_items:
            return answer(
                400, 1015, f"Too many {kind} in one request: {len(items)} > {self.max_items}"
            )
        if kind == "files" and not all(v.startswith(("http://", "https://")) for v in items):
            return answer(400, 1016, "files must be absolute URLs")
        if kind == "prefixes" and any("://" in v or v.startswith("/") for v in items):
            return answer(400, 1018, "prefixes must be host/path without a scheme")
        if kind == "tags" and any(len(v) > 1024 or " " in v for v in items):
            return answer(400, 1019, "tags must be at most 1024 characters, without spaces")
        self.edge.purge(zone, kind, items)
        return answer(200)
