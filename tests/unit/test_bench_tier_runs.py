"""The tier benchmark's runs combine into medians, each run's figures kept beside them, and
the report shows them; one run stays as it was."""

from __future__ import annotations

from typing import Any

from bench.report import _tier_rows
from bench.tier_latency import combine


def _run(redis: tuple[float, float], hits: int, probed: int) -> dict[str, Any]:
    return {
        "status": "ok",
        "region": "us-east",
        "rate": 100.0,
        "seconds": 20.0,
        "events": 2000,
        "probed": probed,
        "tiers": {
            "redis": {
                "label": "Redis keys deleted",
                "events": 2000,
                "observed": 2000,
                "p50": redis[0],
                "p99": redis[1],
                "max": redis[1] + 10,
                "target_p50": 20,
                "target_p99": 100,
            }
        },
        "warm": {
            "hit_share": hits / probed,
            "after_varnish_p50": 40.0,
            "after_varnish_p99": 90.0,
            "within_2s_of_purge": 1.0,
        },
        "output": f"redis {redis}",
    }


def test_runs_combine_into_medians_with_every_run_kept() -> None:
    out = combine([_run((31, 90), 500, 500), _run((18, 60), 490, 500), _run((19, 120), 500, 500)])
    redis = out["tiers"]["redis"]
    assert (redis["p50"], redis["p99"]) == (19, 90)
    assert redis["per_run"] == [[31, 90], [18, 60], [19, 120]]
    assert (redis["events"], redis["observed"], redis["max"]) == (6000, 6000, 130)
    assert out["reps"] == 3 and out["probed"] == 1500
    assert out["warm"]["hit_share"] == 1490 / 1500
    rows = [str(r) for r in _tier_rows(out)]
    p50 = next(r for r in rows if "Latency p50, Redis" in r)
    assert "median of 3 runs of 20 s" in p50 and "runs: 31 / 18 / 19" in p50


def test_one_run_is_reported_as_it_was() -> None:
    run = _run((31, 90), 500, 500)
    out = combine([run])
    assert out["tiers"] == run["tiers"] and out["reps"] == 1
    rows = [str(r) for r in _tier_rows(out)]
    assert any("for 20 s" in r and "runs:" not in r for r in rows)
