"""`cachesync`: run the pipeline's roles, manage the topology, produce demo traffic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from consumers.errors import ConfigError
from consumers.settings import Settings, load_settings

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
run_app = typer.Typer(help="Run pipeline roles.", no_args_is_help=True)
topology_app = typer.Typer(
    help="Check, show and apply topology/topology.yaml.", no_args_is_help=True
)
app.add_typer(run_app, name="run")
app.add_typer(topology_app, name="topology")

console = Console(stderr=True)
T = TypeVar("T")

SINK_KINDS = ["redis"]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None


def _run_until_signal(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run `main(stop)`; the first Ctrl-C/SIGTERM sets `stop` (drain), a second one aborts."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        hits = 0

        def on_signal() -> None:
            nonlocal hits
            hits += 1
            if hits == 1:
                console.print(
                    "[yellow]stopping: finishing in-flight batches (Ctrl-C again to abort)[/yellow]"
                )
                stop.set()
            else:
                for task in asyncio.all_tasks(loop):
                    task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return await main(stop)

    try:
        return asyncio.run(runner())
    except asyncio.CancelledError:
        console.print("[red]aborted[/red]")
        raise typer.Exit(130) from None


def _build_sink(settings: Settings, region: str, kind: str):  # type: ignore[no-untyped-def]
    from consumers.sinks.redis import RedisSink

    if region not in settings.topology.regions:
        raise typer.BadParameter(
            f"unknown region {region!r}; topology has {sorted(settings.topology.regions)}"
        )
    if kind == "redis":
        return RedisSink(region, settings.region_redis_urls[region])
    raise typer.BadParameter(f"unknown sink {kind!r}; known: {SINK_KINDS}")


async def _report(roles: list, stop: asyncio.Event, every: float = 2.0) -> None:  # type: ignore[type-arg]
    from consumers.roles import MapperRole

    last = time.monotonic()
    last_records = {r.name: 0 for r in roles}
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
        now = time.monotonic()
        parts = []
        for role in roles:
            rate = (role.stats.records - last_records[role.name]) / max(now - last, 1e-6)
            last_records[role.name] = role.stats.records
            if isinstance(role, MapperRole):
                produced = " ".join(f"{r}={n}" for r, n in sorted(role.stats.produced.items()))
                parts.append(
                    f"[bold]mapper[/bold] events={role.stats.records} ({rate:.0f}/s) commands: {produced}"
                )
            else:
                parts.append(
                    f"[bold]{role.name}[/bold] applied={role.stats.applied} skipped={role.stats.skipped}"
                )
            if role.stats.dead_lettered:
                parts.append(f"[red]dlq={role.stats.dead_lettered}[/red]")
        last = now
        console.print(" | ".join(parts))


@run_app.command("mapper")
def run_mapper(verbose: bool = False) -> None:
    """Consume content topics and produce purge/warm commands per region."""
    _setup_logging(verbose)
    settings = _settings()
    _run_until_signal(lambda stop: _run(settings, stop, mapper=True, sinks=[]))


@run_app.command("sink")
def run_sink(
    region: Annotated[str, typer.Option(help="Region whose command topic to consume")],
    sink: Annotated[str, typer.Option(help=f"Sink kind: {', '.join(SINK_KINDS)}")] = "redis",
    verbose: bool = False,
) -> None:
    """Apply one region's commands to one cache tier."""
    _setup_logging(verbose)
    settings = _settings()
    _run_until_signal(lambda stop: _run(settings, stop, mapper=False, sinks=[(region, sink)]))


@run_app.command("all")
def run_all(
    demo: Annotated[bool, typer.Option(help="Also produce demo traffic")] = False,
    rate: Annotated[float, typer.Option(help="Demo events per second")] = 20.0,
    weddings: Annotated[int, typer.Option(help="Demo weddings")] = 20,
    verbose: bool = False,
) -> None:
    """Every role in one process (for development): the mapper and each region's sinks."""
    _setup_logging(verbose)
    settings = _settings()
    sinks = [(region, kind) for region in settings.topology.regions for kind in SINK_KINDS]
    _run_until_signal(
        lambda stop: _run(
            settings,
            stop,
            mapper=True,
            sinks=sinks,
            demo_rate=rate if demo else None,
            weddings=weddings,
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
) -> None:
    from consumers.demo import run_demo
    from consumers.roles import MapperRole, Role, SinkRole, run_roles
    from topology.admin import apply_topics

    await apply_topics(settings.kafka_bootstrap_servers, settings.topology, settings.topic_prefix)
    roles: list[Role] = []
    if mapper:
        roles.append(MapperRole(settings))
    roles.extend(SinkRole(settings, _build_sink(settings, region, kind)) for region, kind in sinks)
    console.print(
        f"[green]running[/green] {', '.join(r.name for r in roles)} against {settings.kafka_bootstrap_servers}"
    )
    extra: list[asyncio.Task[Any]] = [asyncio.create_task(_report(roles, stop))]
    if demo_rate is not None:
        console.print(f"[green]demo[/green]: {weddings} weddings, {demo_rate:g} events/s")
        extra.append(
            asyncio.create_task(run_demo(settings, stop, rate=demo_rate, weddings=weddings))
        )
    try:
        await run_roles(roles, stop)
    finally:
        stop.set()
        await asyncio.gather(*extra, return_exceptions=True)
    console.print("[green]stopped cleanly[/green]: offsets committed for every applied batch")


@topology_app.command("apply")
def topology_apply() -> None:
    """Create missing topics, grow partitions and set retention (idempotent)."""
    from topology.admin import apply_topics

    settings = _settings()
    changes = asyncio.run(
        apply_topics(settings.kafka_bootstrap_servers, settings.topology, settings.topic_prefix)
    )
    table = Table("topic", "change")
    for change in changes:
        table.add_row(change.topic, change.action)
    Console().print(table)


@topology_app.command("check")
def topology_check() -> None:
    """Validate the topology against the schemas; list every problem with its location."""
    settings = _settings()
    topo = settings.topology
    Console().print(
        f"[green]ok[/green]: {settings.topology_file}: {len(topo.rules)} rules, "
        f"{len(topo.regions)} regions, {len(topo.topics.content)} content topics"
    )


@topology_app.command("show")
def topology_show() -> None:
    """Print how each event type becomes commands."""
    settings = _settings()
    topo = settings.topology
    table = Table(
        "event",
        "topic",
        "purge (every region)",
        "warm (wedding's regions)",
        title="event -> commands",
    )
    for event_type, rule in topo.rules.items():
        purge = "\n".join(
            f"{section}: {', '.join(items)}"
            for section, items in (
                ("keys", rule.purge.keys),
                ("tags", rule.purge.tags),
                ("urls", rule.purge.urls),
                ("prefixes", rule.purge.prefixes),
            )
            if items
        )
        if rule.fanout:
            purge += f"\nfan-out: {rule.fanout}"
            if rule.per_wedding:
                purge += " -> " + ", ".join(rule.per_wedding.templates())
        warm = "\n".join(rule.warm.templates()) if rule.warm else "-"
        if rule.index:
            purge += f"\nindex: {rule.index}"
        table.add_row(event_type, topo.content_topic_for(event_type).name, purge, warm)
    Console().print(table)


@app.command("demo")
def demo(
    rate: Annotated[float, typer.Option(help="Events per second")] = 20.0,
    weddings: Annotated[int, typer.Option(help="Number of weddings")] = 20,
    count: Annotated[int | None, typer.Option(help="Stop after this many events")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for a repeatable run")] = None,
) -> None:
    """Produce realistic wedding traffic to the content topics."""
    from consumers.demo import run_demo

    _setup_logging(False)
    settings = _settings()

    def show(event_type: str, record: dict) -> None:  # type: ignore[type-arg]
        ident = record.get("wedding_id") or record.get("vendor_id")
        console.print(f"  {event_type:<22} {ident}")

    stats = _run_until_signal(
        lambda stop: run_demo(
            settings, stop, rate=rate, weddings=weddings, limit=count, seed=seed, on_event=show
        )
    )
    console.print(f"produced {stats.produced} events")


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        sys.exit(2)
