"""The Grafana dashboard and Prometheus alerts query only metrics the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from cachesync.consumers.telemetry import prometheus_families

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_METRIC = re.compile(r"\b(cachesync_[a-z0-9_]+)")
_SAMPLE_SUFFIX = re.compile(r"_(total|bucket|sum|count)$")


def _queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana/cachesync.json").read_text())
    out = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    alerts = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    out += [(r["alert"], r["expr"]) for g in alerts["groups"] for r in g["rules"]]
    return out


def test_every_query_names_an_exported_family() -> None:
    families = prometheus_families()
    missing = []
    for where, expr in _queries():
        for sample in _METRIC.findall(expr):
            family = _SAMPLE_SUFFIX.sub("", sample)
            kind = families.get(family)
            suffix = sample[len(family) :]
            if kind is None:
                missing.append(f"{where}: {sample} (no instrument exports {family})")
            elif suffix == "_total" and kind != "Counter":
                missing.append(f"{where}: {sample} is a {kind}, it has no _total")
            elif suffix in ("_bucket", "_sum", "_count") and kind != "Histogram":
                missing.append(f"{where}: {sample} is a {kind}, not a histogram")
            elif suffix == "" and kind == "Counter":
                missing.append(f"{where}: counter {sample} is exported as {sample}_total")
    assert not missing, "\n".join(missing)


def test_the_dashboard_covers_the_first_things_an_sre_asks() -> None:
    exprs = " ".join(e for _, e in _queries())
    for family in (
        "cachesync_consumer_lag",
        "cachesync_purge_latency_milliseconds_bucket",
        "cachesync_dead_lettered_total",
        "cachesync_cdn_throttled_total",
        "cachesync_warm_fetches_total",
        "cachesync_vendor_api_hits_total",
    ):
        assert family in exprs, family
