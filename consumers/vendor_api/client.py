"""A read-through client for external vendor APIs, cached in one region's Redis.

    response = await client.get("availability", f"/vendors/{vid}/slots", vendor_id=vid)
    response.json(), response.cache_status  # HIT | MISS | REVALIDATED | STALE | BYPASS

The life of an entry, per the integration's `VendorApiPolicy` and (when trusted)
the vendor's `Cache-Control` (see `cache_control.plan_storage`):

    fresh                   -> HIT, no upstream call
    stale, within SWR       -> STALE ("revalidating"), refreshed by one background call
    stale, past SWR         -> a conditional call (If-None-Match / If-Modified-Since);
                               304 refreshes the entry without a body (REVALIDATED)
    vendor errs or is slow  -> STALE ("upstream_error" / "upstream_timeout") while
                               within stale-if-error, else the error
    missing                 -> MISS

Why not cashews' `@cache.early` / `@cache.failover` decorators: they cache a function's
return value under a fixed TTL, while here freshness comes from each response, a
refresh must send the old entry's validators, and a stale answer must say that it
is stale. So the decisions are written out below, over cashews' storage and lock
(see `store.py`).

Coalescing has two levels: in a process, callers for the same entry share one task;
across processes, the task takes the entry's cashews lock in Redis, and a task that
finds it held polls Redis until the holder has stored the entry. A hundred
concurrent misses in any number of processes make one upstream call.

httpx errors become `VendorApiError`s in `_upstream`, Redis errors `CacheUnavailable`
in the store; when Redis is down, calls go straight to the vendor (BYPASS).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from urllib.parse import urlencode

import httpx

from cachesync.consumers import keys, telemetry
from cachesync.consumers.errors import (
    BadVendorResponse,
    CacheUnavailable,
    ConfigError,
    LockHeld,
    VendorApiError,
    VendorRejected,
    VendorTimeout,
    VendorUnavailable,
)
from cachesync.consumers.vendor_api.cache_control import StoragePlan, plan_storage
from cachesync.consumers.vendor_api.entry import (
    CacheStatus,
    StaleReason,
    StoredEntry,
    VendorResponse,
    kept_headers,
)
from cachesync.consumers.vendor_api.store import EntryStore
from cachesync.topology import Topology, VendorApiPolicy

log = logging.getLogger(__name__)

# The lock outlives the upstream call's own deadline by this much, so it never expires
# under a live fetch; a crashed holder's lock expires by itself.
_LOCK_MARGIN_S = 2.0
# How much longer than the holder's deadline a waiter waits for the holder's entry.
_WAIT_MARGIN_S = 1.0


@dataclass(frozen=True)
class _Call:
    api: str
    vendor_id: str
    policy: VendorApiPolicy
    url: str
    key: str
    lock_key: str
    tags: list[str]

    @property
    def attrs(self) -> dict[str, str]:
        return {"api": self.api}


@dataclass(frozen=True)
class _Upstream:
    status: int
    headers: httpx.Headers
    body: bytes


class VendorApiClient:
    """Cached GETs to the integrations declared in topology's `vendor_apis`.

    One client per process and region: it holds an httpx connection pool and the
    region's Redis connections. `transport` lets tests use `httpx.MockTransport`;
    `clock` (epoch seconds) lets them move time without sleeping.
    """

    def __init__(
        self,
        policies: Mapping[str, VendorApiPolicy],
        redis_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        poll_interval_s: float = 0.02,
    ) -> None:
        self.policies = dict(policies)
        self.store = EntryStore(redis_url)
        self._clock = clock
        self._poll_s = poll_interval_s
        self._http = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            headers={"accept": "application/json", "user-agent": "cachesync-vendor-api"},
        )
        self._inflight: dict[str, asyncio.Task[VendorResponse]] = {}

    @classmethod
    def from_topology(cls, topology: Topology, redis_url: str, **kwargs: object) -> VendorApiClient:
        return cls(topology.vendor_apis, redis_url, **kwargs)  # type: ignore[arg-type]

    async def __aenter__(self) -> VendorApiClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.drain()
        await self._http.aclose()
        await self.store.close()

    async def drain(self) -> None:
        """Wait for in-flight fetches, background refreshes included."""
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    # -- the public call -----------------------------------------------------
    def cache_key(
        self, api: str, path: str, *, vendor_id: str, params: Mapping[str, str] | None = None
    ) -> str:
        return self._call(api, path, vendor_id, None, params).key

    async def get(
        self,
        api: str,
        path: str,
        *,
        vendor_id: str,
        wedding_id: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> VendorResponse:
        """GET `path` of integration `api` for `vendor_id`, through the cache.

        Raises a `VendorApiError` when the vendor fails and no entry may stand in.
        """
        call = self._call(api, path, vendor_id, wedding_id, params)
        try:
            return await self._get(call)
        except CacheUnavailable as exc:
            telemetry.vendor_api_cache_errors.add(1, call.attrs)
            log.warning("%s; calling %s without the cache", exc, call.api)
            return await self._bypass(call)

    def _call(
        self,
        api: str,
        path: str,
        vendor_id: str,
        wedding_id: str | None,
        params: Mapping[str, str] | None,
    ) -> _Call:
        policy = self.policies.get(api)
        if policy is None:
            raise ConfigError(
                f"vendor api {api!r} is not declared in topology vendor_apis "
                f"(known: {', '.join(sorted(self.policies)) or 'none'})"
            )
        url = f"{policy.base_url}/{path.lstrip('/')}"
        if params:
            url += "?" + urlencode(sorted(params.items()))
        digest = hashlib.sha256(f"GET {url}".encode()).hexdigest()[:32]
        return _Call(
            api=api,
            vendor_id=vendor_id,
            policy=policy,
            url=url,
            key=keys.vendor_api_entry(api, vendor_id, digest),
            lock_key=keys.vendor_api_lock(api, vendor_id, digest),
            tags=keys.vendor_api_tags(api, vendor_id, wedding_id),
        )

    async def _get(self, call: _Call) -> VendorResponse:
        now = self._clock()
        entry = await self.store.get(call.key)
        if entry is not None:
            if entry.is_fresh(now):
                telemetry.vendor_api_hits.add(1, call.attrs)
                return self._respond(call, entry, "HIT", now)
            if entry.may_serve_while_revalidating(now):
                telemetry.vendor_api_stale_served.add(1, {**call.attrs, "reason": "revalidating"})
                self._start_fill(call, entry)
                return self._respond(call, entry, "STALE", now, stale_reason="revalidating")
        telemetry.vendor_api_misses.add(1, call.attrs)
        task = self._inflight.get(call.key)
        if task is not None:
            telemetry.vendor_api_coalesced.add(1, {**call.attrs, "scope": "process"})
            return _as_follower(await asyncio.shield(task))
        return await asyncio.shield(self._start_fill(call, entry))

    # -- coalescing ----------------------------------------------------------
    def _start_fill(self, call: _Call, entry: StoredEntry | None) -> asyncio.Task[VendorResponse]:
        """The one task of this process that brings `call`'s entry up to date.

        Callers await it through `shield`, so a caller that gives up does not cancel
        the fetch the others are waiting for.
        """
        task = self._inflight.get(call.key)
        if task is None:
            task = asyncio.create_task(self._fill(call, entry), name=f"vendor-api:{call.key}")
            self._inflight[call.key] = task
            task.add_done_callback(lambda t: self._fill_done(call, t))
        return task

    def _fill_done(self, call: _Call, task: asyncio.Task[VendorResponse]) -> None:
        if self._inflight.get(call.key) is task:
            del self._inflight[call.key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Retrieved here so a background refresh nobody awaits does not log "never retrieved".
            log.debug("vendor api %s: fill failed: %s", call.api, exc)

    async def _fill(self, call: _Call, entry: StoredEntry | None) -> VendorResponse:
        """Fetch under the cross-process lock, or wait for whoever holds it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + call.policy.total_timeout_s + _WAIT_MARGIN_S
        waited = False
        while True:
            try:
                async with self.store.lock(
                    call.lock_key, ttl_s=call.policy.total_timeout_s + _LOCK_MARGIN_S
                ):
                    # Someone may have stored it between our read and our lock.
                    current = await self.store.get(call.key)
                    if current is not None and _newer(current, entry):
                        return self._respond(call, current, "HIT", self._clock(), coalesced=waited)
                    return await self._fetch(call, current or entry)
            except LockHeld:
                pass
            if not waited:
                telemetry.vendor_api_coalesced.add(1, {**call.attrs, "scope": "redis"})
                waited = True
            current = await self._wait_for_holder(call, entry, deadline)
            now = self._clock()
            if current is not None and _newer(current, entry):
                return self._respond(call, current, "HIT", now, coalesced=True)
            if current is None and entry is not None:
                # Gone while we waited (purged, or the vendor said no-store): never serve
                # it stale; take our own turn at the lock.
                entry = None
                continue
            if loop.time() >= deadline:
                error: VendorApiError = VendorTimeout(
                    f"{call.api}: no answer for {call.url} within "
                    f"{call.policy.total_timeout_s:.1f}s (waited for another caller's fetch)",
                    api=call.api,
                )
            elif entry is not None and entry.may_serve_on_error(now):
                # The holder let go without storing: the vendor failed it. Stand in with
                # the stale entry rather than hammering a failing vendor with retries.
                error = VendorUnavailable(
                    f"{call.api}: another caller's fetch of {call.url} failed", api=call.api
                )
            else:
                continue
            stale = self._stale_on_error(call, entry, error, now)
            if stale is None:
                raise error
            return stale

    async def _wait_for_holder(
        self, call: _Call, entry: StoredEntry | None, deadline: float
    ) -> StoredEntry | None:
        """Poll until the lock holder stores a newer entry or lets go; the entry as it then is."""
        loop = asyncio.get_running_loop()
        current = entry
        while loop.time() < deadline:
            await asyncio.sleep(self._poll_s)
            current = await self.store.get(call.key)
            if current is not None and _newer(current, entry):
                return current
            if not await self.store.is_locked(call.lock_key):
                return await self.store.get(call.key)
        return current

    # -- one upstream call and what follows from it -------------------------------
    async def _fetch(self, call: _Call, entry: StoredEntry | None) -> VendorResponse:
        """Call the vendor (conditionally if `entry` has validators) and store the result."""
        marker = keys.vendor_api_fill(uuid.uuid4().hex)
        await self.store.reserve(
            call.tags, marker, ttl_s=call.policy.total_timeout_s + _LOCK_MARGIN_S
        )
        try:
            upstream = await self._upstream(call, entry)
            now = self._clock()
            if upstream.status == 304 and entry is not None:
                merged = {**entry.headers, **kept_headers(upstream.headers, with_age=True)}
                plan = plan_storage(call.policy, merged)
                merged.pop("age", None)
                fresh = entry.model_copy(update={"headers": merged, **_lifetimes(plan, now)})
                telemetry.vendor_api_revalidations.add(1, {**call.attrs, "outcome": "not_modified"})
                status: CacheStatus = "REVALIDATED"
            else:
                body = self._validated_body(call, upstream)
                plan = plan_storage(call.policy, upstream.headers)
                fresh = StoredEntry(
                    url=call.url,
                    body=body,
                    headers=kept_headers(upstream.headers),
                    **_lifetimes(plan, now),
                )
                if entry is not None and (entry.etag or entry.last_modified):
                    telemetry.vendor_api_revalidations.add(1, {**call.attrs, "outcome": "modified"})
                status = "MISS"
        except (VendorUnavailable, BadVendorResponse) as exc:
            await self._release_quietly(call, marker)
            stale = self._stale_on_error(call, entry, exc, self._clock())
            if stale is None:
                raise
            return stale
        except BaseException:
            await self._release_quietly(call, marker)
            raise
        await self._save(call, fresh, plan, marker, replacing=entry is not None)
        return self._respond(call, fresh, status, now)

    async def _save(
        self, call: _Call, entry: StoredEntry, plan: StoragePlan, marker: str, *, replacing: bool
    ) -> None:
        keep_s = plan.keep_for_s
        if plan.store and keep_s < 1 and (entry.etag or entry.last_modified):
            # Stale at once (no-cache, max-age=0) but revalidatable: keep it to save bodies.
            keep_s = max(keep_s, float(call.policy.ttl_s))
        try:
            if not plan.store or keep_s < 1:
                log.debug("vendor api %s: not storing %s (%s)", call.api, call.url, plan.reason)
                await self.store.release(call.tags, marker)
                if replacing:
                    await self.store.delete(call.key)
                return
            if not await self.store.put(call.key, entry, call.tags, marker, ttl_s=keep_s):
                log.info(
                    "vendor api %s: %s purged during its fetch; not stored", call.api, call.url
                )
        except CacheUnavailable as exc:
            # The caller still gets the vendor's answer; only the cache missed out.
            telemetry.vendor_api_cache_errors.add(1, call.attrs)
            log.warning("%s; %s answered but not cached", exc, call.url)

    async def _release_quietly(self, call: _Call, marker: str) -> None:
        # A marker left behind is harmless: it names no key and expires with its set.
        with contextlib.suppress(CacheUnavailable):
            await self.store.release(call.tags, marker)

    async def _upstream(self, call: _Call, entry: StoredEntry | None) -> _Upstream:
        """One GET to the vendor; httpx errors become ours here, and only here."""
        policy = call.policy
        headers: dict[str, str] = {}
        if entry is not None and entry.etag:
            headers["if-none-match"] = entry.etag
        if entry is not None and entry.last_modified:
            headers["if-modified-since"] = entry.last_modified
        timeout = httpx.Timeout(
            connect=policy.connect_timeout_s,
            read=policy.read_timeout_s,
            write=policy.read_timeout_s,
            pool=policy.connect_timeout_s,
        )
        status_label = "error"
        started = time.perf_counter()
        try:
            async with (
                asyncio.timeout(policy.total_timeout_s),
                self._http.stream("GET", call.url, headers=headers, timeout=timeout) as resp,
            ):
                status_label = str(resp.status_code)
                body = await self._read_capped(call, resp) if resp.status_code == 200 else b""
                result = _Upstream(resp.status_code, resp.headers, body)
        except (TimeoutError, httpx.TimeoutException) as exc:
            telemetry.vendor_api_upstream_errors.add(1, {**call.attrs, "error": "timeout"})
            raise VendorTimeout(
                f"{call.api}: no answer from {call.url} within its timeouts "
                f"(connect {policy.connect_timeout_s}s, read {policy.read_timeout_s}s, "
                f"total {policy.total_timeout_s}s)",
                api=call.api,
            ) from exc
        except httpx.HTTPError as exc:
            telemetry.vendor_api_upstream_errors.add(1, {**call.attrs, "error": "unavailable"})
            raise VendorUnavailable(
                f"{call.api}: {call.url} failed: {type(exc).__name__}: {exc}", api=call.api
            ) from exc
        finally:
            telemetry.vendor_api_upstream_latency.record(
                (time.perf_counter() - started) * 1000, {**call.attrs, "status": status_label}
            )
        self._check_status(call, result, conditional=bool(headers))
        return result

    async def _read_capped(self, call: _Call, resp: httpx.Response) -> bytes:
        limit = call.policy.max_body_bytes
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._bad(call, f"body of {declared} bytes is over max_body_bytes={limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.aiter_bytes():  # decoded, so a gzip bomb is caught too
            size += len(chunk)
            if size > limit:
                raise self._bad(call, f"body is over max_body_bytes={limit}")
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_status(self, call: _Call, upstream: _Upstream, *, conditional: bool) -> None:
        status = upstream.status
        if status == 200 or (status == 304 and conditional):
            return
        if status in (408, 429) or status >= 500:
            telemetry.vendor_api_upstream_errors.add(1, {**call.attrs, "error": "unavailable"})
            raise VendorUnavailable(
                f"{call.api}: HTTP {status} from {call.url}", api=call.api, status=status
            )
        if 400 <= status < 500:
            telemetry.vendor_api_upstream_errors.add(1, {**call.attrs, "error": "rejected"})
            raise VendorRejected(
                f"{call.api}: HTTP {status} from {call.url}", api=call.api, status=status
            )
        raise self._bad(call, f"unexpected HTTP {status}", status=status)

    def _validated_body(self, call: _Call, upstream: _Upstream) -> str:
        try:
            text = upstream.body.decode("utf-8")
            json.loads(text)
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both
            ctype = upstream.headers.get("content-type", "no content-type")
            raise self._bad(call, f"body is not JSON ({ctype}): {exc}") from exc
        return text

    def _bad(self, call: _Call, why: str, *, status: int | None = None) -> BadVendorResponse:
        telemetry.vendor_api_upstream_errors.add(1, {**call.attrs, "error": "bad_response"})
        return BadVendorResponse(
            f"{call.api}: {call.url}: {why}; not cached", api=call.api, status=status
        )

    def _stale_on_error(
        self, call: _Call, entry: StoredEntry | None, exc: VendorApiError, now: float
    ) -> VendorResponse | None:
        if entry is None or not entry.may_serve_on_error(now):
            return None
        reason: StaleReason = (
            "upstream_timeout" if isinstance(exc, VendorTimeout) else "upstream_error"
        )
        telemetry.vendor_api_stale_served.add(1, {**call.attrs, "reason": reason})
        return self._respond(call, entry, "STALE", now, stale_reason=reason, error=str(exc))

    async def _bypass(self, call: _Call) -> VendorResponse:
        upstream = await self._upstream(call, None)
        body = self._validated_body(call, upstream)
        return VendorResponse(
            api=call.api,
            vendor_id=call.vendor_id,
            url=call.url,
            content=body.encode(),
            headers=kept_headers(upstream.headers),
            cache_status="BYPASS",
        )

    @staticmethod
    def _respond(
        call: _Call,
        entry: StoredEntry,
        status: CacheStatus,
        now: float,
        *,
        stale_reason: StaleReason | None = None,
        error: str | None = None,
        coalesced: bool = False,
    ) -> VendorResponse:
        return entry.response(
            api=call.api,
            vendor_id=call.vendor_id,
            status=status,
            now=now,
            stale_reason=stale_reason,
            error=error,
            coalesced=coalesced,
        )


def _as_follower(response: VendorResponse) -> VendorResponse:
    """Another caller's fetch, as seen by one that waited for it: a (coalesced) hit."""
    status = "HIT" if response.cache_status in ("MISS", "REVALIDATED") else response.cache_status
    return replace(response, cache_status=status, coalesced=True)


def _newer(current: StoredEntry, seen: StoredEntry | None) -> bool:
    return seen is None or current.stored_at > seen.stored_at


def _lifetimes(plan: StoragePlan, now: float) -> dict[str, float]:
    return {
        "stored_at": now,
        "fresh_for_s": plan.fresh_for_s,
        "stale_while_revalidate_s": plan.stale_while_revalidate_s,
        "stale_if_error_s": plan.stale_if_error_s,
    }
