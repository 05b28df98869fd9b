"""`cachesync`: run the pipeline's roles, manage the topology, produce demo traffic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from cachesync.consumers.errors import ConfigError
from cachesync.consumers.pipeline import assemble
from cachesync.consumers.pipeline.roles import MapperRole
from cachesync.consumers.settings import Settings, load_settings
from cachesync.consumers.sinks.registry import PURGE_KINDS, SINK_KINDS

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


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("aiokafka", "kafka", "httpx", "httpcore", "botocore", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None


def _telemetry(settings: Settings, role: str) -> None:
    """Tracing, metrics (/metrics on CACHESYNC_METRICS_PORT) and library instrumentation."""
    from cachesync.consumers.telemetry import setup_telemetry

    port = settings.metrics_port or None
    try:
        setup_telemetry(f"cachesync-{role}", metrics_port=port)
    except OSError as exc:
        console.print(
            f"[red]cannot serve /metrics on port {port}:[/red] {exc.strerror} (set CACHESYNC_METRICS_PORT)"
        )
        raise typer.Exit(2) from None
    if port:
        console.print(f"[dim]metrics on http://127.0.0.1:{port}/metrics[/dim]")


def _run_until_signal(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run `main(stop)` until Ctrl-C/SIGTERM (drain), a second one aborts."""
    try:
        return assemble.run_until_signal(
            main,
            on_stop=lambda: console.print(
                "[yellow]stopping: finishing in-flight batches (Ctrl-C again to abort)[/yellow]"
            ),
        )
    except asyncio.CancelledError:
        console.print("[red]aborted[/red]")
        raise typer.Exit(130) from None


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
    _setup_logging(verbose)
    settings = _settings()
    _telemetry(settings, "mapper")
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
    _telemetry(settings, f"sink-{sink}")
    _run_until_signal(lambda stop: _run(settings, stop, mapper=False, sinks=[(region, sink)]))


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
    _setup_logging(verbose)
    settings = _settings()
    _telemetry(settings, "all")
    sinks = _runnable_sinks(settings)
    _run_until_signal(
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


@topology_app.command("apply")
def topology_apply() -> None:
    """Create missing topics, grow partitions and set retention (idempotent)."""
    from cachesync.topology.admin import apply_topics

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
    from cachesync.topology import unhandled_events

    settings = _settings()
    topo = settings.topology
    unhandled = unhandled_events(topo, settings.catalog.types("events"))
    for event_type in unhandled:
        console.print(
            f"[red]unhandled[/red] {settings.topology_file}: event type {event_type!r} has a "
            "schema but no rule: the mapper drops it (add a rule, or list it under ignored_events)"
        )
    if unhandled:
        raise typer.Exit(1)
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
    from cachesync.schemas import SchemaCatalog, check_catalog

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
    from cachesync.schemas import SchemaCatalog

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

    from cachesync.consumers.ops.replay import replay

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


@app.command("consistency")
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

    _setup_logging(False)
    settings = _settings()
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
            since_ms=_parse_time(since) if since is not None else None,
            sinks=sinks,
        )
        halt = asyncio.Event()
        task = asyncio.create_task(checker.run(halt))
        try:
            with console.status("reading the command and audit topics...") as status:
                await _wait_any(checker.ready, stop, task=task)
                if checker.ready.is_set() and not stop.is_set():
                    await _collect(checker, stop, duration, status)
                    await _settle(checker, stop, task, status, within=window + give_up + 5.0)
        finally:
            halt.set()
            await task
            await checker.close()
        return checker

    started = time.monotonic()
    checker = _run_until_signal(main)
    out = Console()
    out.print(consistency_table(checker))
    stale = stale_table(checker, limit=show)
    if stale is not None:
        out.print(stale)
    console.print(f"[dim]took {time.monotonic() - started:.1f} s[/dim]")


async def _collect(checker: Any, stop: asyncio.Event, duration: float, status: Any) -> None:
    """Let the checker collect issued purges for `duration` seconds, showing its progress."""
    deadline = time.monotonic() + duration
    console.print(f"[dim]collecting the purges issued in the next {duration:g} s[/dim]")
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        status.update(
            f"collecting issued purges: {checker.expected} so far, {left:.0f} s left; "
            f"{checker.waiting_for()}"
        )
        await _wait_any(stop, within=min(left, 0.5))


async def _settle(
    checker: Any, stop: asyncio.Event, task: asyncio.Task[Any], status: Any, *, within: float
) -> None:
    """Stop collecting, then wait until every collected purge is judged, saying what for."""
    checker.stop_expecting()
    console.print(f"[dim]collected {checker.expected} purges; {checker.waiting_for()}[/dim]")
    deadline = time.monotonic() + within
    while not (checker.settled or stop.is_set() or task.done()):
        if time.monotonic() > deadline:
            console.print(f"[yellow]stopped waiting after {within:g} s[/yellow]")
            break
        status.update(checker.waiting_for() + "...")
        await _wait_any(checker.all_judged, stop, task=task, within=0.25)


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
        "staleness p50",
        "staleness p99",
        title=f"consistency (window {checker.window_s:g}s)",
        caption=f"{checker.pending} purges not judged yet" if checker.pending else None,
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


@app.command("trace")
def trace_cmd(
    event_id: Annotated[str, typer.Argument(help="The platform event's event_id")],
    since: Annotated[str, typer.Option(help="How far back to look: ISO time or 15m/2h/1d")] = "7d",
    wait: Annotated[float, typer.Option(help="Seconds to wait for pending parts to arrive")] = 0.0,
) -> None:
    """Print where one event went: commands per region, each sink's outcome and latency."""
    from cachesync.consumers.ops.trace import read_trace, render

    settings = _settings()
    expected = _expected_sinks(settings)

    async def main() -> Any:
        deadline = time.monotonic() + wait
        while True:
            view = await read_trace(settings, event_id, since_ms=_parse_time(since))
            if (
                not view.pending(expected) and view.mapper is not None
            ) or time.monotonic() >= deadline:
                return view
            await asyncio.sleep(0.5)

    view = asyncio.run(main())
    out = Console()
    out.print(render(view, expected))
    pending = view.pending(expected)
    if view.event_type is None:
        raise typer.Exit(1)
    if pending:
        out.print(
            f"[yellow]{len(pending)} sink steps pending[/yellow] (not applied yet, or that sink is not running)"
        )
    else:
        out.print("[green]complete[/green]: every expected sink reported")


def _expected_sinks(settings: Settings) -> Callable[[str, str], list[str]]:
    """Which sinks should report on a command of a kind in a region (the ones configured)."""
    from cachesync.consumers.sinks.registry import WARM_KINDS, available

    def expected(region: str, kind: str) -> list[str]:
        return available(settings, region, WARM_KINDS if kind == "warm" else PURGE_KINDS)

    return expected


@app.command("status")
def status_cmd(
    metrics_url: Annotated[str, typer.Option(help="The pipeline's /metrics")] = "",
    every: Annotated[float, typer.Option(help="Refresh interval, seconds")] = 2.0,
    once: Annotated[bool, typer.Option(help="Print one snapshot and exit")] = False,
) -> None:
    """Live view of throughput, lag, purge latency and hit ratios per region and sink."""
    from rich.live import Live

    from cachesync.consumers.ops.status import collect, render

    settings = _settings()
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

    _run_until_signal(main)


@app.command("demo")
def demo(
    rate: Annotated[float, typer.Option(help="Events per second")] = 20.0,
    weddings: Annotated[int, typer.Option(help="Number of weddings")] = 20,
    count: Annotated[int | None, typer.Option(help="Stop after this many events")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for a repeatable run")] = None,
) -> None:
    """Produce realistic wedding traffic to the content topics."""
    from cachesync.consumers.ops.demo import run_demo

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


dlq_app = typer.Typer(
    help="List, show and re-drive the dead-letter topic's records.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")


def _dlq_call(call: Coroutine[Any, Any, T]) -> T:
    """Run one dlq operation; a bad argument or an unavailable service is a message, not a traceback."""
    from cachesync.consumers.errors import TransientError

    try:
        return asyncio.run(call)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    except TransientError as exc:
        console.print(f"[red]unavailable:[/red] {exc}")
        raise typer.Exit(1) from None


@dlq_app.command("list")
def dlq_list(
    since: Annotated[
        str | None,
        typer.Option(help="Dead-lettered since: ISO 8601 or 15m/2h/1d ago; default: all"),
    ] = None,
    until: Annotated[str | None, typer.Option(help="Dead-lettered before (exclusive)")] = None,
    reason: Annotated[list[str] | None, typer.Option(help="Only this reason (repeatable)")] = None,
    limit: Annotated[int, typer.Option(help="Print at most the newest N")] = 100,
) -> None:
    """Dead letters: id, time, reason, origin, consumer, event and error, and if re-driven."""
    from cachesync.consumers.ops import dlq

    _setup_logging(False)
    settings = _settings()
    letters = _dlq_call(
        dlq.read_dead_letters(
            settings,
            since_ms=_parse_time(since) if since else None,
            until_ms=_parse_time(until) if until else None,
            reasons=reason or (),
        )
    )
    out = Console()
    out.print(dlq.list_table(letters[-limit:] if limit > 0 else letters))
    if len(letters) > limit > 0:
        out.print(f"[dim]{len(letters) - limit} older not shown (--limit)[/dim]")


@dlq_app.command("show")
def dlq_show(
    dead_letter_id: Annotated[str, typer.Argument(help="The id `dlq list` prints (0:17)")],
) -> None:
    """One dead letter in full: headers, payload (decoded where it decodes), re-drives."""
    from cachesync.consumers.ops import dlq

    _setup_logging(False)
    settings = _settings()
    letter = _dlq_call(dlq.find_dead_letter(settings, dead_letter_id))
    if letter is None:
        console.print(f"[red]no dead letter {dead_letter_id}[/red] on {settings.dead_letter_topic}")
        raise typer.Exit(1)
    Console().print(dlq.detail_table(letter))


@dlq_app.command("redrive")
def dlq_redrive(
    reason: Annotated[
        list[str] | None, typer.Option(help="Those of this reason (repeatable)")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Those dead-lettered since: ISO 8601 or 15m/2h/1d ago")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Those dead-lettered before (exclusive)")
    ] = None,
    id_: Annotated[
        list[str] | None, typer.Option("--id", help="This dead letter (repeatable)")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print what would be sent, send nothing")] = False,
    force: Annotated[bool, typer.Option(help="Re-drive again what was re-driven before")] = False,
) -> None:
    """Re-send chosen dead letters to their original topics, after a fix; exit 1 if any is not sent."""
    from cachesync.consumers.ops import dlq

    _setup_logging(False)
    settings = _settings()
    report = _dlq_call(
        dlq.redrive(
            settings,
            reasons=reason or (),
            ids=id_ or (),
            since_ms=_parse_time(since) if since else None,
            until_ms=_parse_time(until) if until else None,
            dry_run=dry_run,
            force=force,
        )
    )
    out = Console()
    out.print(dlq.redrive_table(report))
    verb = "would send" if dry_run else "sent"
    out.print(
        f"{verb} {len(report.sent)} of {len(report.outcomes)} chosen dead letters"
        + (f", {len(report.not_sent)} not sent" if report.not_sent else "")
        + (f", {len(report.unknown_ids)} ids not found" if report.unknown_ids else "")
    )
    if report.not_sent or report.unknown_ids:
        raise typer.Exit(1)


vendor_api_app = typer.Typer(
    help="Call external vendor APIs through the vendor API cache.", no_args_is_help=True
)
app.add_typer(vendor_api_app, name="vendor-api")


@vendor_api_app.command("get")
def vendor_api_get(
    api: Annotated[str, typer.Argument(help="Integration, as named in topology vendor_apis")],
    path: Annotated[str, typer.Argument(help="Path under the integration's base_url")],
    vendor: Annotated[str, typer.Option(help="Platform vendor id; tags the entry")],
    region: Annotated[str, typer.Option(help="Region whose Redis holds the cache")] = "",
    wedding: Annotated[
        str | None, typer.Option(help="Wedding id, for wedding-scoped calls")
    ] = None,
) -> None:
    """GET through the cache: prints the cache status on stderr, the JSON body on stdout."""
    import json

    from cachesync.consumers.errors import VendorApiError
    from cachesync.consumers.vendor_api import VendorApiClient, VendorResponse

    settings = _settings()
    region = region or settings.topology.default_region
    if region not in settings.region_redis_urls:
        console.print(f"[red]unknown region {region!r}[/red]")
        raise typer.Exit(2)

    async def fetch() -> VendorResponse:
        url = settings.region_redis_urls[region]
        async with VendorApiClient.from_topology(settings.topology, url) as client:
            return await client.get(api, path, vendor_id=vendor, wedding_id=wedding)

    try:
        response = asyncio.run(fetch())
    except VendorApiError as exc:
        console.print(f"[red]{type(exc).__name__}:[/red] {exc}")
        raise typer.Exit(1) from None
    reason = f" ({response.stale_reason}: {response.error or ''})" if response.is_stale else ""
    console.print(f"{response.cache_status}{reason} age={response.age_s:.0f}s {response.url}")
    typer.echo(json.dumps(response.json(), indent=2))


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        sys.exit(2)
