"""The health registry, the sinks' default readiness probe and the shutdown grace period, without services."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from cachesync.consumers.health import Health
from cachesync.consumers.pipeline import assemble
from cachesync.consumers.sinks.base import reachable


@pytest.fixture
def event_loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, as `cachesync run`'s is beside the
    health server's."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def register(
    health: Health,
    loop: asyncio.AbstractEventLoop,
    name: str,
    *,
    alive: str | None,
    ready: str | None,
) -> None:
    async def probe() -> str | None:
        return ready

    async def on_loop() -> None:
        health.register(name, alive=lambda: alive, ready=probe)

    asyncio.run_coroutine_threadsafe(on_loop(), loop).result(5)


def test_answers_name_each_loop_and_fail_when_one_does(
    event_loop_thread: asyncio.AbstractEventLoop,
) -> None:
    loop = event_loop_thread
    health = Health(probe_timeout_s=0.5)
    assert not health.readiness().ok, "no loop yet: not ready"
    assert health.liveness().ok, "no loop yet: starting, alive"
    register(health, loop, "sink.us-east.redis", alive=None, ready=None)
    register(health, loop, "sink.eu-west.redis", alive=None, ready="redis eu-west: ping failed")
    answer = health.readiness()
    assert not answer.ok
    assert answer.checks == {
        "sink.us-east.redis": "ok",
        "sink.eu-west.redis": "redis eu-west: ping failed",
    }
    assert health.liveness().ok
    health.unregister(["sink.eu-west.redis"])
    assert health.readiness().ok


def test_a_blocked_event_loop_is_not_ready_and_its_stalled_loop_not_alive(
    event_loop_thread: asyncio.AbstractEventLoop,
) -> None:
    """Liveness reads plain attributes, so a blocked loop cannot hide itself; readiness gives
    up after its timeout instead of hanging the kubelet's probe."""
    loop = event_loop_thread
    health = Health(probe_timeout_s=0.3)
    register(health, loop, "mapper", alive="no poll for 400s", ready=None)
    release = threading.Event()
    loop.call_soon_threadsafe(release.wait, 5)  # a handler that never yields
    t0 = time.monotonic()
    answer = health.readiness()
    assert time.monotonic() - t0 < 2
    assert not answer.ok and "did not answer" in answer.checks["mapper"]
    live = health.liveness()
    assert not live.ok and live.checks == {"mapper": "no poll for 400s"}
    release.set()


async def test_the_default_probe_is_a_tcp_connection_to_the_backend() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert await reachable(f"http://127.0.0.1:{port}/") is None
    refused = await reachable(f"http://127.0.0.1:{port}/")
    assert refused is not None and f"127.0.0.1:{port} unreachable" in refused
    assert await reachable("not a url") is not None


def test_sigterm_drains_and_a_drain_past_the_grace_period_is_aborted() -> None:
    """A run that finishes its batch in time returns; one that does not is cancelled once
    the grace period is over, not left to the orchestrator's SIGKILL."""

    async def drains(stop: asyncio.Event) -> str:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        await stop.wait()
        await asyncio.sleep(0.1)  # the batch in hand
        return "drained"

    assert assemble.run_until_signal(drains, grace_s=2.0) == "drained"

    async def hangs(stop: asyncio.Event) -> str:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        await stop.wait()
        await asyncio.Event().wait()  # a flush that never returns
        return "unreachable"

    t0 = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        assemble.run_until_signal(hangs, grace_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2.0
