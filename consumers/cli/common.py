"""Shared by the commands: the console, logging, settings, telemetry, signals, times."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import typer
from rich.logging import RichHandler

from cachesync.consumers.cli.terminal import RoutineKafkaErrors, TerminalConsole
from cachesync.consumers.errors import ConfigError
from cachesync.consumers.pipeline import assemble
from cachesync.consumers.settings import Settings, load_settings

console = TerminalConsole(stderr=True)
T = TypeVar("T")


def setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    handler.addFilter(RoutineKafkaErrors(verbose))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler]
    )
    for noisy in ("aiokafka", "kafka", "httpx", "httpcore", "botocore", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None


def require_services(
    settings: Settings,
    *,
    kafka: bool = True,
    regions: Iterable[str] = (),
    sink_regions: Iterable[str] = (),
    state: bool = False,
) -> None:
    """Exit (2) with one line naming the variable and the address when the home Kafka, the
    cluster the sinks of `sink_regions` read, the Redis of `regions` and `sink_regions` or
    (`state`) the state Redis does not answer."""
    from cachesync.consumers.ops.reachability import check_reachable, redis_targets

    sink_regions = list(sink_regions)
    targets = redis_targets(settings, regions=[*regions, *sink_regions], state=state)
    try:
        asyncio.run(
            check_reachable(settings, kafka=kafka, kafka_regions=sink_regions, redis=targets)
        )
    except ConfigError as exc:
        console.print(f"[red]cannot start:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None


def start_telemetry(settings: Settings, role: str) -> None:
    """Tracing, metrics and health (/metrics, /healthz, /readyz on CACHESYNC_METRICS_HOST:
    CACHESYNC_METRICS_PORT) and library instrumentation."""
    from cachesync.consumers.telemetry import setup_telemetry

    port = settings.metrics_port or None
    host = settings.metrics_host
    # The progress `run` prints is read from the same metrics /metrics serves (ops/status.py
    # local_snapshot): with the port off, they are collected in the process all the same.
    readers = None if port else [_unserved_prometheus_reader()]
    try:
        setup_telemetry(
            f"cachesync-{role}", metrics_port=port, metrics_host=host, metric_readers=readers
        )
    except OSError as exc:
        console.print(
            f"[red]cannot serve /metrics on {host}:{port}:[/red] {exc.strerror} "
            "(set CACHESYNC_METRICS_HOST / CACHESYNC_METRICS_PORT)"
        )
        raise typer.Exit(2) from None
    if port:
        shown = f"[{host}]" if ":" in host else host
        console.print(f"[dim]metrics, /healthz and /readyz on http://{shown}:{port}/metrics[/dim]")


def _unserved_prometheus_reader() -> Any:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    return PrometheusMetricReader()


def run_until_signal(
    main: Callable[[asyncio.Event], Awaitable[T]], *, grace_s: float | None = None
) -> T:
    """Run `main(stop)` until Ctrl-C/SIGTERM (drain, for at most `grace_s`), a second one aborts."""
    try:
        return assemble.run_until_signal(
            main,
            on_stop=lambda: console.print(
                "[yellow]stopping: finishing in-flight batches (Ctrl-C again to abort)[/yellow]"
            ),
            grace_s=grace_s,
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
