"""`cachesync dlq list | show | redrive`: the dead-letter topic."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Annotated, Any

import typer
from rich.console import Console

from cachesync.consumers.cli.common import (
    T,
    console,
    load_settings_or_exit,
    parse_time,
    require_services,
    setup_logging,
)
from cachesync.consumers.cli.terminal import Commands

dlq_app = Commands(
    help="List, show and re-drive the dead-letter topic's records.", no_args_is_help=True
)


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

    setup_logging(False)
    settings = load_settings_or_exit()
    require_services(settings, state=True)
    letters = _dlq_call(
        dlq.read_dead_letters(
            settings,
            since_ms=parse_time(since) if since else None,
            until_ms=parse_time(until) if until else None,
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

    setup_logging(False)
    settings = load_settings_or_exit()
    require_services(settings, state=True)
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

    setup_logging(False)
    settings = load_settings_or_exit()
    require_services(settings, state=True)
    report = _dlq_call(
        dlq.redrive(
            settings,
            reasons=reason or (),
            ids=id_ or (),
            since_ms=parse_time(since) if since else None,
            until_ms=parse_time(until) if until else None,
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
