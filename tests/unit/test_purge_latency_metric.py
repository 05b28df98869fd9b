"""The purge latency histogram keeps each flush's spread and its slowest command, at a
bounded number of recordings per flush."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from cachesync.consumers import telemetry


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    histogram = provider.get_meter("test").create_histogram("cachesync.purge.latency", unit="ms")
    monkeypatch.setattr(telemetry, "purge_latency", histogram)
    yield reader
    provider.shutdown()


def _point(reader: InMemoryMetricReader) -> HistogramDataPoint:
    data = reader.get_metrics_data()
    assert data is not None
    (point,) = data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    assert isinstance(point, HistogramDataPoint)
    return point


def test_a_small_flush_records_every_command(reader: InMemoryMetricReader) -> None:
    telemetry.record_purge_latencies([5.0, 1.0, 9.0], {"region": "eu-west", "sink": "redis"})

    point = _point(reader)
    assert (point.count, point.sum, point.min, point.max) == (3, 15.0, 1.0, 9.0)


def test_a_large_flush_records_a_spread_sample_with_its_slowest(
    reader: InMemoryMetricReader,
) -> None:
    latencies = [float(v) for v in range(1000, 0, -1)]  # 1..1000 ms, unsorted
    telemetry.record_purge_latencies(latencies, {"region": "eu-west", "sink": "redis"})

    point = _point(reader)
    assert point.count == telemetry.LATENCY_SAMPLES_PER_FLUSH
    assert (point.min, point.max) == (1.0, 1000.0)
    # Evenly spread: the sample's mean is the flush's, within one step.
    assert abs(point.sum / point.count - 500.5) < 1000 / telemetry.LATENCY_SAMPLES_PER_FLUSH
