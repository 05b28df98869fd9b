"""`cachesync replay | status | demo`: the operator tools."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cachesync.consumers.cli.common import (
    console,
    load_settings_or_exit,
    parse_time,
    require_services,
    run_until_signal,
    setup_logging,
)
from cachesync.consumers.ops.demo import DEMO_SAMPLED


def replay_cmd(
    since: Annotated[str, typer.Option(help="Start: ISO 8601 time or 15m/2h/1d ago")],
    until: Annotated[str | None, typer.Option(help="End (exclusive); default: now")] = None,
    region: Annotated[
        list[str] | None, typer.Option(help="Only these regions (repeatable)")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan, produce nothing")] = False,
    index_only: Annotated[bool, typer.Option(help="Rebuild the relationship index only")] = False,
    cdn: Annotated[bool, typer.Option(help="Let CDN sinks apply replayed purges")] = True,
) -> None:
    """Re-read content topics for a time window and re-emit commands marked as replay."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from cachesync.consumers.ops.replay import replay

    setup_logging(False)
    settings = load_settings_or_exit()
    require_services(settings, state=True)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("replaying", total=None)
        report = asyncio.run(
            replay(
                settings,
                since_ms=parse_time(since),
                until_ms=parse_time(until) if until else None,
                regions=set(region) if region else None,
                dry_run=dry_run,
                index_only=index_only,
                cdn=cdn,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        )
    mode = "dry run" if dry_run else "index rebuild" if index_only else "replay"
    out = Console()
    out.print(
        f"[bold]{mode}[/bold] {report.replay_id}: {report.records} events in {report.seconds:.1f}s "
        f"({report.events_per_second:.0f}/s)"
    )
    table = Table("event type", "events")
    for event_type, n in sorted(report.events.items()):
        table.add_row(event_type, str(n))
    for reason, n in sorted(report.skipped_bad.items()):
        table.add_row(f"[red]skipped: {reason}[/red]", str(n))
    out.print(table)
    if report.commands:
        table = Table("region", "purge", "warm", "CDN items (urls+tags+prefixes)")
        for r in sorted({r for r, _ in report.commands}):
            table.add_row(
                r,
                str(report.commands[(r, "purge")]),
                str(report.commands[(r, "warm")]),
                str(report.cdn_items[r]) + ("" if cdn else " (CDN sinks skip)"),
            )
        out.print(table)


def status_cmd(
    metrics_url: Annotated[str, typer.Option(help="The pipeline's /metrics")] = "",
    every: Annotated[float, typer.Option(help="Refresh interval, seconds")] = 2.0,
    once: Annotated[bool, typer.Option(help="Print one snapshot and exit")] = False,
) -> None:
    """Live view of throughput, lag, purge latency and hit ratios per region and sink."""
    from rich.live import Live

    from cachesync.consumers.ops.status import collect, render

    setup_logging(False)
    settings = load_settings_or_exit()
    require_services(settings)
    url = metrics_url or f"http://127.0.0.1:{settings.metrics_port or 9464}/metrics"

    async def main(stop: asyncio.Event) -> None:
        prev = None
        cur = await collect(settings, url)
        if once:
            Console().print(render(settings, cur, None))
            return
        with Live(render(settings, cur, None), console=Console(), refresh_per_second=4) as live:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=every)
                prev, cur = cur, await collect(settings, url)
                live.update(render(settings, cur, prev))

    run_until_signal(main)


def demo(
    rate: Annotated[
        float, typer.Option(help="Events per second (a target: the run says what it achieved)")
    ] = 20.0,
    weddings: Annotated[int, typer.Option(help="Number of weddings")] = 20,
    count: Annotated[
        int | None,
        typer.Option(
            help="Stop after this many events, the opening ones (weddings, links) included"
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for a repeatable run")] = None,
    sampled: Annotated[
        float, typer.Option(help="Share of events whose traces the platform samples")
    ] = DEMO_SAMPLED,
) -> None:
    """Produce realistic wedding traffic to the content topics."""
    from cachesync.consumers.ops.demo import DemoStats, run_demo

    setup_logging(False)
    settings = load_settings_or_exit()
    require_services(settings, regions=settings.topology.regions)

    def show(event_type: str, record: dict) -> None:  # type: ignore[type-arg]
        ident = record.get("wedding_id") or record.get("vendor_id")
        console.print(
            f"  {event_type:<22} {ident}  [dim]{record['event_id']}[/dim]", highlight=False
        )

    stats = DemoStats()
    run_until_signal(
        lambda stop: run_demo(
            settings,
            stop,
            rate=rate,
            weddings=weddings,
            limit=count,
            seed=seed,
            stats=stats,
            on_event=show,
            sampled=sampled,
        )
    )
    console.print(f"produced {stats.produced} events ({stats.produced - stats.traffic} opening)")
    achieved = stats.achieved_rate
    if achieved is not None:
        note = (
            f"[yellow]: below the {rate:g}/s asked (the producer or this machine could not keep up)[/yellow]"
            if stats.behind
            else f" ({rate:g}/s asked)"
        )
        console.print(f"traffic at {achieved:.1f} events/s{note}")
