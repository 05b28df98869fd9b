"""Sampling: the sampler follows the platform's decision, and a consumed message's trace
context is read as the tracecontext propagator reads it (its unsampled fast path too)."""

from __future__ import annotations

import random

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from cachesync.consumers.telemetry import (
    extract_context,
    message_trace,
    new_trace_headers,
    trace_sampler,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def headers(traceparent: bytes) -> list[tuple[str, bytes]]:
    return [("cachesync.kind", b"purge"), ("traceparent", traceparent)]


def reference(hdrs: list[tuple[str, bytes]]) -> tuple[bool, str | None]:
    """What the propagator says: (whether a span of its own is due, the trace id)."""
    ctx = trace.get_current_span(extract_context(hdrs)).get_span_context()
    if not ctx.is_valid:
        return True, None
    return bool(ctx.trace_flags.sampled), format(ctx.trace_id, "032x")


@pytest.mark.parametrize(
    "traceparent",
    [
        pytest.param(f"00-{TRACE}-{SPAN}-01".encode(), id="sampled"),
        pytest.param(f"00-{TRACE}-{SPAN}-00".encode(), id="not-sampled"),
        pytest.param(f"00-{TRACE}-{SPAN}-02".encode(), id="other-flag-only"),
        pytest.param(f"00-{'0' * 32}-{SPAN}-00".encode(), id="zero-trace-id"),
        pytest.param(f"00-{TRACE}-{'0' * 16}-00".encode(), id="zero-span-id"),
        pytest.param(f"ff-{TRACE}-{SPAN}-00".encode(), id="version-ff"),
        pytest.param(f"00-{TRACE}-{SPAN}-00-extra".encode(), id="version-00-with-more"),
        pytest.param(f"01-{TRACE}-{SPAN}-00-extra".encode(), id="future-version"),
        pytest.param(f"00-{TRACE.upper()}-{SPAN}-00".encode(), id="upper-case"),
        pytest.param(f" 00-{TRACE}-{SPAN}-00\t".encode(), id="padded"),
        pytest.param(b"not a traceparent", id="garbage"),
    ],
)
def test_a_message_is_read_as_the_propagator_reads_it(traceparent: bytes) -> None:
    """Span of its own or not, and which trace: the same answer as a full extract."""
    hdrs = headers(traceparent)
    carried = message_trace(hdrs)
    assert ((carried.parent is not None), carried.trace_id) == reference(hdrs)


def test_an_unsampled_message_gets_no_parent_and_keeps_its_trace_id() -> None:
    """The platform did not sample the event: no span of its own, the trace id for audit."""
    carried = message_trace(headers(f"00-{TRACE}-{SPAN}-00".encode()))
    assert carried.parent is None and carried.trace_id == TRACE


def test_a_sampled_message_is_parented_on_the_remote_span() -> None:
    carried = message_trace(headers(f"00-{TRACE}-{SPAN}-01".encode()))
    assert carried.parent is not None and carried.trace_id == TRACE
    parent = trace.get_current_span(carried.parent).get_span_context()
    assert (format(parent.span_id, "016x"), parent.is_remote) == (SPAN, True)


def test_a_message_without_context_starts_a_trace_as_the_sampler_decides() -> None:
    carried = message_trace([("cachesync.kind", b"purge")])
    assert carried.parent is not None and carried.trace_id is None
    assert not trace.get_current_span(carried.parent).get_span_context().is_valid


def remote(sampled: bool) -> trace.Span:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return NonRecordingSpan(SpanContext(int(TRACE, 16), int(SPAN, 16), True, flags))


def decision(sampler: object, parent: trace.Span | None) -> Decision:
    context = trace.set_span_in_context(parent) if parent is not None else None
    return sampler.should_sample(context, int(TRACE, 16), "x").decision  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["", "always_on", "traceidratio"])
def test_the_sampler_follows_the_parents_decision(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unset, always_on or a ratio of 0: a sampled event's child is kept, an unsampled one's
    is not; the ratio decides only for events without a context."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    sampler = trace_sampler()
    assert sampler is not None
    assert decision(sampler, remote(sampled=True)) == Decision.RECORD_AND_SAMPLE
    assert decision(sampler, remote(sampled=False)) == Decision.DROP
    root = Decision.DROP if name == "traceidratio" else Decision.RECORD_AND_SAMPLE
    assert decision(sampler, None) == root


@pytest.mark.parametrize("name", ["parentbased_traceidratio", "always_off", "unknown"])
def test_other_samplers_are_left_to_the_sdk(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    assert trace_sampler() is None


@pytest.mark.parametrize("sampled", [True, False])
def test_a_trace_started_upstream_carries_its_decision(sampled: bool) -> None:
    """The demo's events start their traces as the platform's would: a new trace per
    event, sampled or not, and read back as such by the consumers."""
    ids = random.Random(3)
    first = new_trace_headers(ids, sampled=sampled)
    second = new_trace_headers(ids, sampled=sampled)
    assert reference(first) == (sampled, message_trace(first).trace_id)
    assert (message_trace(first).parent is not None) is sampled
    assert message_trace(first).trace_id != message_trace(second).trace_id
