"""One error tree, one Redis mapping, one retry helper (with its retry counter)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import stamina
from cashews import CacheBackendInteractionError
from redis.exceptions import ConnectionError as RedisConnectionError

from cachesync.consumers import errors
from cachesync.consumers.errors import (
    BadInput,
    CachesyncError,
    CacheUnavailable,
    LockHeld,
    PermanentSinkError,
    ServerError,
    TransientError,
    redis_errors,
)
from cachesync.consumers.sinks.retry import Retries, with_retries
from cachesync.schemas import InvalidRecord, SerdeError, UndecodableMessage, UnknownSchema
from tests.conftest import metric_points

RETRIES = Retries(attempts=3, timeout_s=1.0, wait_initial_s=0.01, wait_max_s=0.01)


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=3):
        yield


def test_schema_errors_are_the_consumers_bad_input() -> None:
    """The schemas package's errors are in the one tree: a decode error is a BadInput."""
    for cls, reason in (
        (UndecodableMessage, "undecodable"),
        (UnknownSchema, "unknown_schema"),
        (InvalidRecord, "invalid_record"),
    ):
        assert issubclass(cls, SerdeError) and issubclass(cls, BadInput), cls
        assert cls.reason == reason
    assert errors.Undecodable is UndecodableMessage
    assert errors.InvalidRecord is InvalidRecord and errors.UnknownSchema is UnknownSchema
    assert errors.CachesyncError is CachesyncError and errors.BadInput is BadInput


def test_sink_and_vendor_api_control_flow_errors_are_in_the_tree() -> None:
    assert issubclass(ServerError, TransientError)
    assert issubclass(LockHeld, TransientError) and not issubclass(LockHeld, CacheUnavailable)
    assert issubclass(PermanentSinkError, CachesyncError)
    assert not issubclass(PermanentSinkError, TransientError)


@pytest.mark.parametrize(
    "raised", [RedisConnectionError("refused"), TimeoutError("slow"), ConnectionResetError()]
)
async def test_redis_errors_become_transient_from_the_original(raised: Exception) -> None:
    async def call() -> None:
        raise raised

    with pytest.raises(TransientError, match=r"^ledger eu-west: read failed: ") as caught:
        async with redis_errors("ledger eu-west: read"):
            await call()
    assert caught.value.__cause__ is raised
    with pytest.raises(TransientError), redis_errors("sync use"):
        raise raised


def test_redis_errors_name_what_a_wrapper_wraps_and_leave_other_errors_alone() -> None:
    wrapped = CacheBackendInteractionError()
    wrapped.__cause__ = RedisConnectionError("refused")
    boundary = redis_errors(
        "cache get", into=CacheUnavailable, also=(CacheBackendInteractionError,)
    )
    with pytest.raises(CacheUnavailable, match="ConnectionError: refused"), boundary:
        raise wrapped
    with pytest.raises(KeyError), redis_errors("not redis"):
        raise KeyError("x")


def _retries(metric_reader: Any, sink: str) -> float:
    return sum(
        p.value
        for p in metric_points(metric_reader, "cachesync.sink.retries")
        if p.attributes.get("sink") == sink
    )


async def test_with_retries_retries_5xx_and_network_errors_and_counts_each_retry(
    metric_reader: Any,
) -> None:
    """Two failures then an answer: three attempts, two retries counted for the sink."""
    before = _retries(metric_reader, "unit-flaky")
    failures: list[Exception] = [
        ServerError("HTTP 503"),
        httpx.ConnectError("refused"),
    ]

    async def call() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    result = await with_retries(
        call,
        RETRIES,
        network=(httpx.TransportError,),
        sink="unit-flaky",
        region="eu-west",
        what="flaky",
    )
    assert result == "ok"
    assert _retries(metric_reader, "unit-flaky") - before == 2


async def test_with_retries_gives_up_with_a_transient_error_and_passes_others_through() -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused")

    with pytest.raises(TransientError, match=r"^edge: ConnectError after 3 attempts$") as caught:
        await with_retries(
            down, RETRIES, network=(httpx.TransportError,), sink="s", region="r", what="edge"
        )
    assert calls == 3 and isinstance(caught.value.__cause__, httpx.ConnectError)
    assert type(caught.value) is TransientError  # a ServerError never leaves a sink

    async def refused() -> None:
        raise PermanentSinkError("HTTP 403")

    with pytest.raises(PermanentSinkError):
        await with_retries(
            refused, RETRIES, network=(httpx.TransportError,), sink="s", region="r", what="x"
        )
