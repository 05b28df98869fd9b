"""`cachesync run`: the pipeline's roles, one or all, until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

import typer

from cachesync.consumers.cli.common import (
    console,
    load_settings_or_exit,
    require_services,
    run_until_signal,
    setup_logging,
    start_telemetry,
)
from cachesync.consumers.cli.consistency import consistency_table, stale_table
from cachesync.consumers.cli.terminal import Commands, Verbose
from cachesync.consumers.errors import ConfigError
from cachesync.consumers.ops.demo import DEMO_SAMPLED
from cachesync.consumers.pipeline import assemble
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.registry import SINK_KINDS

run_app = Commands(help="Run pipeline roles.", no_args_is_help=True)


def _runnable_sinks(settings: Settings) -> list[tuple[str, str]]:
    """Every (region, sink) whose provider is configured; a note for each one skipped."""
    runnable, skipped = assemble.runnable_sinks(settings)
    for s in skipped:
        console.print(f"[dim]skipping sink {s.kind} in {s.region}: {s.reason}[/dim]")
    return runnable


async def _report(
    settings: Settings,
    stop: asyncio.Event,
    *,
    mapper: bool,
    sinks: list[tuple[str, str]],
    every: float = 2.0,
    checker: Any = None,
    demo: Any = None,
) -> None:
    """Every `every` seconds: the figures `cachesync status` shows, from the same metrics
    (events, commands per region, each region's sinks), the consistency read-backs and,
    now and then, an event id to follow with `cachesync trace`."""
    from cachesync.consumers.ops.status import local_snapshot, run_lines

    prev = local_snapshot()
    reports = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
        cur = local_snapshot()
        lines = run_lines(settings, cur, prev, mapper=mapper, sinks=sinks)
        prev = cur
        if checker is not None and checker.tallies:
            lines.append(
                "  [bold]consistency[/bold] "
                + " · ".join(
                    f"{r}/{k} {t.converged}/{t.probed}"
                    for (r, k), t in sorted(checker.tallies.items())
                )
            )
        if demo is not None:
            lines.extend(_demo_lines(demo, hint=reports % _HINT_EVERY == 0))
        reports += 1
        console.print("\n".join(lines), soft_wrap=True, highlight=False)


# Every this many reports (20 s), `run` names one event to follow.
_HINT_EVERY = 10


def _demo_lines(demo: Any, *, hint: bool) -> list[str]:
    """The demo's achieved rate when it falls behind, and an event id to trace."""
    lines = []
    if demo.behind:
        lines.append(
            f"  [yellow]demo: {demo.achieved_rate:.1f} events/s, below the "
            f"{demo.rate_asked:g}/s asked[/yellow]"
        )
    if hint and demo.last_event is not None:
        event_type, event_id, entity = demo.last_event
        lines.append(
            f"  [dim]follow one: cachesync trace {event_id} --wait 10  ({event_type}); "
            f"its entity's events: cachesync trace {entity}[/dim]"
        )
    return lines


@run_app.command("mapper")
def run_mapper(verbose: Verbose = False) -> None:
    """Consume content topics and produce purge/warm commands per region."""
    setup_logging(verbose)
    settings = load_settings_or_exit()
    require_services(settings, state=True)
    start_telemetry(settings, "mapper")
    run_until_signal(
        lambda stop: _run(settings, stop, mapper=True, sinks=[]), grace_s=settings.shutdown_grace_s
    )


@run_app.command("sink")
def run_sink(
    region: Annotated[str, typer.Option(help="Region whose command topic to consume")],
    sink: Annotated[str, typer.Option(help=f"Sink kind: {', '.join(SINK_KINDS)}")] = "redis",
    verbose: Verbose = False,
) -> None:
    """Apply one region's commands to one cache tier."""
    setup_logging(verbose)
    settings = load_settings_or_exit()
    if region in settings.topology.regions:  # else the sink's own error names the region
        require_services(settings, sink_regions=[region])
    start_telemetry(settings, f"sink-{sink}")
    run_until_signal(
        lambda stop: _run(settings, stop, mapper=False, sinks=[(region, sink)]),
        grace_s=settings.shutdown_grace_s,
    )


@run_app.command("all")
def run_all(
    demo: Annotated[bool, typer.Option(help="Also produce demo traffic")] = False,
    rate: Annotated[float, typer.Option(help="Demo events per second")] = 20.0,
    weddings: Annotated[int, typer.Option(help="Demo weddings")] = 20,
    sampled: Annotated[
        float, typer.Option(help="Share of demo events whose traces the platform samples")
    ] = DEMO_SAMPLED,
    consistency: Annotated[
        float, typer.Option(help="Share of purges the background checker reads back (0: off)")
    ] = 0.2,
    verbose: Verbose = False,
) -> None:
    """Every role in one process (for development): the mapper and each region's sinks."""
    setup_logging(verbose)
    settings = load_settings_or_exit()
    require_services(settings, sink_regions=settings.topology.regions, state=True)
    start_telemetry(settings, "all")
    sinks = _runnable_sinks(settings)
    run_until_signal(
        lambda stop: _run(
            settings,
            stop,
            mapper=True,
            sinks=sinks,
            demo_rate=rate if demo else None,
            weddings=weddings,
            sampled=sampled,
            consistency=consistency,
        ),
        grace_s=settings.shutdown_grace_s,
    )


async def _run(
    settings: Settings,
    stop: asyncio.Event,
    *,
    mapper: bool,
    sinks: list[tuple[str, str]],
    demo_rate: float | None = None,
    weddings: int = 20,
    sampled: float = DEMO_SAMPLED,
    consistency: float = 0.0,
) -> None:
    from cachesync.consumers.ops.consistency import ConsistencyChecker
    from cachesync.consumers.ops.demo import DemoStats, run_demo

    try:
        roles = assemble.build_roles(settings, mapper=mapper, sinks=sinks)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    console.print(
        f"[green]running[/green] {', '.join(r.name for r in roles)} against {settings.kafka_bootstrap_servers}"
    )
    checker = ConsistencyChecker(settings, sample=consistency) if consistency > 0 else None
    demo = DemoStats() if demo_rate is not None else None
    companions: list[assemble.Companion] = [
        lambda stop: _report(settings, stop, mapper=mapper, sinks=sinks, checker=checker, demo=demo)
    ]
    if checker is not None:
        console.print(
            f"[green]consistency checker[/green]: reading back {consistency:.0%} of purges"
        )
        companions.append(checker.run)
    if demo_rate is not None:
        console.print(
            f"[green]demo[/green]: {weddings} weddings, {demo_rate:g} events/s, "
            f"{sampled:.0%} of their traces sampled"
        )
        companions.append(
            lambda stop: run_demo(
                settings, stop, rate=demo_rate, weddings=weddings, stats=demo, sampled=sampled
            )
        )
    if mapper and sinks:  # run all: each cache tier's own hit ratios (and, with --demo, guests)
        from cachesync.consumers.ops.effectiveness.live import effectiveness_companions

        companions += effectiveness_companions(
            settings,
            lambda lines: console.print("\n".join(lines), soft_wrap=True),
            checker=checker,
            demo=demo_rate is not None,
            weddings=weddings,
        )
    try:
        await assemble.run(settings, stop, roles, companions=companions)
    finally:
        if checker is not None:
            await checker.close()
    if checker is not None and checker.tallies:
        console.print(consistency_table(checker))
        stale = stale_table(checker)
        if stale is not None:
            console.print(stale)
    console.print("[green]stopped cleanly[/green]: offsets committed for every applied batch")
