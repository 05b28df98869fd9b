"""`cachesync trace`: follow one event, or list the events about a wedding or a vendor."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cachesync.consumers.cli.common import (
    load_settings_or_exit,
    parse_time,
    require_services,
    setup_logging,
)
from cachesync.consumers.cli.terminal import TerminalConsole


def trace_cmd(
    event_id: Annotated[
        str | None,
        typer.Argument(help="The platform event's event_id; without it, --wedding or --vendor"),
    ] = None,
    wedding: Annotated[
        str | None, typer.Option(help="List the recent events about this wedding id")
    ] = None,
    vendor: Annotated[
        str | None, typer.Option(help="List the recent events about this vendor id")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="How far back to look: ISO time or 10m/2h/1d; default 7d for an event id, "
            "1h for a list"
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="List at most the newest N events")] = 20,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for an event's pending parts to arrive")
    ] = 0.0,
) -> None:
    """Print where one event went (commands per region, each sink's outcome and latency,
    or why it was dead-lettered), or list the recent events about a wedding or a vendor
    with their ids, types and outcomes."""
    setup_logging(False)
    if event_id is None and wedding is None and vendor is None:
        raise typer.BadParameter("give an EVENT_ID, or --wedding W / --vendor V to find one")
    if event_id is not None and (wedding is not None or vendor is not None):
        raise typer.BadParameter("give an EVENT_ID or --wedding/--vendor, not both")
    settings = load_settings_or_exit()
    require_services(settings)
    if event_id is None:
        _list(settings, wedding, vendor, parse_time(since or "1h"), limit)
    else:
        _trace(settings, event_id, parse_time(since or "7d"), wait)


def _trace(settings: Any, event_id: str, since_ms: int, wait: float) -> None:
    from cachesync.consumers.ops.trace import expected_sinks, read_trace, render

    expected = expected_sinks(settings)

    async def main() -> Any:
        deadline = time.monotonic() + wait
        while True:
            view = await read_trace(settings, event_id, since_ms=since_ms)
            done = view.mapper is not None and not view.pending(expected)
            if done or (view.dead_letters and view.mapper is None):
                return view
            if time.monotonic() >= deadline:
                return view
            await asyncio.sleep(0.5)

    view = asyncio.run(main())
    out = TerminalConsole()
    out.print(render(view, expected))
    if not view.found:
        raise typer.Exit(1)
    pending = view.pending(expected)
    if view.mapper is None and view.dead_letters:
        out.print("[red]dead-lettered[/red]: no cache work was done for it")
    elif pending:
        out.print(
            f"[yellow]{len(pending)} sink steps pending[/yellow] (not applied yet, or that sink is not running)"
        )
    else:
        out.print("[green]complete[/green]: every expected sink reported")


def _list(
    settings: Any, wedding: str | None, vendor: str | None, since_ms: int, limit: int
) -> None:
    from cachesync.consumers.ops.trace import find_events

    events = asyncio.run(
        find_events(settings, wedding=wedding, vendor=vendor, since_ms=since_ms, limit=limit)
    )
    who = " or ".join(
        f"{kind} {value}" for kind, value in (("wedding", wedding), ("vendor", vendor)) if value
    )
    out = TerminalConsole()
    if not events:
        out.print(f"no events about {who} since {_when(since_ms)} UTC (try a longer --since)")
        raise typer.Exit(1)
    table = Table("time (UTC)", "event type", "event id", "outcome", title=f"events about {who}")
    for event in events:
        colour = (
            "red"
            if event.dead_letters and event.mapper is None
            else "yellow"
            if event.mapper is None
            else "default"
        )
        table.add_row(
            _when(event.occurred_at),
            event.event_type,
            event.event_id,
            f"[{colour}]{escape(event.outcome)}[/{colour}]",
        )
    out.print(table)
    done = [e for e in events if e.mapper is not None or e.dead_letters] or events
    out.print(f"follow one: cachesync trace {done[-1].event_id}", highlight=False)


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
