"""The consistency checker as a process of its own, for bench/consistency_at_scale.py.

    python -m bench.consistency_oracle --prefix P --since-ms T [--window-s 1 --give-up-s 30]

It runs the project's checker (`consumers/ops/consistency.py` `ConsistencyChecker`) on a
bench scenario's topics: every purge the mapper issued to a region's command topic is
expected of that region's Redis sink, and judged by reading the keys back in that
region's Redis (the keys it names, and the keys now under its tags: one older than the
event by its write stamp is a stale copy), never by the sinks' reports alone. It prints
`READY` once it tails the command and audit topics and, when told the load is over
(SIGTERM), stops expecting purges, judges every one it expected and prints
`RESULT {json}`: per region, the checker's tallies. A checker that falls behind reads
back late; that hides no late purge (the sink's applied time decides the window), and a
stale copy left behind stays (the load refills only what is missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench.common import bench_settings, one_command_app, stack_env
from bench.worker import _emit, _peak_rss_mb, _stop_on_signals
from cachesync.consumers.ops.consistency import ConsistencyChecker

if TYPE_CHECKING:
    from cachesync.consumers.ops.consistency import Probe, Tally

# Stale purges listed in the result, per region (the checker keeps up to STALE_KEPT).
EXAMPLES = 20
PROGRESS_EVERY_S = 5.0
# After the load: how long the checker may go without judging anything before the run
# stops waiting for it (the purges left are reported as pending, not judged).
STALLED_S = 120.0


class ObservedChecker(ConsistencyChecker):
    """The project's checker, also noting at each first judgement why a purge missed its
    window, how long after its issue the sink applied it, and how late the judgement
    came. A breakdown beside the verdict, which stays the checker's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.missed: dict[str, Counter[str]] = defaultdict(Counter)
        self.sink_delay_ms: dict[str, list[int]] = defaultdict(list)
        self.judged_late_s: list[float] = []

    def _judge(self, probe: Probe, tally: Tally, stale: list[str]) -> None:
        if probe.first:
            # `due` is the end of the window (plus the checker's grace), as first queued.
            self.judged_late_s.append(time.monotonic() - probe.due)
            applied = probe.applied_at
            if applied is not None:
                self.sink_delay_ms[probe.region].append(applied - probe.issued_at)
            if applied is None:
                self.missed[probe.region]["no applied report read by then"] += 1
            elif applied > probe.issued_at + self.window_s * 1000:
                self.missed[probe.region]["applied after the window"] += 1
            elif stale:
                self.missed[probe.region]["stale copy read back"] += 1
        super()._judge(probe, tally, stale)


def _quantiles(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p99": None, "p999": None, "max": None}

    def q(x: float) -> float:
        return ordered[min(len(ordered) - 1, int(x * len(ordered)))]

    return {"p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": ordered[-1]}


def tally_json(t: Tally) -> dict[str, Any]:
    """One region's tally: counts, the nines, the staleness quantiles, examples."""
    return {
        "probed": t.probed,
        "converged": t.converged,
        "share": t.share,
        "nines": t.nines,
        "stale": t.stale_count,
        "recovered": t.recovered,
        "gave_up": t.gave_up,
        "unapplied": t.unapplied,
        "unjudged_keys": t.unjudged_keys,
        "staleness_ms": _quantiles(t.staleness_ms),
        "stale_examples": [
            {"event_id": s.event_id, "command_id": s.command_id, "reason": s.reason, "keys": s.keys}
            for s in list(t.stale.values())[:EXAMPLES]
        ],
    }


def _progress(checker: ConsistencyChecker) -> dict[str, Any]:
    return {
        "expected": checker.expected,
        "finished": checker.finished,
        "pending": checker.pending,
        "probed": sum(t.probed for t in checker.tallies.values()),
        "stale": sum(t.stale_count for t in checker.tallies.values()),
    }


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Whole or not at all: the harness may read it at any moment."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(payload))
    os.replace(tmp, path)


async def run_oracle(
    prefix: str, since_ms: int, window_s: float, give_up_s: float, progress: str
) -> dict[str, Any]:
    settings = bench_settings(prefix)
    checker = ObservedChecker(
        settings,
        window_s=window_s,
        give_up_s=give_up_s,
        since_ms=since_ms,
        # The Redis sinks are what runs: the CDNs and the edge are not part of this mode.
        sinks={region: ("redis",) for region in settings.topology.regions},
        edge_urls={},
    )
    load_over = asyncio.Event()
    _stop_on_signals(load_over)
    halt = asyncio.Event()
    task = asyncio.create_task(checker.run(halt))
    try:
        ready = asyncio.create_task(checker.ready.wait())
        await asyncio.wait({ready, task}, return_when="FIRST_COMPLETED")
        if task.done():
            task.result()  # it failed before it was ready: say why
        _emit("READY")
        while not load_over.is_set():
            if progress:
                _write_json(progress, _progress(checker))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(load_over.wait(), timeout=PROGRESS_EVERY_S)
        ended = time.monotonic()
        # Every purge issued is on the command topics by now: judge each one for good
        # (its window, then up to give_up_s of re-reads for those found stale).
        # A checker that fell behind during the load has a backlog of judgements: wait as
        # long as it makes progress, and give up only after STALLED_S without any.
        checker.stop_expecting()
        progressed, last = time.monotonic(), checker.finished
        while (
            not checker.settled and time.monotonic() - progressed < window_s + give_up_s + STALLED_S
        ):
            await checker.drain(timeout_s=PROGRESS_EVERY_S)
            if checker.finished != last:
                progressed, last = time.monotonic(), checker.finished
            if progress:
                _write_json(progress, _progress(checker))
        judged_s = time.monotonic() - ended
    finally:
        halt.set()
        with contextlib.suppress(Exception):
            await task
        await checker.close()
    return {
        "regions": {
            region: tally_json(t)
            | {
                "missed": dict(checker.missed[region]),
                "sink_delay_ms": _quantiles([float(d) for d in checker.sink_delay_ms[region]]),
            }
            for (region, _), t in checker.tallies.items()
        },
        "judged_late_s": _quantiles(checker.judged_late_s),
        **_progress(checker),
        "settled": checker.settled,
        "judged_after_load_s": judged_s,
        "cpu_s": time.process_time(),  # the whole process's: what judging costs
        "peak_rss_mb": _peak_rss_mb(),
    }


app = one_command_app()


@app.command(help="the consistency checker over a bench scenario's topics")
def main(
    prefix: Annotated[str, typer.Option()],
    since_ms: Annotated[int, typer.Option()],
    window_s: float = 1.0,
    give_up_s: float = 30.0,
    progress: Annotated[str, typer.Option(help="a JSON file its counts are written to")] = "",
) -> None:
    stack_env()
    _emit("RESULT", asyncio.run(run_oracle(prefix, since_ms, window_s, give_up_s, progress)))


if __name__ == "__main__":
    app()
