"""Whether the services a command needs answer, checked before it starts any work.

A command that cannot reach Kafka or a region's Redis stops at once with one line that
names the variable and the address (a `ConfigError`, printed by the CLI), instead of a
client's traceback minutes later when the first record or command arrives. The checks
run together, each bounded by `timeout_s`, so an address that drops packets costs
seconds, not a client's default 40.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from aiokafka import AIOKafkaClient
from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachesync.consumers.errors import ConfigError
from cachesync.consumers.pipeline.kafka import KafkaConnection, check_login
from cachesync.consumers.settings import Settings, region_env_var

TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RedisTarget:
    """A Redis a command uses: what it is for, its URL and the variable that sets it."""

    what: str  # "region eu-west", "the state Redis"
    url: str
    variable: str
    fallback: str  # where the URL comes from when the variable is not set


def redis_targets(
    settings: Settings, *, regions: Iterable[str] = (), state: bool = False
) -> list[RedisTarget]:
    """The Redis servers of `regions` (each named by REDIS_URL_<REGION>) and the state one."""
    targets = [
        RedisTarget(
            f"region {r}",
            settings.region_redis_urls[r],
            region_env_var(r),
            f"redis_url of {r} in {settings.topology_file}",
        )
        for r in sorted(set(regions))
    ]
    if state:
        targets.append(
            RedisTarget(
                "the state Redis",
                str(settings.state_redis_url),
                "CACHESYNC_STATE_REDIS_URL",
                "the default",
            )
        )
    return targets


async def check_reachable(
    settings: Settings,
    *,
    kafka: bool = True,
    kafka_regions: Iterable[str] = (),
    redis: Iterable[RedisTarget] = (),
    timeout_s: float = TIMEOUT_S,
) -> None:
    """ConfigError naming the variable and the address of the first service that does not
    answer (Kafka first: without it nothing runs). `kafka` checks the home cluster, and
    `kafka_regions` the clusters those regions' sinks read, where they have their own."""
    clusters: dict[str, KafkaConnection] = {}
    if kafka:
        for region in (None, *sorted(set(kafka_regions))):
            cluster = KafkaConnection.of(settings, region)
            clusters.setdefault(cluster.bootstrap_servers, cluster)
    for cluster in clusters.values():
        # A login the broker refuses is said as such (check_login), not as "no broker answers".
        await check_login(cluster, timeout_s=timeout_s)
    checks = [
        *(_kafka_answers(c, timeout_s) for c in clusters.values()),
        *(_redis_answers(t, timeout_s) for t in redis),
    ]
    problems = [p for p in await asyncio.gather(*checks) if p is not None]
    if problems:
        raise ConfigError(problems[0] + _and_more(len(problems) - 1))


def _and_more(n: int) -> str:
    return f" (and {n} more unreachable)" if n else ""


async def _kafka_answers(kafka: KafkaConnection, timeout_s: float) -> str | None:
    """None when a broker of the cluster answers a metadata request, else why not."""
    bootstrap = kafka.bootstrap_servers
    client = AIOKafkaClient(
        **kafka.client_options(),
        client_id="cachesync-reachability",
        request_timeout_ms=int(timeout_s * 1000),
    )
    # aiokafka logs why each address failed as an ERROR, then raises a bare "Unable to
    # bootstrap": the reason is taken from the log record, and the record kept off screen.
    reasons: list[str] = []
    try:
        with _captured("aiokafka", reasons):
            await asyncio.wait_for(client.bootstrap(), timeout=timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (reasons or [_cause(exc)])[-1]
        return (
            f"{kafka.bootstrap_variable}={bootstrap}: no Kafka broker answers ({why}); "
            "is the broker up, and is this its address?"
        )
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    return None


async def _redis_answers(target: RedisTarget, timeout_s: float) -> str | None:
    client = Redis.from_url(target.url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        await asyncio.wait_for(client.ping(), timeout=timeout_s + 1)
    except (RedisError, OSError, TimeoutError) as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else _cause(exc)
        unset = "" if target.variable in os.environ else f" (unset: {target.fallback})"
        return f"{target.variable}={target.url}{unset}: {target.what} does not answer ({why})"
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    return None


def _cause(exc: BaseException) -> str:
    """The innermost reason, in a few words ("Connection refused")."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)  # "Connection refused", not asyncio's wording
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0][:160]


class _Reasons(logging.Handler):
    """Keeps the error of each 'Unable connect to "host:port": error' record."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        error = next((a for a in args if isinstance(a, BaseException)), None)
        if error is not None:
            self.into.append(_cause(error))


@contextlib.contextmanager
def _captured(logger_name: str, into: list[str]) -> Iterator[None]:
    """The logger's records go to `into` (their errors) and nowhere else, meanwhile."""
    logger = logging.getLogger(logger_name)
    handler = _Reasons(into)
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved[0]
        logger.setLevel(saved[1])  # setLevel, not `.level =`: it clears the loggers' caches
