"""`cachesync consistency`: read back issued purges and report convergence per region and sink."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from cachesync.consumers.cli.common import (
    console,
    load_settings_or_exit,
    parse_time,
    require_services,
    run_until_signal,
    setup_logging,
)
from cachesync.consumers.sinks.registry import PURGE_KINDS


def consistency_cmd(
    duration: Annotated[
        float,
        typer.Option(
            help="Seconds to collect the purges the mapper issues; then it waits for their "
            "window and re-reads those not converged (at most window + give-up more), "
            "saying what it waits for"
        ),
    ] = 60.0,
    window: Annotated[
        float, typer.Option(help="Seconds after a purge is issued before judging it")
    ] = 5.0,
    sample: Annotated[float, typer.Option(help="Share of issued purges to judge")] = 1.0,
    give_up: Annotated[
        float, typer.Option(help="Seconds after its window to keep re-reading a stale purge")
    ] = 60.0,
    since: Annotated[
        str | None, typer.Option(help="Also judge purges issued since this time (15m, ISO)")
    ] = None,
    show: Annotated[int, typer.Option(help="Stale purges listed per region and sink")] = 20,
    sink: Annotated[
        list[str] | None,
        typer.Option(
            help="Judge only this sink kind (repeatable); default: every purge sink that "
            "runs in each region"
        ),
    ] = None,
) -> None:
    """Judge the purges the mapper issues: applied by every sink of their region, and nothing
    stale read back in its Redis and edge; report convergence as nines, and list what is stale."""
    from cachesync.consumers.ops.consistency import ConsistencyChecker, expected_sinks

    setup_logging(False)
    settings = load_settings_or_exit()
    require_services(settings, regions=settings.topology.regions)
    unknown = sorted(set(sink or ()) - set(PURGE_KINDS))
    if unknown:
        raise typer.BadParameter(f"not purge sinks: {unknown}; known: {PURGE_KINDS}")
    sinks = {
        region: [k for k in kinds if sink is None or k in sink]
        for region, kinds in expected_sinks(settings).items()
    }

    async def main(stop: asyncio.Event) -> ConsistencyChecker:
        checker = ConsistencyChecker(
            settings,
            window_s=window,
            sample=sample,
            give_up_s=give_up,
            since_ms=parse_time(since) if since is not None else None,
            sinks=sinks,
        )
        halt = asyncio.Event()
        task = asyncio.create_task(checker.run(halt))
        try:
            with _progress() as bar:
                step = bar.add_task("reading the command and audit topics", total=None, count="")
                await _wait_any(checker.ready, stop, task=task)
                if checker.ready.is_set() and not stop.is_set():
                    await _collect(checker, stop, duration, bar, step)
                    await _settle(checker, stop, task, bar, step, within=window + give_up + 5.0)
        finally:
            halt.set()
            await task
            await checker.close()
        return checker

    started = time.monotonic()
    checker = run_until_signal(main)
    out = Console()
    out.print(consistency_table(checker))
    stale = stale_table(checker, limit=show)
    if stale is not None:
        out.print(stale)
    console.print(f"[dim]took {time.monotonic() - started:.1f} s[/dim]")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


async def _collect(
    checker: Any, stop: asyncio.Event, duration: float, bar: Progress, step: TaskID
) -> None:
    """Let the checker collect issued purges for `duration` seconds: a bar over the time."""
    deadline = time.monotonic() + duration
    bar.update(step, description="collecting the purges issued", total=duration, completed=0)
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        bar.update(
            step, completed=duration - left, count=f"{checker.expected} purges, {left:.0f} s left"
        )
        await _wait_any(stop, within=min(left, 0.5))
    bar.update(step, completed=duration, count=f"{checker.expected} purges")


async def _settle(
    checker: Any,
    stop: asyncio.Event,
    task: asyncio.Task[Any],
    bar: Progress,
    step: TaskID,
    *,
    within: float,
) -> None:
    """Stop collecting, then wait until every collected purge is judged: a bar over the
    read-backs, saying what it waits for and for how long at most."""
    checker.stop_expecting()
    bar.update(step, description="collected")
    bar.stop_task(step)
    judging = bar.add_task("judging", total=None, count="")
    deadline = time.monotonic() + within
    while not (checker.settled or stop.is_set() or task.done()):
        left = deadline - time.monotonic()
        if left < 0:
            console.print(f"[yellow]stopped waiting after {within:g} s[/yellow]")
            break
        total = checker.finished + checker.pending
        bar.update(
            judging,
            description=checker.waiting_for(),
            total=max(total, 1),
            completed=checker.finished,
            count=f"{checker.finished}/{total} read-backs, at most {left:.0f} s more",
        )
        await _wait_any(checker.all_judged, stop, task=task, within=0.25)
    total = checker.finished + checker.pending
    bar.update(
        judging,
        description="judged",
        total=total or 1,
        completed=checker.finished if total else 1,
        count=f"{checker.finished}/{total} read-backs",
    )


async def _wait_any(
    *events: asyncio.Event, task: asyncio.Task[Any] | None = None, within: float | None = None
) -> None:
    """Wait until one of `events` is set or `task` ends, for at most `within` seconds."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(
            [*waiters, *([task] if task is not None else [])],
            timeout=within,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        for waiter in waiters:
            waiter.cancel()


def consistency_table(checker: Any) -> Table:
    table = Table(
        "region",
        "sink",
        "purges judged",
        "converged in window",
        "nines",
        "recovered later",
        "still stale",
        "never applied",
        "staleness p50\n(from the event)",
        "staleness p99\n(from the event)",
        title=f"consistency (window {checker.window_s:g}s)",
        caption="staleness: from the event's time until no stale copy was read back"
        + (f"; {checker.pending} read-backs not judged yet" if checker.pending else ""),
    )
    for (region, sink), t in sorted(checker.tallies.items()):
        p50, p99 = t.quantile(0.5), t.quantile(0.99)
        all_converged = t.probed > 0 and t.converged == t.probed
        table.add_row(
            region,
            sink,
            str(t.probed),
            f"{t.share:.4%}",
            f"{t.nines:.1f}" + ("+" if all_converged else ""),
            str(t.recovered),
            f"[red]{t.stale_count}[/red]" if t.stale_count else "0",
            f"[red]{t.unapplied}[/red]" if t.unapplied else "0",
            "-" if p50 is None else f"{p50:.0f} ms",
            "-" if p99 is None else f"{p99:.0f} ms",
        )
    return table


def stale_table(checker: Any, *, limit: int = 20) -> Table | None:
    """The purges not converged, with their stale keys and why: `limit` per (region, sink)
    and a count of the rest; None when there are none."""
    rows = [(k, t) for k, t in sorted(checker.tallies.items()) if t.stale_count]
    if not rows:
        return None
    table = Table("region", "sink", "event", "stale keys", "why", title="stale purges")
    for (region, sink), t in rows:
        for entry in list(t.stale.values())[:limit]:
            named = ", ".join(entry.keys[:4]) + (
                f" (+{len(entry.keys) - 4})" if len(entry.keys) > 4 else ""
            )
            table.add_row(region, sink, entry.event_id, named, entry.reason)
        if t.stale_count > limit:
            table.add_row(region, sink, f"... and {t.stale_count - limit} more", "", "")
    return table
