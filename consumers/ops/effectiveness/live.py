"""What `cachesync run all` runs beside the pipeline for cache effectiveness: the recorder
(one line per region with each tier's hit ratio, every few seconds) and, with `--demo`,
guests reading the demo's weddings through every tier."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from cachesync.consumers.ops.consistency import ConsistencyChecker
from cachesync.consumers.ops.effectiveness.config import load_effectiveness_settings
from cachesync.consumers.ops.effectiveness.guests import Guests
from cachesync.consumers.ops.effectiveness.recorder import Recorder
from cachesync.consumers.settings import Settings

Companion = Callable[[asyncio.Event], Coroutine[Any, Any, object]]


def effectiveness_companions(
    settings: Settings,
    print_lines: Callable[[list[str]], None],
    *,
    checker: ConsistencyChecker | None = None,
    demo: bool = False,
    weddings: int = 20,
    guest_rate: float = 15.0,
) -> list[Companion]:
    eff = load_effectiveness_settings()

    def tallies() -> dict[tuple[str, str], tuple[int, int]]:
        if checker is None:
            return {}
        return {k: (t.probed, t.converged) for k, t in checker.tallies.items()}

    # The demo owns its local stack: there, per-key Redis events are turned on.
    recorder = Recorder(
        settings,
        eff,
        print_lines=print_lines,
        consistency=tallies if checker is not None else None,
        enable_key_events=True if demo else None,
    )
    companions: list[Companion] = [recorder.run]
    if demo:
        companions.append(Guests(settings, eff, weddings=weddings, rate=guest_rate).run)
    return companions
