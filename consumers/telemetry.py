"""OpenTelemetry instruments, declared once so every name lives in one place.

Exporters are set up by the entry point (see `setup_telemetry`); without them the
API's no-op providers make every call here free.
"""

from __future__ import annotations

import os
import random
import re
import socket
import threading
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased

from cachesync.consumers.health import health, health_app

meter = metrics.get_meter("cachesync")

# At most this many purge latencies are recorded per flush (see record_purge_latencies).
LATENCY_SAMPLES_PER_FLUSH = 64
tracer = trace.get_tracer("cachesync")

events_in = meter.create_counter(
    "cachesync.events.in", unit="{event}", description="Content events consumed, by event type"
)
events_unhandled = meter.create_counter(
    "cachesync.events.unhandled",
    unit="{event}",
    description="Content events with no rule (and not in ignored_events), by event type: dropped",
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
    description="Event time to effect applied, by region and sink (a flush of more than "
    f"{LATENCY_SAMPLES_PER_FLUSH} commands records {LATENCY_SAMPLES_PER_FLUSH} of them, "
    "spread over its range, its slowest included; counts are in commands.applied)",
)


def record_purge_latencies(latencies_ms: Sequence[float], attrs: dict[str, Any]) -> None:
    """One flush's purge latencies, into `purge_latency`.

    Recording one value costs the SDK some 20 us (its attribute and view bookkeeping),
    which at the Redis sink's rates was a sixth of its CPU. A flush of more commands
    than LATENCY_SAMPLES_PER_FLUSH records that many, taken at even steps of its sorted
    latencies with the slowest always among them: each flush's spread and tail stay in
    the histogram, and a large flush weighs as that many commands.
    """
    values = list(latencies_ms)
    n = LATENCY_SAMPLES_PER_FLUSH
    if len(values) > n:
        values.sort()
        step = (len(values) - 1) / (n - 1)
        values = [values[round(i * step)] for i in range(n)]
    for value in values:
        purge_latency.record(value, attrs)


retries = meter.create_counter(
    "cachesync.retries",
    unit="{batch}",
    description="Batches put back for retry, by consumer and reason",
)
sink_retries = meter.create_counter(
    "cachesync.sink.retries",
    unit="{attempt}",
    description="Calls a sink made again after a 5xx or a network error (stamina), by sink and region",
)
sink_unavailable = meter.create_counter(
    "cachesync.sink.unavailable",
    unit="{batch}",
    description="Batches a sink put back because the provider refused the sink itself, not a "
    "command, by sink, region and reason (credentials, configuration); nothing dead-lettered",
)

# Sinks the provider refuses as a whole (sinks/retry.py `Outage`): 1 while blocked, 0
# once a call is accepted again, by sink, region and reason. Read at export time.
_blocked: dict[tuple[str, str, str], int] = {}


def record_blocked(sink: str, region: str, reason: str | None) -> None:
    """`sink` in `region` is blocked for `reason`, or (None) no longer blocked at all."""
    for key in [k for k in _blocked if k[:2] == (sink, region)]:
        _blocked[key] = 0
    if reason is not None:
        _blocked[(sink, region, reason)] = 1


def _observe_blocked(_options: CallbackOptions) -> Iterable[Observation]:
    for (sink, region, reason), value in list(_blocked.items()):
        yield Observation(value, {"sink": sink, "region": region, "reason": reason})


sink_blocked = meter.create_observable_gauge(
    "cachesync.sink.blocked",
    callbacks=[_observe_blocked],
    unit="{sink}",
    description="1 while the provider refuses a sink as a whole (its credentials, its zone or "
    "distribution): the sink is paused and commits nothing; by sink, region and reason",
)

# CDN sinks and the purge budget (consumers/budget.py, consumers/sinks/), each by
# `provider` (cloudflare, cloudfront, http_purge) and `region`.
cdn_api_calls = meter.create_counter(
    "cachesync.cdn.api_calls",
    unit="{call}",
    description="Purge API calls made, by provider, region and outcome (ok, throttled, error, rejected)",
)
cdn_items = meter.create_counter(
    "cachesync.cdn.items",
    unit="{item}",
    description="Items sent in purge calls, by provider, region and kind (files, tags, prefixes, paths)",
)
cdn_coalesced = meter.create_counter(
    "cachesync.cdn.coalesced",
    unit="{item}",
    description="Purge items not sent because an identical or covering item was, by provider",
)
cdn_escalations = meter.create_counter(
    "cachesync.cdn.escalations",
    unit="{escalation}",
    description="URLs or paths replaced by a prefix or wildcard to fit a limit, by provider and reason",
)
cdn_throttled = meter.create_counter(
    "cachesync.cdn.throttled",
    unit="{response}",
    description="429 answers from a provider (the batch waits for Retry-After), by provider",
)
cdn_cost_units = meter.create_counter(
    "cachesync.cdn.cost_units",
    unit="{unit}",
    description="Billable units spent: CloudFront paths, Cloudflare requests; by provider",
)
warm_fetches = meter.create_counter(
    "cachesync.warm.fetches",
    unit="{request}",
    description="Warming GETs through a region's edge, by region and cache status (HIT, MISS, error)",
)
warm_dropped = meter.create_counter(
    "cachesync.warm.dropped",
    unit="{command}",
    description="Warms not done, by region and reason (fenced by a newer purge, expired)",
)

# Vendor API cache (consumers/vendor_api), each by `api` (the integration in topology's
# vendor_apis), so the cache's effectiveness reads per integration.
vendor_api_hits = meter.create_counter(
    "cachesync.vendor_api.hits", unit="{request}", description="Answered fresh from the cache"
)
vendor_api_misses = meter.create_counter(
    "cachesync.vendor_api.misses",
    unit="{request}",
    description="No usable entry: the request went (or waited for a call) upstream",
)
vendor_api_stale_served = meter.create_counter(
    "cachesync.vendor_api.stale_served",
    unit="{request}",
    description="Answered from a stale entry, by reason (revalidating, upstream_error, upstream_timeout)",
)
vendor_api_revalidations = meter.create_counter(
    "cachesync.vendor_api.revalidations",
    unit="{request}",
    description="Conditional requests upstream, by outcome (not_modified = 304, modified = 200)",
)
vendor_api_coalesced = meter.create_counter(
    "cachesync.vendor_api.coalesced_waits",
    unit="{request}",
    description="Requests that waited for another caller's upstream call, by scope (process, redis)",
)
vendor_api_upstream_latency = meter.create_histogram(
    "cachesync.vendor_api.upstream.latency",
    unit="ms",
    description="Upstream call duration, by api and status",
)
vendor_api_upstream_errors = meter.create_counter(
    "cachesync.vendor_api.upstream.errors",
    unit="{call}",
    description="Failed upstream calls, by api and error (timeout, unavailable, rejected, bad_response)",
)
vendor_api_cache_errors = meter.create_counter(
    "cachesync.vendor_api.cache.errors",
    unit="{operation}",
    description="Cache (Redis) operations that failed, so the call bypassed the cache",
)

# Consumer lag per group and partition, as seen by each loop after a fetch: the
# high-water mark minus the position. Read by an observable gauge at export time.
_lag: dict[tuple[str, str, int], int] = {}


def record_lag(group: str, topic: str, partition: int, lag: int) -> None:
    _lag[(group, topic, partition)] = lag


def _observe_lag(_options: CallbackOptions) -> Iterable[Observation]:
    for (group, topic, partition), lag in list(_lag.items()):
        yield Observation(lag, {"group": group, "topic": topic, "partition": partition})


consumer_lag = meter.create_observable_gauge(
    "cachesync.consumer.lag",
    callbacks=[_observe_lag],
    unit="{message}",
    description="Messages not yet consumed, by consumer group, topic and partition",
)


class _KafkaHeaders(Getter[Sequence[tuple[str, bytes]]], Setter[list[tuple[str, bytes]]]):
    """W3C trace context in Kafka headers (a list of (str, bytes) pairs)."""

    def get(self, carrier: Sequence[tuple[str, bytes]], key: str) -> list[str] | None:
        values = [v.decode() for k, v in carrier if k == key and v is not None]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, bytes]]) -> list[str]:
        return [k for k, _ in carrier]

    def set(self, carrier: list[tuple[str, bytes]], key: str, value: str) -> None:
        carrier[:] = [(k, v) for k, v in carrier if k != key]
        carrier.append((key, value.encode()))


KAFKA_HEADERS = _KafkaHeaders()


def extract_context(headers: Sequence[tuple[str, bytes]] | None) -> Context:
    """The trace context a message carries (an empty one starts a new trace)."""
    return propagate.extract(list(headers or ()), getter=KAFKA_HEADERS)


# The W3C trace context headers, as the tracecontext propagator writes them.
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


def trace_headers(headers: Sequence[tuple[str, bytes]] | None) -> list[tuple[str, bytes]]:
    """A message's own trace context headers, to pass on as they came (an unsampled trace:
    no span of ours in between, so the next stage sees the platform's decision)."""
    return [(k, bytes(v)) for k, v in headers or () if k in _TRACE_HEADERS]


def untraced() -> AbstractContextManager[object]:
    """No library instrumentation spans inside: for a batch's own calls (the relationship
    index read and written once per batch), which belong to no event. Outside any event's
    span each would start a root trace, sampled as such, with every command of a
    500-command pipeline formatted into its statement first (the Redis instrumentation
    does that before it asks the sampler): 15 ms per batch in the mapper's profile."""
    return suppress_instrumentation()


def inject_context(headers: list[tuple[str, bytes]]) -> None:
    """Put the current span's context in outgoing headers (W3C traceparent/tracestate).

    Done by hand, not left to the aiokafka instrumentation: commands go out in
    batches (`BatchedSends`), which it does not see."""
    propagate.inject(headers, setter=KAFKA_HEADERS)


def new_trace_headers(ids: random.Random, *, sampled: bool) -> list[tuple[str, bytes]]:
    """The headers of an event that starts a trace upstream of cachesync, with the
    sampling decision made there (what the platform's own producer attaches): a W3C
    traceparent, version 00, as the tracecontext propagator writes one."""
    trace_id, span_id = ids.getrandbits(128) or 1, ids.getrandbits(64) or 1
    traceparent = f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"
    return [("traceparent", traceparent.encode())]


# The W3C traceparent, as the tracecontext propagator reads it (version 00, no extra field).
_TRACEPARENT = re.compile(
    rb"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*$"
)
_W3C_READ: dict[int, bool] = {}  # id(global propagator) -> whether it reads traceparent


@dataclass(frozen=True, slots=True)
class MessageTrace:
    """The trace a consumed message belongs to, as far as a consumer acts on it."""

    # The parent of the message's own span; None when its trace is not sampled: then it
    # gets no span of its own (only a batch span links it, if sampled itself).
    parent: Context | None
    trace_id: str | None  # hex, when the message carries a trace (for audit records)


_NO_CONTEXT = MessageTrace(Context(), None)


def trace_id_hex(span: trace.Span) -> str:
    """A span's trace id as the W3C trace context and the audit records write it."""
    return format(span.get_span_context().trace_id, "032x")


def message_trace(headers: Sequence[tuple[str, bytes]] | None) -> MessageTrace:
    """What a message's trace context says: its trace and whether that trace is sampled.

    The platform's sampling decision travels in the context's flags: a sampled trace gets
    a span per message (under the parent-based sampler, `trace_sampler`), an unsampled
    one none, and reading that costs a header scan rather than a full extract. A message
    without a context starts a new trace, sampled as the sampler decides for a root.
    """
    if not headers:
        # Nothing to extract: an empty context starts a trace, what a full extract of an
        # empty carrier returns, at a fraction of its cost.
        return _NO_CONTEXT
    if _reads_traceparent():
        for key, value in headers:
            if key == "traceparent":
                match = _TRACEPARENT.match(value)
                if (
                    match is not None
                    and match[1] == b"00"
                    and not match[5]
                    and not int(match[4], 16) & 1
                    and match[2] != b"0" * 32
                    and match[3] != b"0" * 16
                ):
                    return MessageTrace(None, match[2].decode())
                break
    context = extract_context(headers)
    carried = trace.get_current_span(context)
    span_context = carried.get_span_context()
    if not span_context.is_valid:
        return MessageTrace(context, None)
    sampled = span_context.trace_flags.sampled
    return MessageTrace(context if sampled else None, trace_id_hex(carried))


def _reads_traceparent() -> bool:
    textmap = propagate.get_global_textmap()
    known = _W3C_READ.get(id(textmap))
    if known is None:
        known = _W3C_READ[id(textmap)] = "traceparent" in textmap.fields
    return known


def trace_sampler() -> Sampler | None:
    """The sampler from the standard OTEL_TRACES_SAMPLER (and _ARG), always parent-based,
    so that a span follows the sampling decision of the platform's event: the mapper's,
    the sinks' and the Redis, HTTP and AWS client spans are kept for a sampled event and
    not made for an unsampled one. Unset or `always_on`: ParentBased(always on);
    `traceidratio`: ParentBased(ratio), the ratio applying only to events that come
    without a context. None: the SDK reads the variable itself (`parentbased_*`,
    `always_off`, or a sampler it knows by name)."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name in ("", "always_on"):
        return ParentBased(ALWAYS_ON)
    if name == "traceidratio":
        try:
            ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", ""))
        except ValueError:
            ratio = 1.0
        return ParentBased(TraceIdRatioBased(min(max(ratio, 0.0), 1.0)))
    return None


# The consistency checker (consumers/consistency.py), by region and sink.
consistency_probes = meter.create_counter(
    "cachesync.consistency.probes",
    unit="{probe}",
    description="Read-backs after a purge, by region, sink and result (converged, stale, recovered, gave_up)",
)
consistency_unapplied = meter.create_counter(
    "cachesync.consistency.unapplied",
    unit="{purge}",
    description="Purges the mapper issued that a sink had not reported applied by the end of "
    "their window, by region and sink",
)
consistency_staleness = meter.create_histogram(
    "cachesync.consistency.staleness",
    unit="ms",
    description="Event time until no stale copy was served, by region and sink",
)
_consistency: dict[tuple[str, str], float] = {}


def record_consistency(region: str, sink: str, share: float) -> None:
    _consistency[(region, sink)] = share


def _observe_consistency(_options: CallbackOptions) -> Iterable[Observation]:
    for (region, sink), share in list(_consistency.items()):
        yield Observation(share, {"region": region, "sink": sink})


consistency_converged = meter.create_observable_gauge(
    "cachesync.consistency.converged_ratio",
    callbacks=[_observe_consistency],
    unit="1",
    description="Share of sampled purges with no stale copy at the first read-back, by region and sink",
)

# Cache effectiveness read from each tier's own counters (consumers/ops/effectiveness/):
# Redis INFO, varnishstat, Cloudflare's analytics, CloudWatch; by region and tier.
cache_hits = meter.create_counter(
    "cachesync.cache.hits",
    unit="{request}",
    description="Hits a cache tier counted itself while cachesync read it, by region and tier",
)
cache_misses = meter.create_counter(
    "cachesync.cache.misses",
    unit="{request}",
    description="Misses a cache tier counted itself while cachesync read it, by region and tier",
)
_hit_ratio: dict[tuple[str, str], float] = {}


def record_hit_ratio(region: str, tier: str, ratio: float) -> None:
    _hit_ratio[(region, tier)] = ratio


def _observe_hit_ratio(_options: CallbackOptions) -> Iterable[Observation]:
    for (region, tier), ratio in list(_hit_ratio.items()):
        yield Observation(ratio, {"region": region, "tier": tier})


cache_hit_ratio = meter.create_observable_gauge(
    "cachesync.cache.hit_ratio",
    callbacks=[_observe_hit_ratio],
    unit="1",
    description="Hit ratio of a cache tier over the last reading interval, from its own "
    "counters, by region and tier",
)


@dataclass
class Telemetry:
    """What `setup_telemetry` installed; tests read the in-memory parts."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    metrics_port: int | None = None
    span_exporter: SpanExporter | None = None
    metric_readers: list[MetricReader] = field(default_factory=list)
    metrics_server: WSGIServer | None = None

    def shutdown(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per request: a slow /readyz probe never holds up a scrape of /metrics."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape and probe (every few seconds, forever)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_metrics(host: str, port: int) -> WSGIServer:
    """/metrics (Prometheus), /healthz and /readyz (consumers/health.py) on `host`:`port`,
    in a daemon thread. `host` may be an IPv6 address (`::` binds both families where the
    system allows). OSError when the port is taken."""
    from prometheus_client import make_wsgi_app

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(_ThreadingServer):
        address_family = family

    server = make_server(
        host, port, health_app(health, make_wsgi_app()), Server, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    return server


def setup_telemetry(
    service_name: str,
    *,
    metrics_port: int | None = None,
    span_exporter: SpanExporter | None = None,
    metric_readers: list[MetricReader] | None = None,
    instrument: bool = True,
    metrics_host: str | None = None,
) -> Telemetry:
    """Install the global tracer and meter providers and the library instrumentations.

    Spans are sampled by `trace_sampler` (parent-based, from OTEL_TRACES_SAMPLER).
    Exporters follow the standard OTEL_* variables: OTLP over HTTP when
    OTEL_EXPORTER_OTLP_ENDPOINT (or the per-signal variable) is set, nothing when
    not; OTEL_SDK_DISABLED=true turns everything off. `metrics_port` serves
    Prometheus' /metrics, with /healthz and /readyz, on `metrics_host` (else
    CACHESYNC_METRICS_HOST, else 127.0.0.1). Tests pass in-memory exporters and readers.
    """
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    tracer_provider = TracerProvider(resource=resource, sampler=trace_sampler())
    readers = list(metric_readers or [])
    otlp = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if otlp or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if otlp or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if span_exporter is not None:
        tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    server = None
    if metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        host = metrics_host or os.environ.get("CACHESYNC_METRICS_HOST") or "127.0.0.1"
        server = serve_metrics(host, metrics_port)
        readers.append(PrometheusMetricReader())
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    if instrument:
        _instrument_libraries()
    return Telemetry(tracer_provider, meter_provider, metrics_port, span_exporter, readers, server)


def _instrument_libraries() -> None:
    """Spans for Kafka sends, Redis commands, HTTP calls and AWS calls, with context injected."""
    from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
    from opentelemetry.instrumentation.botocore import AiobotocoreInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    instrumentors: list[Any] = [RedisInstrumentor(), HTTPXClientInstrumentor()]
    # A span per Kafka send and per received record was half of the mapper's and the
    # sinks' CPU (bench/results/profile.txt), for little the map/apply/flush spans do
    # not already show: opt in with CACHESYNC_TRACE_KAFKA=1. Context still travels in
    # the headers either way (inject_context / extract_context).
    if os.environ.get("CACHESYNC_TRACE_KAFKA", "").lower() in ("1", "true", "yes"):
        instrumentors.append(AIOKafkaInstrumentor())
    for instrumentor in instrumentors:
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()
    aws = AiobotocoreInstrumentor()  # type: ignore[no-untyped-call]
    if not aws.is_instrumented_by_opentelemetry:
        # aiobotocore 3.x is newer than the range the instrumentor declares; it works.
        aws.instrument(skip_dep_check=True)


_UNIT_SUFFIX = {"ms": "milliseconds", "s": "seconds", "By": "bytes", "1": "ratio"}


def prometheus_families() -> dict[str, str]:
    """Every instrument above as the Prometheus exporter names its family -> instrument kind.

    Dots become underscores, the unit is appended in words (`{annotations}` are
    dropped); counters' samples add `_total`, histograms' `_bucket/_sum/_count`. The
    dashboard and alert tests check their queries against this.
    """
    families: dict[str, str] = {}
    for value in list(globals().values()):
        name = getattr(value, "name", None) or getattr(value, "_name", None)
        unit = getattr(value, "unit", None) or getattr(value, "_unit", None) or ""
        if not isinstance(name, str) or not name.startswith("cachesync."):
            continue
        kind = type(value).__name__.lstrip("_").replace("Proxy", "")
        family = name.replace(".", "_")
        suffix = "" if unit.startswith("{") else _UNIT_SUFFIX.get(unit, unit)
        if suffix and not family.endswith("_" + suffix):
            family += "_" + suffix
        families[family] = kind
    return families
