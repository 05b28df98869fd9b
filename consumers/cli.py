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
schemas_app = typer.Typer(help="List and check the Avro schemas in schemas/.", no_args_is_help=True)
app.add_typer(topology_app, name="topology")
app.add_typer(schemas_app, name="schemas")

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
    from rich.tree import Tree

    settings = _settings()
    topo = settings.topology
    out = Console()
    for event_type, rule in topo.rules.items():
        topic = topo.content_topic_for(event_type).name
        tree = Tree(
            f"[bold]{event_type}[/bold]  [dim]topic {topic}, entity {rule.entity}, scope {rule.scope}[/dim]"
        )
        if rule.index:
            tree.add(f"index: {rule.index}")
        purge = tree.add(f"purge -> every region ({', '.join(topo.regions)})")
        for section in ("keys", "tags", "urls", "prefixes"):
            items = getattr(rule.purge, section)
            if items:
                purge.add(f"{section:<9}{', '.join(items)}", highlight=False)
        if rule.fanout:
            fan = purge.add(f"fan-out: {rule.fanout}, for each wedding")
            for section in ("keys", "tags", "urls", "prefixes"):
                items = getattr(rule.per_wedding, section) if rule.per_wedding else []
                if items:
                    fan.add(f"{section:<9}{', '.join(items)}", highlight=False)
        if rule.warm:
            warm = tree.add(f"warm -> the wedding's regions (priority {rule.warm.priority})")
            for section in ("photos", "vendor_assets", "guest_portal"):
                items = getattr(rule.warm, section)
                if items:
                    warm.add(f"{section:<14}{', '.join(items)}", highlight=False)
        out.print(tree)


@schemas_app.command("check")
def schemas_check() -> None:
    """Fail when a schema version breaks backward or forward compatibility with an older one."""
    from schemas import SchemaCatalog, check_catalog

    catalog = SchemaCatalog()
    problems = check_catalog(catalog)
    for problem in problems:
        console.print(f"[red]incompatible[/red] {problem}")
    if problems:
        raise typer.Exit(1)
    versions = sum(len(catalog.versions(t)) for t in catalog.types())
    Console().print(
        f"[green]ok[/green]: {len(catalog.types())} types, {versions} versions, "
        "every version reads every other (backward and forward)"
    )


@schemas_app.command("list")
def schemas_list() -> None:
    """Every schema type, its versions and the fingerprint of the newest."""
    from schemas import SchemaCatalog

    catalog = SchemaCatalog()
    table = Table("type", "kind", "versions", "fingerprint (newest)")
    for type_name in catalog.types():
        versions = catalog.versions(type_name)
        table.add_row(
            type_name,
            versions[-1].kind,
            ", ".join(f"v{v.version}" for v in versions),
            versions[-1].fingerprint.hex(),
        )
    Console().print(table)


def _parse_time(value: str) -> int:
    """Epoch ms from an ISO 8601 time or a relative '15m', '2h', '1d' ago."""
    import datetime as dt
    import re

    match = re.fullmatch(r"(\d+)([smhd])", value.strip())
    if match:
        seconds = int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
        return int((time.time() - seconds) * 1000)
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r}: use ISO 8601 (2026-11-30T05:00Z) or 15m/2h/1d"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp() * 1000)


@app.command("replay")
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

    from consumers.replay import replay

    _setup_logging(False)
    settings = _settings()
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
                since_ms=_parse_time(since),
                until_ms=_parse_time(until) if until else None,
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
