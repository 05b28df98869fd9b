"""`cachesync publish EVENT_TYPE`: send one hand-written platform event, checked against its schema."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cachesync.consumers.cli.common import (
    console,
    load_settings_or_exit,
    require_services,
    setup_logging,
)
from cachesync.consumers.cli.terminal import TerminalConsole


def publish_cmd(
    event_type: Annotated[
        str, typer.Argument(help="The event type, as named in schemas/avro/events (photo.uploaded)")
    ],
    json_text: Annotated[
        str | None, typer.Option("--json", help="The event's fields, as a JSON object")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="A file holding the JSON object ('-': stdin)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check and print the event; send nothing")
    ] = False,
) -> None:
    """Check an event against its newest schema and the field checks, fill event_id,
    occurred_at and source when absent, and send it to its content topic, keyed by its
    entity (the JSON comes from --json, --file or standard input)."""
    from cachesync.consumers.ops.publish import EventPublisher, InvalidEvent, prepare_event
    from cachesync.consumers.pipeline.codecs import close_codec, codec_for, start_codec

    setup_logging(False)
    fields = _read_json(json_text, file)
    settings = load_settings_or_exit()
    if not dry_run:
        require_services(settings)

    async def main() -> tuple[Any, tuple[int, int] | None]:
        codec = codec_for(settings)
        await start_codec(codec)
        try:
            event = prepare_event(settings, event_type, fields, codec=codec)
            if dry_run:
                return event, None
            publisher = EventPublisher(settings, codec=codec)
            await publisher.start()
            try:
                return event, await publisher.publish_prepared(event)
            finally:
                await publisher.stop()
        finally:
            await close_codec(codec)

    try:
        event, placed = asyncio.run(main())
    except InvalidEvent as exc:
        console.print(f"[red]invalid {exc.event_type}[/red], nothing sent:", soft_wrap=True)
        for problem in exc.problems:
            console.print(f"  - {problem}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    out = TerminalConsole()
    out.print_json(json.dumps(event.record, default=_json_default))
    filled = f"; filled {', '.join(event.filled)}" if event.filled else ""
    for section, items in event.purges.items():
        out.print(f"[dim]purges {section}: {', '.join(items)}[/dim]", highlight=False)
    key = event.key.decode(errors="replace")
    if placed is None:
        out.print(
            f"[yellow]dry run[/yellow]: would send {len(event.value)} bytes to {event.topic}, "
            f"key {key}{filled}; nothing sent",
            soft_wrap=True,
        )
        return
    partition, offset = placed
    event_id = event.record["event_id"]
    out.print(
        f"[green]published[/green] {event.event_type} {event_id} to "
        f"{event.topic}[{partition}]@{offset}, key {key}{filled}",
        soft_wrap=True,
        highlight=False,
    )
    out.print(f"follow it: cachesync trace {event_id} --wait 10", highlight=False)


def _read_json(json_text: str | None, file: Path | None) -> object:
    """The JSON object from --json, --file (or '-') or a piped stdin; exit 2 saying what is wrong."""
    if json_text is not None and file is not None:
        raise typer.BadParameter("give --json or --file, not both")
    if json_text is not None:
        source, text = "--json", json_text
    elif file is not None and str(file) != "-":
        try:
            source, text = str(file), file.read_text()
        except OSError as exc:
            raise typer.BadParameter(f"{file}: {exc.strerror}", param_hint="--file") from None
    elif file is not None or not sys.stdin.isatty():
        source, text = "stdin", sys.stdin.read()
    else:
        raise typer.BadParameter("give the event as --json '{...}', --file FILE, or on stdin")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        console.print(f"[red]{source}: not JSON[/red]: {exc}", soft_wrap=True)
        raise typer.Exit(2) from None


def _json_default(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)
