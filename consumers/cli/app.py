"""`cachesync`: run the pipeline's roles, manage the topology, produce demo traffic."""

from __future__ import annotations

import sys

import typer

from cachesync.consumers.cli import catalog, consistency, dlq, run, tools, vendor_api
from cachesync.consumers.cli.common import console
from cachesync.consumers.errors import ConfigError

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
app.add_typer(run.run_app, name="run")
app.add_typer(catalog.topology_app, name="topology")
app.add_typer(catalog.schemas_app, name="schemas")
app.command("replay")(tools.replay_cmd)
app.command("consistency")(consistency.consistency_cmd)
app.command("trace")(tools.trace_cmd)
app.command("status")(tools.status_cmd)
app.command("demo")(tools.demo)
app.add_typer(dlq.dlq_app, name="dlq")
app.add_typer(vendor_api.vendor_api_app, name="vendor-api")


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        sys.exit(2)
