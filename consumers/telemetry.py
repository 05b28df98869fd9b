"""OpenTelemetry instruments, declared once so every name lives in one place.

Exporters are set up by the entry point (see `setup_telemetry`); without them the
API's no-op providers make every call here free.
"""

from __future__ import annotations

from opentelemetry import metrics, trace

meter = metrics.get_meter("cachesync")
tracer = trace.get_tracer("cachesync")

events_in = meter.create_counter(
    "cachesync.events.in", unit="{event}", description="Content events consumed, by event type"
)
commands_out = meter.create_counter(
    "cachesync.commands.out", unit="{command}", description="Commands produced, by kind and region"
)
dead_lettered = meter.create_counter(
    "cachesync.dead_lettered",
    unit="{message}",
    description="Messages sent to the dead-letter topic, by reason",
)
commands_applied = meter.create_counter(
    "cachesync.commands.applied",
    unit="{command}",
    description="Commands applied, by region, sink and outcome",
)
redis_keys_deleted = meter.create_counter(
    "cachesync.redis.keys_deleted",
    unit="{key}",
    description="Keys deleted by the Redis sink, by region",
)
purge_latency = meter.create_histogram(
    "cachesync.purge.latency",
    unit="ms",
    description="Event time to effect applied, by region and sink",
)
retries = meter.create_counter(
    "cachesync.retries",
    unit="{batch}",
    description="Batches put back for retry, by consumer and reason",
)
