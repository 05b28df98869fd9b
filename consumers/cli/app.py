"""`cachesync`: run the pipeline's roles, manage the topology, produce demo traffic."""

from __future__ import annotations

import os
import sys

from aiokafka.errors import KafkaConnectionError

from cachesync.consumers.cli import (
    catalog,
    config,
    consistency,
    dlq,
    publish,
    report,
    run,
    tools,
    trace,
    vendor_api,
)
from cachesync.consumers.cli.common import console
from cachesync.consumers.cli.terminal import Commands
from cachesync.consumers.errors import ConfigError

app = Commands(help=__doc__, no_args_is_help=True, add_completion=False)
app.add_typer(run.run_app, name="run")
app.add_typer(catalog.topology_app, name="topology")
app.add_typer(catalog.schemas_app, name="schemas")
app.command("config")(config.config_cmd)
app.command("publish")(publish.publish_cmd)
app.command("replay")(tools.replay_cmd)
app.command("consistency")(consistency.consistency_cmd)
app.command("trace")(trace.trace_cmd)
app.command("status")(tools.status_cmd)
app.command("report")(report.report_cmd)
app.command("demo")(tools.demo)
app.add_typer(dlq.dlq_app, name="dlq")
app.add_typer(vendor_api.vendor_api_app, name="vendor-api")


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}", soft_wrap=True)
        sys.exit(2)
    except KafkaConnectionError as exc:
        # Commands check Kafka before they start (ops/reachability.py); this is a broker
        # lost on the way, said in one line as well.
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "the default 127.0.0.1:19092")
        console.print(
            f"[red]lost Kafka:[/red] KAFKA_BOOTSTRAP_SERVERS={bootstrap}: {exc}", soft_wrap=True
        )
        sys.exit(2)
