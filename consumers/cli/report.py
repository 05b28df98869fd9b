"""`cachesync report`: cache effectiveness over a time range, as one self-contained HTML page."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated

import typer

from cachesync.consumers.cli.common import console, load_settings_or_exit, parse_time
from cachesync.consumers.errors import ConfigError


def report_cmd(
    since: Annotated[str, typer.Option(help="Start: ISO 8601 time or 15m/2h/1d ago")] = "1h",
    until: Annotated[str | None, typer.Option(help="End; default: now")] = None,
    out: Annotated[Path, typer.Option(help="The HTML file to write")] = Path("report.html"),
    window: Annotated[
        float | None,
        typer.Option(
            help="Seconds after a purge counted as its cost (CACHESYNC_INVALIDATION_WINDOW_S)"
        ),
    ] = None,
) -> None:
    """Hit ratios per region and tier, purge latency, invalidation cost, warming's gain, nines."""
    from cachesync.consumers.ops.effectiveness.config import load_effectiveness_settings
    from cachesync.consumers.ops.effectiveness.gather import gather
    from cachesync.consumers.ops.effectiveness.page import render

    settings = load_settings_or_exit()
    try:
        eff = load_effectiveness_settings()
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None
    if window is not None:
        eff = eff.model_copy(update={"window_s": window})
    since_ms = parse_time(since)
    until_ms = parse_time(until) if until else int(time.time() * 1000)
    data = asyncio.run(gather(settings, eff, since_ms=since_ms, until_ms=until_ms))
    out.write_text(render(data), encoding="utf-8")
    totals = data.tier_totals()
    figures = " · ".join(
        f"{tier} {h / (h + m):.1%}" for tier, (h, m) in sorted(totals.items()) if h + m
    )
    console.print(
        f"[green]wrote[/green] {out} ({out.stat().st_size / 1e6:.1f} MB): {figures or 'no tier data'}"
    )
    for note in data.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
