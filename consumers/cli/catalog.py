"""`cachesync topology` and `cachesync schemas`: check, show and apply what the pipeline reads."""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console
from rich.table import Table

from cachesync.consumers.cli.common import (
    console,
    load_settings_or_exit,
    require_services,
)
from cachesync.consumers.cli.terminal import Commands

topology_app = Commands(help="Check, show and apply topology/topology.yaml.", no_args_is_help=True)

schemas_app = Commands(help="List and check the Avro schemas in schemas/.", no_args_is_help=True)


@topology_app.command("apply")
def topology_apply() -> None:
    """Create missing topics, grow partitions and set retention (idempotent), at home and
    on each region's own cluster (KAFKA_BOOTSTRAP_SERVERS_<REGION>)."""
    from cachesync.consumers.pipeline.assemble import prepare_clusters

    settings = load_settings_or_exit()
    require_services(settings)
    changes = asyncio.run(prepare_clusters(settings))

    table = Table("topic", "change")
    for change in changes:
        table.add_row(change.topic, change.action)
    Console().print(table)


@topology_app.command("check")
def topology_check() -> None:
    """Validate the topology against the schemas; list every problem with its location."""
    from cachesync.topology import unhandled_events

    settings = load_settings_or_exit()
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

    settings = load_settings_or_exit()
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
