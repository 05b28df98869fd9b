"""The Cloudflare stand-in as an edge: it serves GETs from a cache in front of an origin, drops
what the purge API names, and answers the one GraphQL Analytics query cachesync asks, from the
requests it actually served.

A zone is reached by the Host of its public URL (`zone_hosts`: host -> zone), as a real zone
is. A GET is answered from the cache when a fresh copy is there (`CF-Cache-Status: HIT`),
else fetched from the origin: `MISS` (no copy) or `EXPIRED` (a stale one); a response the
origin marks `no-store` or `private` is not kept (`BYPASS`). Copies are keyed by their
public URL (`https://host/path`, what a `files` purge names) and remember their cache tags:
Cloudflare reads them from `Cache-Tag`; the local origin speaks Varnish's dialect (`xkey`),
which is read when `Cache-Tag` is absent.

`POST /client/v4/graphql` implements `viewer { zones(filter: {zoneTag}) {
httpRequestsAdaptiveGroups(limit, filter: {datetime_geq, datetime_lt, ...}, orderBy) { count
dimensions { datetime datetimeMinute cacheStatus clientRequestPath clientRequestHTTPHost
userAgent edgeResponseStatus } } } }`, grouping by the dimensions the query selects, as the
real dataset does. Cache statuses are lower case there (`hit`, `miss`, `expired`, ...).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from graphql import GraphQLError, GraphQLResolveInfo, build_schema, graphql
from graphql.language import FieldNode
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

Info = GraphQLResolveInfo[Any]  # what a resolver is given about its field
# Requests remembered for analytics; the oldest are forgotten first.
SERVED_KEPT = 1_000_000
# Hop-by-hop and per-response headers the edge does not copy from the origin.
_NOT_COPIED = {"content-length", "connection", "transfer-encoding", "date", "server"}

SCHEMA = build_schema(
    """
    type Query { viewer: Viewer }
    type Viewer { zones(filter: ZoneFilter): [Zone!]! }
    input ZoneFilter { zoneTag: String, zoneTag_in: [String!] }
    type Zone {
      zoneTag: String!
      httpRequestsAdaptiveGroups(
        limit: Int!, filter: RequestsFilter, orderBy: [String!]
      ): [RequestsGroup!]!
    }
    input RequestsFilter {
      datetime_geq: String, datetime_gt: String, datetime_lt: String, datetime_leq: String,
      cacheStatus: String, cacheStatus_in: [String!], cacheStatus_neq: String,
      clientRequestPath: String, clientRequestHTTPHost: String, userAgent: String,
      AND: [RequestsFilter!]
    }
    type RequestsGroup { count: Int!, dimensions: RequestsDimensions }
    type RequestsDimensions {
      datetime: String, datetimeMinute: String, cacheStatus: String,
      clientRequestPath: String, clientRequestHTTPHost: String, userAgent: String,
      edgeResponseStatus: Int
    }
    """
)
DIMENSIONS = (
    "datetime",
    "datetimeMinute",
    "cacheStatus",
    "clientRequestPath",
    "clientRequestHTTPHost",
    "userAgent",
    "edgeResponseStatus",
)
MAX_LIMIT = 10_000  # the dataset's own cap on groups per query


@dataclass(frozen=True, slots=True)
class Served:
    """One request the edge answered."""

    at: float  # epoch seconds
    zone: str
    host: str
    path: str
    cache_status: str  # lower case, as the analytics dataset has it
    user_agent: str
    status: int

    def dimension(self, name: str) -> str | int:
        moment = dt.datetime.fromtimestamp(self.at, dt.UTC)
        values: dict[str, str | int] = {
            "datetime": _iso(moment.replace(microsecond=0)),
            "datetimeMinute": _iso(moment.replace(second=0, microsecond=0)),
            "cacheStatus": self.cache_status,
            "clientRequestPath": self.path,
            "clientRequestHTTPHost": self.host,
            "userAgent": self.user_agent,
            "edgeResponseStatus": self.status,
        }
        return values[name]


@dataclass
class _Copy:
    status: int
    body: bytes
    headers: dict[str, str]
    tags: frozenset[str]
    stored: float
    ttl_s: float

    def fresh(self, now: float) -> bool:
        return now - self.stored < self.ttl_s


@dataclass
class CloudflareEdge:
    """The zones' caches, the origin behind them and the log of what was served."""

    origin_url: str | None = None
    zone_hosts: dict[str, str] = field(default_factory=dict)  # public host -> zone
    served: deque[Served] = field(default_factory=lambda: deque(maxlen=SERVED_KEPT))
    _copies: dict[str, dict[str, _Copy]] = field(default_factory=dict)  # zone -> url -> copy
    _http: httpx.AsyncClient | None = None

    # -- serving ---------------------------------------------------------------
    async def serve(self, request: Request) -> Response:
        host = request.headers.get("host", "").split(":")[0].lower()
        zone = self.zone_hosts.get(host)
        if zone is None or self.origin_url is None:
            return JSONResponse(
                {"error": f"no zone serves host {host!r} here (or no origin is set)"}, 404
            )
        path = request.url.path
        url = f"https://{host}{path}"
        now = time.time()
        copies = self._copies.setdefault(zone, {})
        copy = copies.get(url)
        if copy is not None and copy.fresh(now):
            status = "hit"
        else:
            fetched = await self._fetch(request, path)
            status = "expired" if copy is not None else "miss"
            if fetched.ttl_s > 0:
                copies[url] = fetched
            else:
                copies.pop(url, None)
                status = "bypass"
            copy = fetched
        agent = request.headers.get("user-agent", "")
        self.served.append(Served(now, zone, host, path, status, agent, copy.status))
        headers = dict(copy.headers)
        headers["CF-Cache-Status"] = status.upper()
        headers["Age"] = str(int(now - copy.stored))
        body = b"" if request.method == "HEAD" else copy.body
        return Response(body, status_code=copy.status, headers=headers)

    async def _fetch(self, request: Request, path: str) -> _Copy:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=str(self.origin_url), timeout=10.0)
        response = await self._http.get(path, headers={"User-Agent": "cloudflare-standin-edge"})
        headers = {k: v for k, v in response.headers.items() if k.lower() not in _NOT_COPIED}
        tags = response.headers.get("cache-tag")
        tag_set = (
            {t.strip() for t in tags.split(",")}
            if tags
            else set(response.headers.get("xkey", "").split())
        )
        return _Copy(
            response.status_code,
            response.content,
            headers,
            frozenset(t for t in tag_set if t),
            time.time(),
            _ttl(response.headers.get("cache-control", ""), response.status_code),
        )

    # -- purging ----------------------------------------------------------------
    def purge(self, zone: str, kind: str, items: Iterable[str]) -> int:
        """Drop the copies a purge of `kind` names; how many were dropped."""
        copies = self._copies.get(zone, {})
        wanted = set(items)
        if kind == "purge_everything":
            doomed = list(copies)
        elif kind == "files":
            doomed = [u for u in copies if u in wanted]
        elif kind == "tags":
            doomed = [u for u, c in copies.items() if c.tags & wanted]
        elif kind == "hosts":
            doomed = [u for u in copies if u.split("/")[2] in wanted]
        elif kind == "prefixes":
            doomed = [u for u in copies if any(u.split("://", 1)[1].startswith(p) for p in wanted)]
        else:
            doomed = []
        for url in doomed:
            del copies[url]
        return len(doomed)

    # -- analytics ----------------------------------------------------------------
    async def analytics(self, body: Mapping[str, Any]) -> JSONResponse:
        query = body.get("query")
        if not isinstance(query, str):
            return JSONResponse({"data": None, "errors": [{"message": "no query"}]}, 400)
        result = await graphql(
            SCHEMA,
            query,
            root_value={"viewer": lambda _info: {"zones": self._zones}},
            variable_values=body.get("variables") or None,
        )
        errors = [{"message": e.message, "path": e.path} for e in result.errors or ()]
        return JSONResponse({"data": result.data, "errors": errors or None})

    def _zones(self, _info: Info, filter: dict[str, Any] | None = None) -> list[Any]:
        wanted = set((filter or {}).get("zoneTag_in") or ())
        if (filter or {}).get("zoneTag"):
            wanted.add(filter["zoneTag"])  # type: ignore[index]
        zones = sorted(wanted or {s.zone for s in self.served} | set(self.zone_hosts.values()))
        return [{"zoneTag": z, "httpRequestsAdaptiveGroups": self._groups_of(z)} for z in zones]

    def _groups_of(self, zone: str) -> Any:
        def resolve(
            info: Info,
            limit: int,
            filter: dict[str, Any] | None = None,
            orderBy: list[str] | None = None,
        ) -> list[dict[str, Any]]:
            if limit > MAX_LIMIT:
                raise GraphQLError(f"limit must be at most {MAX_LIMIT}")
            chosen = _selected_dimensions(info)
            counts: Counter[tuple[Any, ...]] = Counter(
                tuple(s.dimension(d) for d in chosen)
                for s in self.served
                if s.zone == zone and _matches(s, filter or {})
            )
            groups = [
                {"count": n, "dimensions": dict(zip(chosen, key, strict=True))}
                for key, n in counts.items()
            ]
            for order in reversed(orderBy or []):
                name, _, direction = order.rpartition("_")

                def sort_key(group: dict[str, Any], name: str = name) -> Any:
                    return group["count"] if name == "count" else str(group["dimensions"][name])

                groups.sort(key=sort_key, reverse=direction.upper() == "DESC")
            return groups[:limit]

        return resolve


def _selected_dimensions(info: Info) -> tuple[str, ...]:
    """The dimensions the query asks for: what the groups are grouped by."""
    for node in info.field_nodes:
        for sel in node.selection_set.selections if node.selection_set else ():
            if isinstance(sel, FieldNode) and sel.name.value == "dimensions" and sel.selection_set:
                return tuple(
                    s.name.value
                    for s in sel.selection_set.selections
                    if isinstance(s, FieldNode) and s.name.value in DIMENSIONS
                )
    return ()


def _matches(served: Served, flt: Mapping[str, Any]) -> bool:
    for key, want in flt.items():
        if want is None:
            continue
        if key == "AND":
            if not all(_matches(served, sub) for sub in want):
                return False
            continue
        name, _, op = key.partition("_")
        value: Any
        if name == "datetime":
            value, want = served.at, _parse_time(want)
        else:
            value = served.dimension(name)
        if not _compare(value, op, want):
            return False
    return True


def _compare(value: Any, op: str, want: Any) -> bool:
    if op == "":
        return bool(value == want)
    if op == "neq":
        return bool(value != want)
    if op == "in":
        return value in want
    if op == "geq":
        return bool(value >= want)
    if op == "gt":
        return bool(value > want)
    if op == "lt":
        return bool(value < want)
    if op == "leq":
        return bool(value <= want)
    raise GraphQLError(f"unknown filter operator {op!r}")


def _parse_time(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _ttl(cache_control: str, status: int) -> float:
    """Seconds a response may be served from the edge (0: not kept)."""
    directives = {d.strip().split("=")[0].lower(): d for d in cache_control.split(",") if d.strip()}
    if status != 200 or {"no-store", "private", "no-cache"} & set(directives):
        return 0.0
    for name in ("s-maxage", "max-age"):
        if name in directives:
            try:
                return float(directives[name].split("=", 1)[1])
            except (IndexError, ValueError):
                return 0.0
    return 0.0
