"""Assembling a run: which roles, built from settings, started together and stopped on a signal.

The CLI parses options and prints; everything between ("which sinks can run here",
"build the roles", "run until Ctrl-C, then drain") is here, so a test or another
entry point runs the pipeline the same way `cachesync run` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cachesync.consumers.pipeline.roles import MapperRole, Role, SinkRole, run_roles
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks import registry
from cachesync.topology.admin import apply_topics

T = TypeVar("T")
Companion = Callable[[asyncio.Event], Coroutine[Any, Any, object]]


@dataclass(frozen=True)
class SkippedSink:
    region: str
    kind: str
    reason: str


def runnable_sinks(settings: Settings) -> tuple[list[tuple[str, str]], list[SkippedSink]]:
    """Every (region, sink) whose provider is configured, and why each other one is not."""
    runnable: list[tuple[str, str]] = []
    skipped: list[SkippedSink] = []
    for region in settings.topology.regions:
        for kind in registry.SINK_KINDS:
            reason = registry.unavailable(settings, region, kind)
            if reason is None:
                runnable.append((region, kind))
            else:
                skipped.append(SkippedSink(region, kind, reason))
    return runnable, skipped


def build_roles(
    settings: Settings, *, mapper: bool, sinks: Sequence[tuple[str, str]]
) -> list[Role]:
    """The mapper (if asked) and one sink role per (region, kind); ConfigError if one cannot run."""
    roles: list[Role] = [MapperRole(settings)] if mapper else []
    roles.extend(
        SinkRole(settings, registry.build_sink(settings, region, kind)) for region, kind in sinks
    )
    return roles


async def run(
    settings: Settings,
    stop: asyncio.Event,
    roles: list[Role],
    *,
    companions: Sequence[Companion] = (),
) -> None:
    """Create missing topics, run `roles` until `stop`, with `companions` (demo traffic,
    the consistency checker, a progress printer) beside them; all stop together."""
    await apply_topics(settings.kafka_bootstrap_servers, settings.topology, settings.topic_prefix)
    extra = [asyncio.create_task(c(stop)) for c in companions]
    try:
        await run_roles(roles, stop)
    finally:
        stop.set()
        await asyncio.gather(*extra, return_exceptions=True)


def run_until_signal(
    main: Callable[[asyncio.Event], Awaitable[T]],
    *,
    on_stop: Callable[[], None] = lambda: None,
) -> T:
    """Run `main(stop)`; the first SIGINT/SIGTERM sets `stop` (drain), a second one aborts
    (asyncio.CancelledError). `on_stop` only reports: the stop never depends on it."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        hits = 0

        def on_signal() -> None:
            nonlocal hits
            hits += 1
            if hits > 1:
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                return
            stop.set()
            # A terminal that went away (a pipe whose reader exited) must not undo the stop.
            with contextlib.suppress(Exception, SystemExit):
                on_stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return await main(stop)

    return asyncio.run(runner())
