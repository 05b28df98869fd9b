"""`cachesync run`: the pipeline's roles, one or all, until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated, Any

import typer

from cachesync.consumers.cli.common import (
    console,
    load_settings_or_exit,
    run_until_signal,
    setup_logging,
    start_telemetry,
)
from cachesync.consumers.cli.consistency import consistency_table, stale_table
from cachesync.consumers.errors import ConfigError
from cachesync.consumers.pipeline import assemble
from cachesync.consumers.pipeline.roles import MapperRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.registry import SINK_KINDS

run_app = typer.Typer(help="Run pipeline roles.", no_args_is_help=True)


def _runnable_sinks(settings: Settings) -> list[tuple[str, str]]:
    """Every (region, sink) whose provider is configured; a note for each one skipped."""
    runnable, skipped = assemble.runnable_sinks(settings)
    for s in skipped:
        console.print(f"[dim]skipping sink {s.kind} in {s.region}: {s.reason}[/dim]")
    return runnable


async def _report(
    roles: list[Any], stop: asyncio.Event, every: float = 2.0, checker: Any = None
) -> None:
    """Every `every` seconds: the mapper's rate, each region's sinks, the consistency read-backs."""

    last = time.monotonic()
    last_records = {r.name: 0 for r in roles}
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
        now = time.monotonic()
        lines = []
        regions: dict[str, list[str]] = {}
        for role in roles:
            rate = (role.stats.records - last_records[role.name]) / max(now - last, 1e-6)
            last_records[role.name] = role.stats.records
            dlq = f" [red]dlq={role.stats.dead_lettered}[/red]" if role.stats.dead_lettered else ""
            if isinstance(role, MapperRole):
                produced = " ".join(f"{r}={n}" for r, n in sorted(role.stats.produced.items()))
                lines.append(
                    f"[bold]mapper[/bold] {role.stats.records} events ({rate:.0f}/s) -> commands {produced}{dlq}"
                )
            else:
                regions.setdefault(role.sink.region, []).append(
                    f"{role.sink.kind} {role.stats.applied}{dlq}"
                )
        for region, parts in sorted(regions.items()):
            lines.append(f"  [bold]{region}[/bold] applied: " + " · ".join(parts))
        if checker is not None and checker.tallies:
            lines.append(
                "  [bold]consistency[/bold] "
                + " · ".join(
                    f"{r}/{k} {t.converged}/{t.probed}"
                    for (r, k), t in sorted(checker.tallies.items())
                )
            )
        last = now
        console.print("\n".join(lines), soft_wrap=True)


@run_app.command("mapper")
def run_mapper(verbose: bool = False) -> None:
    """Consume content topics and produce purge/warm commands per region."""
    setup_logging(verbose)
    settings = load_settings_or_exit()
    start_telemetry(settings, "mapper")
    run_until_signal(lambda stop: _run(settings, stop, mapper=True, sinks=[]))


@run_app.command("sink")
def run_sink(
    region: Annotated[str, typer.Option(help="Region whose command topic to consume")],
    sink: Annotated[str, typer.Option(help=f"Sink kind: {', '.join(SINK_KINDS)}")] = "redis",
    verbose: bool = False,
) -> None:
    """Apply one region's commands to one cache tier."""
    setup_logging(verbose)
    settings = load_settings_or_exit()
    start_telemetry(settings, f"sink-{sink}")
    run_until_signal(lambda stop: _run(settings, stop, mapper=False, sinks=[(region, sink)]))


@run_app.command("all")
def run_all(
    demo: Annotated[bool, typer.Option(help="Also produce demo traffic")] = False,
    rate: Annotated[float, typer.Option(help="Demo events per second")] = 20.0,
    weddings: Annotated[int, typer.Option(help="Demo weddings")] = 20,
    consistency: Annotated[
        float, typer.Option(help="Share of purges the background checker reads back (0: off)")
    ] = 0.2,
    verbose: bool = False,
) -> None:
    """Every role in one process (for development): the mapper and each region's sinks."""
    setup_logging(verbose)
    settings = load_settings_or_exit()
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
            consistency=consistency,
        )
    )


async def _run(
    settings: Settings,
    stop: asyncio.Event,
    *,
    mapper: bool,
    sinks: list[tuple[str, str]],
    demo_rate: float | None = None,
    weddings: int = 20,
    consistency: float = 0.0,
) -> None:
    from cachesync.consumers.ops.consistency import ConsistencyChecker
    from cachesync.consumers.ops.demo import run_demo

    try:
        roles = assemble.build_roles(settings, mapper=mapper, sinks=sinks)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    console.print(
        f"[green]running[/green] {', '.join(r.name for r in roles)} against {settings.kafka_bootstrap_servers}"
    )
    checker = ConsistencyChecker(settings, sample=consistency) if consistency > 0 else None
    companions: list[assemble.Companion] = [lambda stop: _report(roles, stop, checker=checker)]
    if checker is not None:
        console.print(
            f"[green]consistency checker[/green]: reading back {consistency:.0%} of purges"
        )
        companions.append(checker.run)
    if demo_rate is not None:
        console.print(f"[green]demo[/green]: {weddings} weddings, {demo_rate:g} events/s")
        companions.append(lambda stop: run_demo(settings, stop, rate=demo_rate, weddings=weddings))
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
