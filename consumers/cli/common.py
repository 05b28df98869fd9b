"""Shared by the commands: the console, logging, settings, telemetry, signals, times."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from cachesync.consumers.errors import ConfigError
from cachesync.consumers.pipeline import assemble
from cachesync.consumers.settings import Settings, load_settings

console = Console(stderr=True)
T = TypeVar("T")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("aiokafka", "kafka", "httpx", "httpcore", "botocore", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None


def start_telemetry(settings: Settings, role: str) -> None:
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


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
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


def parse_time(value: str) -> int:
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
