"""`make bench` reports the mapper's codec floor: its rate, its share of the ceiling (the
highest mapper ratio fastavro leaves room for) and the mapper's share of it, each over the
repeats, as the other throughput figures are."""

from __future__ import annotations

from typing import Any

from bench.harness import codec_floor
from bench.report import _throughput_rows


def _rep(value: float, ceiling: float, floor: float) -> dict[str, Any]:
    return {"value": value, "ceiling": ceiling, "floor": floor}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": sorted(values)[len(values) // 2], "min": min(values), "max": max(values)}


def test_the_floor_is_quoted_against_the_ceiling_and_the_mapper_against_the_floor() -> None:
    reps = [_rep(4_000, 40_000, 10_000), _rep(5_000, 25_000, 8_000), _rep(3_000, 30_000, 6_000)]
    floor = codec_floor(reps)
    assert floor["floor"] == {"median": 8_000, "min": 6_000, "max": 10_000}
    assert floor["floor_ratio"] == {"median": 0.25, "min": 0.2, "max": 0.32}
    assert floor["of_floor"] == {"median": 0.5, "min": 0.4, "max": 0.625}

    summary = {
        "mapper": {
            "value": _spread([r["value"] for r in reps]),
            "ceiling": _spread([r["ceiling"] for r in reps]),
            "ratio": _spread([r["value"] / r["ceiling"] for r in reps]),
            **floor,
        },
        "sink": {"value": _spread([1.0]), "ceiling": _spread([2.0]), "ratio": _spread([0.5])},
    }
    rows = _throughput_rows(summary)
    assert [r["figure"].split(",")[0] for r in rows] == [
        "Mapper throughput",
        "Mapper codec floor",
        "Redis sink apply rate",
    ]
    row = rows[1]
    assert row["value"] == "8,000 (6,000-10,000)"
    assert row["ratio"] == "0.25 (0.20-0.32)"
    assert "runs at 0.50 (0.40-0.62) of it" in row["figure"]
    # Reported, not a target: the mapper's row carries the target.
    assert row["target"] == "—" and row["met"] == "—"
    assert rows[0]["met"] == "**no**"


def test_results_from_before_the_floor_have_no_floor_row() -> None:
    summary = {
        key: {"value": _spread([1.0]), "ceiling": _spread([2.0]), "ratio": _spread([0.5])}
        for key in ("mapper", "sink")
    }
    assert len(_throughput_rows(summary)) == 2
