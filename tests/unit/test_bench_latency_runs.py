"""End-to-end latency in `make bench` is the median of several runs at each rate: the
report quotes the median with the runs' spread, and judges the target on the median."""

from __future__ import annotations

from typing import Any

from bench.report import _latency_rows


def _run(rate: int, seconds: float, p99: float) -> dict[str, Any]:
    return {
        "rate": rate,
        "seconds": seconds,
        "processes": ["mapper", "sink.us-east", "sink.eu-west", "sink.ap-southeast"],
        "p50": p99 / 3,
        "p99": p99,
        "max": p99 * 2,
        "events": rate * int(seconds),
        "incomplete": 0,
    }


def _p99_rows(high: list[float], low: list[float]) -> dict[int, dict[str, str]]:
    """The report's p99 rows, by rate, for runs at 1,000/s and at 100/s with these p99s."""
    reps = [_run(1000, 60, p) for p in high]
    out = {
        "plan": {"latency_rate": 1000, "latency_seconds": 60},
        "latency": reps,
        "summary": {
            "latency": {
                q: {
                    "median": sorted(r[q] for r in reps)[len(reps) // 2],
                    "min": min(r[q] for r in reps),
                    "max": max(r[q] for r in reps),
                }
                for q in ("p50", "p99", "max")
            }
        },
        "latency_low": [_run(100, 20, p) for p in low],
    }
    p99 = [row for row in _latency_rows(out) if row["figure"].startswith("End-to-end latency p99")]
    return {1000: p99[0], 100: p99[1]}


def test_each_rate_quotes_the_median_of_its_runs_and_judges_on_it() -> None:
    rows = _p99_rows(high=[87, 126, 69], low=[71, 40, 45])
    high, low = rows[1000], rows[100]
    assert "1,000/s for 60 s" in high["figure"] and "100/s for 20 s" in low["figure"]
    assert high["value"] == "87 (69-126)" and high["met"] == "yes"
    assert "median of 3 runs" in high["figure"]
    assert low["value"] == "45 (40-71)" and low["met"] == "yes"
    assert "median of 3 runs" in low["figure"]


def test_a_median_over_the_target_is_missed_whatever_the_best_run() -> None:
    rows = _p99_rows(high=[120, 95, 130], low=[60, 30, 55])
    assert rows[1000]["met"] == "**no**" and rows[100]["met"] == "**no**"


def test_one_run_is_quoted_alone() -> None:
    rows = _p99_rows(high=[87], low=[71])
    assert rows[100]["value"] == "71" and "median" not in rows[100]["figure"]
