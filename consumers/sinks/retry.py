"""How a sink calls its backend: retries, described once, and the clients they go through.

`with_retries` is the one retry loop of the sinks (stamina's `retry_context`): a call
that fails with a `ServerError` (the provider answered 5xx) or one of the backend's
network errors is tried again with jittered exponential backoff, each retry counted
in `cachesync.sink.retries` by sink and region. When the attempts or the time run
out, the failure becomes a `TransientError` (from the original): the runner then
puts the batch back. Anything else (a 4xx, a ClientError code) passes through
untouched, for the provider module to map.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar, overload

import httpx
import stamina
from redis.asyncio import Redis

from cachesync.consumers import telemetry
from cachesync.consumers.errors import ServerError, TransientError

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
