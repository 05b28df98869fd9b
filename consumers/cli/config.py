"""`cachesync config`: every setting, its variable, default, current value and source."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cachesync.consumers.cli.common import load_settings_or_exit
from cachesync.consumers.cli.terminal import TerminalConsole


def config_cmd(
    markdown: Annotated[
        bool,
        typer.Option(
            "--markdown", help="Print README's configuration table instead (no current values)"
        ),
    ] = False,
) -> None:
    """Print every setting: its environment variable, default, current value (secrets
    masked), where the value came from (environment, default, topology) and what it does."""
    from cachesync.consumers.ops.config_reference import markdown_table, reference

    if markdown:
        typer.echo(markdown_table())
        return
    settings = load_settings_or_exit()
    table = Table("variable", "value", "from", "what", title="cachesync settings")
    for row in reference(settings):
        source = "topology" if row.source.startswith("topology") else row.source
        colour = "green" if source == "environment" else "dim"
        origin = f"[{colour}]{source}[/{colour}]"
        if source == "environment":
            origin += f"\n[dim]default {escape(row.default)}[/dim]"
        table.add_row(
            row.variable,
            escape(row.value) if row.value else "[dim]-[/dim]",
            origin,
            escape(row.description),
        )
    TerminalConsole().print(table)
