"""How a sink calls its backend: retries, described once, and the clients they go through.

`with_retries` is the one retry loop of the sinks (stamina's `retry_context`): a call
that fails with a `ServerError` (the provider answered 5xx) or one of the backend's
network errors is tried again with jittered exponential backoff, each retry counted
in `cachesync.sink.retries` by sink and region. When the attempts or the time run
out, the failure becomes a `TransientError` (from the original): the runner then
puts the batch back. Anything else (a 4xx, a ClientError code) passes through
untouched, for the provider module to map.

`Outage` is the other kind of waiting: the provider refused the sink itself (its
credentials, its zone or distribution), so no retry of the call can help until someone
fixes it. The sink's batch is put back with a backoff the sink keeps (one per sink,
however many partitions it serves), the `cachesync.sink.blocked` gauge is raised, and
one warning a minute says so, not one per try.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar, overload

import httpx
import stamina
from redis.asyncio import Redis

from cachesync.consumers import telemetry
from cachesync.consumers.errors import ServerError, SinkUnavailable, TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Retries:
    """`attempts` tries of at most `timeout_s` each, waiting `wait_initial_s` (doubling,
    jittered, up to `wait_max_s`) between them."""

    attempts: int
    timeout_s: float
    wait_initial_s: float
    wait_max_s: float


async def with_retries(
    call: Callable[[], Awaitable[T]],
    retries: Retries,
    *,
    network: tuple[type[Exception], ...],
    sink: str,
    region: str,
    what: str,
) -> T:
    """`await call()`, retried on ServerError and `network`; TransientError(`what`: ...) at the end."""
    attrs = {"sink": sink, "region": region}
    retried: tuple[type[Exception], ...] = (ServerError, *network)
    tries = 0
    try:
        async for attempt in stamina.retry_context(
            on=retried,
            attempts=retries.attempts,
            timeout=retries.timeout_s * retries.attempts,
            wait_initial=retries.wait_initial_s,
            wait_max=retries.wait_max_s,
        ):
            tries = attempt.num
            if tries > 1:
                telemetry.sink_retries.add(1, attrs)
            with attempt:
                result = await call()
    except retried as exc:
        detail = str(exc) if isinstance(exc, ServerError) else type(exc).__name__
        raise TransientError(f"{what}: {detail} after {tries} attempts") from exc
    return result


class Outage:
    """While a provider refuses a sink as a whole: how long the sink waits before it tries
    again, the `cachesync.sink.blocked` gauge, and one warning a minute.

    `refused(exc)` is called with each `SinkUnavailable` as it leaves the sink: it sets the
    error's `retry_after` (jittered, doubling from `wait_initial_s` up to `wait_max_s`;
    the loop pauses the batch's partitions that long), counts the put-back batch and
    warns at most every `warn_every_s`. Until that wait is over, `hold()` puts back the
    batches of the sink's other partitions without asking the provider: one call per
    wait, however many partitions the sink serves. `accepted()` is called when the
    provider took a flush again: the gauge drops to 0 and one line says how long it lasted.
    """

    def __init__(
        self,
        sink: str,
        region: str,
        *,
        wait_initial_s: float = 1.0,
        wait_max_s: float = 30.0,
        warn_every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.sink = sink
        self.region = region
        self.wait_initial_s = wait_initial_s
        self.wait_max_s = wait_max_s
        self.warn_every_s = warn_every_s
        self.clock = clock
        self.rng = rng or random.Random()
        self.since: float | None = None  # when the current outage began (clock time)
        self.tries = 0  # batches refused in the current outage
        self.reason: str | None = None
        self._warned_at: float | None = None
        self._last: SinkUnavailable | None = None  # the refusal that holds the sink
        self._next_try = 0.0  # clock time after which the provider is asked again

    @property
    def blocked(self) -> bool:
        return self.since is not None

    def refused(self, exc: SinkUnavailable) -> SinkUnavailable:
        """Record a refusal of the sink; `exc` comes back with its `retry_after` set."""
        now = self.clock()
        if self.since is None:
            self.since = now
        self.tries += 1
        self.reason = exc.reason
        # The exponent stops long after the ceiling is reached: a float has no 2 ** 1024,
        # and an outage of days must not end the sink with an OverflowError.
        ceiling = min(self.wait_max_s, self.wait_initial_s * 2 ** min(self.tries - 1, 62))
        # Full jitter above a floor: sinks blocked together (one token, many regions) do
        # not come back in step.
        exc.retry_after = self.wait_initial_s / 2 + self.rng.uniform(0, ceiling)
        self._last, self._next_try = exc, now + exc.retry_after
        telemetry.sink_unavailable.add(1, self._attrs(exc.reason))
        telemetry.record_blocked(self.sink, self.region, exc.reason)
        if self._warned_at is None or now - self._warned_at >= self.warn_every_s:
            self._warned_at = now
            log.warning(
                "%s (%s: the sink is paused, nothing dead-lettered or committed, retried "
                "with backoff; blocked %.0fs, %d tries)",
                exc,
                exc.reason,
                now - self.since,
                self.tries,
            )
        return exc

    def hold(self) -> None:
        """While blocked and the wait is not over: raise the refusal again, without asking
        the provider, to wait the rest of it."""
        if self._last is None:
            return
        wait = self._next_try - self.clock()
        if wait > 0:
            telemetry.sink_unavailable.add(1, self._attrs(self._last.reason))
            # A little after the probe's time, so that the probe goes first.
            raise type(self._last)(str(self._last), wait + 0.05)

    def _attrs(self, reason: str) -> dict[str, str]:
        return {"sink": self.sink, "region": self.region, "reason": reason}

    def accepted(self) -> None:
        """The provider took a flush: the outage, if any, is over."""
        if self.since is None:
            return
        log.warning(
            "%s sink in %s: accepted again after %.0fs blocked (%s, %d tries)",
            self.sink,
            self.region,
            self.clock() - self.since,
            self.reason,
            self.tries,
        )
        telemetry.record_blocked(self.sink, self.region, None)
        self.since, self.tries, self.reason, self._warned_at = None, 0, None, None
        self._last, self._next_try = None, 0.0


class HttpEndpoint:
    """A lazily opened httpx client for one base URL (a provider's API, a region's edge).

    `headers` is called when the client opens, so that a secret (an API token) lives
    only in the client's Authorization header, never in an attribute of the sink.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._transport = transport
        self._headers = headers
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                transport=self._transport,
                timeout=self.timeout_s,
                headers=self._headers() if self._headers else None,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


@overload
def redis_client(redis: Redis | str) -> Redis: ...


@overload
def redis_client(redis: Redis | str | None) -> Redis | None: ...


def redis_client(redis: Redis | str | None) -> Redis | None:
    """A sink's Redis: the client it was given, or one for a URL."""
    return Redis.from_url(redis, socket_timeout=5) if isinstance(redis, str) else redis
