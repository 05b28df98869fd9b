"""The report as one self-contained HTML page: plotly's charts with plotly.js inlined, so the
page opens offline, from a file, with nothing fetched from anywhere.

Charts: hit ratio over time per region and tier with purge bursts marked; purge latency per
sink; invalidation cost per event type; warming's gain; the consistency checker's nines.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from cachesync.consumers.ops.consistency import Tally
from cachesync.consumers.ops.effectiveness.cost import Cost
from cachesync.consumers.ops.effectiveness.gather import RatioPoint, ReportData
from cachesync.consumers.ops.effectiveness.tiers import TIERS

_TIER_NAMES = {
    "redis": "Redis (INFO stats)",
    "varnish": "Varnish edge (varnishstat)",
    "cloudflare": "Cloudflare (GraphQL Analytics)",
    "cloudfront": "CloudFront (CloudWatch)",
}
_REGION_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
_TIER_COLORS = {
    "redis": "#d62728",
    "varnish": "#1f77b4",
    "cloudflare": "#ff7f0e",
    "cloudfront": "#2ca02c",
}
_CONFIG = {"displaylogo": False, "responsive": True}


def render(data: ReportData) -> str:
    """The page, as text."""
    sections = [
        _section(
            "Hit ratio per region and tier",
            "From each tier's own counters; shaded bands are purge bursts, bars the purges "
            "issued per interval.",
            _hit_ratio_chart(data),
        ),
        _section(
            "Purge latency per sink",
            "Event time to the sink's applied report (audit topic), per region.",
            _latency_chart(data),
        ),
        _section(
            "Invalidation cost per event type",
            f"Origin requests for the purged resources in the {data.window_s:g} s after each "
            f"purge, against the {data.window_s:g} s before it (per event).",
            _cost_chart(data.costs) + _cost_table(data.costs),
        ),
        _section(
            "Warming's gain",
            "Guest hits on a purged resource after the warmer refilled it and before any guest "
            "missed it: the misses warming saved (per event).",
            _warm_chart(data.costs),
        ),
        _section(
            "Consistency (nines)",
            "Share of sampled purges with no stale copy read back, as nines, per region and "
            "sink (the consistency checker of `run all`).",
            _nines_chart(data),
        ),
    ]
    since = _when(data.since_ms)
    until = _when(data.until_ms)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data.notes)
    return _PAGE.format(
        plotly=get_plotlyjs(),
        since=since,
        until=until,
        headline=_headline(data),
        sections="".join(sections),
        notes=f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "",
    )


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _times(values: Sequence[int]) -> list[dt.datetime]:
    return [dt.datetime.fromtimestamp(v / 1000, dt.UTC) for v in values]


def _section(title: str, caption: str, body: str) -> str:
    return (
        f'<section><h2>{html.escape(title)}</h2><p class="caption">{html.escape(caption)}</p>'
        f"{body}</section>"
    )


def _figure_html(fig: go.Figure, name: str) -> str:
    fig.update_layout(
        template="plotly_white",
        margin={"l": 60, "r": 30, "t": 40, "b": 40},
        legend={"orientation": "h", "y": -0.15},
        font={"family": "system-ui, sans-serif", "size": 12},
    )
    body: str = fig.to_html(
        full_html=False, include_plotlyjs=False, config=_CONFIG, div_id=f"chart-{name}"
    )
    return f'<div class="chart" data-chart="{name}">{body}</div>'


def _empty(what: str) -> str:
    return f'<p class="empty">No data: {html.escape(what)}</p>'


# -- headline -----------------------------------------------------------------------------
def _headline(data: ReportData) -> str:
    cells = []
    totals = data.tier_totals()
    for tier in TIERS:
        hits, misses = totals.get(tier, (0.0, 0.0))
        value = f"{hits / (hits + misses):.1%}" if hits + misses else "no data"
        cells.append(
            f'<div class="figure"><div class="value">{value}</div>'
            f'<div class="label">{html.escape(_TIER_NAMES[tier])} hit ratio'
            f"<br>{hits + misses:,.0f} lookups</div></div>"
        )
    events = len({p.event_id for p in data.purges})
    cells.append(
        f'<div class="figure"><div class="value">{events:,}</div>'
        f'<div class="label">events purged<br>{len(data.purges):,} purge commands</div></div>'
    )
    edge = [c for c in data.costs if c.tier == "varnish"]
    if edge:
        n = sum(c.events for c in edge)
        origin = sum(c.origin_after for c in edge)
        saved = sum(c.warm_saved for c in edge)
        cells.append(
            f'<div class="figure"><div class="value">{origin / n:.2f}</div>'
            f'<div class="label">edge origin requests per purge<br>'
            f"warming saved {saved / n:.2f} guest misses per purge</div></div>"
        )
    return '<div class="figures">' + "".join(cells) + "</div>"


# -- hit ratio over time --------------------------------------------------------------------
def _bucket_ms(data: ReportData) -> int:
    span = max(1, data.until_ms - data.since_ms)
    return max(5_000, math.ceil(span / 150 / 1000) * 1000)


def _hit_ratio_chart(data: ReportData) -> str:
    tiers = [t for t in TIERS if any(p.tier == t for p in data.ratios)]
    if not tiers:
        return _empty("no tier was read in this range")
    bucket = _bucket_ms(data)
    fig = make_subplots(
        rows=len(tiers),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=[_TIER_NAMES[t] for t in tiers],
        specs=[[{"secondary_y": True}] for _ in tiers],
    )
    regions = sorted({p.region for p in data.ratios})
    purges = _purges_per_bucket(data, bucket)
    for row, tier in enumerate(tiers, start=1):
        for n, region in enumerate(regions):
            xs, ys, lookups = _ratio_series(
                [p for p in data.ratios if p.tier == tier and p.region == region], bucket
            )
            if not xs:
                continue
            fig.add_trace(
                go.Scatter(
                    x=_times(xs),
                    y=ys,
                    customdata=lookups,
                    name=region,
                    legendgroup=region,
                    showlegend=row == 1,
                    mode="lines+markers",
                    marker={"size": 4},
                    line={"color": _REGION_COLORS[n % len(_REGION_COLORS)]},
                    hovertemplate="%{y:.1%} of %{customdata:.0f} lookups<extra>"
                    + region
                    + "</extra>",
                ),
                row=row,
                col=1,
                secondary_y=False,
            )
        if purges:
            fig.add_trace(
                go.Bar(
                    x=_times(sorted(purges)),
                    y=[purges[k] for k in sorted(purges)],
                    name="purges (events)",
                    legendgroup="purges",
                    showlegend=row == 1,
                    marker={"color": "rgba(120,120,120,0.35)"},
                    hovertemplate="%{y} events purged<extra></extra>",
                ),
                row=row,
                col=1,
                secondary_y=True,
            )
        fig.update_yaxes(
            range=[0, 1.02],
            tickformat=".0%",
            title_text="hit ratio",
            row=row,
            col=1,
            secondary_y=False,
        )
        fig.update_yaxes(title_text="purges", row=row, col=1, secondary_y=True, showgrid=False)
    for start in _bursts(purges):
        fig.add_vrect(
            x0=_times([start])[0],
            x1=_times([start + bucket])[0],
            fillcolor="rgba(214,39,40,0.12)",
            line_width=0,
        )
    fig.update_layout(height=260 * len(tiers) + 80, bargap=0.1)
    return _figure_html(fig, "hit-ratio")


def _ratio_series(
    points: Sequence[RatioPoint], bucket: int
) -> tuple[list[int], list[float], list[float]]:
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for p in points:
        key = p.at - p.at % bucket
        sums[key][0] += p.hits
        sums[key][1] += p.misses
    xs, ys, lookups = [], [], []
    for key in sorted(sums):
        hits, misses = sums[key]
        if hits + misses > 0:
            xs.append(key)
            ys.append(hits / (hits + misses))
            lookups.append(hits + misses)
    return xs, ys, lookups


def _purges_per_bucket(data: ReportData, bucket: int) -> dict[int, int]:
    events: dict[int, set[str]] = defaultdict(set)
    for p in data.purges:
        events[p.at - p.at % bucket].add(p.event_id)
    return {k: len(v) for k, v in events.items()}


def _bursts(purges: dict[int, int]) -> list[int]:
    """Buckets with far more purges than usual (over the mean + 2 standard deviations)."""
    if len(purges) < 3:
        return []
    counts = list(purges.values())
    limit = statistics.fmean(counts) + 2 * statistics.pstdev(counts)
    return sorted(k for k, n in purges.items() if n > limit)[:60]


# -- latency ---------------------------------------------------------------------------------
def _latency_chart(data: ReportData) -> str:
    if not data.latency_ms:
        return _empty("no sink reported an applied purge in this range")
    fig = go.Figure()
    regions = sorted({r for r, _ in data.latency_ms})
    for n, region in enumerate(regions):
        xs: list[str] = []
        ys: list[float] = []
        for (r, sink), values in sorted(data.latency_ms.items()):
            if r == region:
                xs += [sink] * len(values)
                ys += values
        fig.add_trace(
            go.Box(
                x=xs,
                y=ys,
                name=region,
                marker={"color": _REGION_COLORS[n % len(_REGION_COLORS)]},
                boxpoints=False,
            )
        )
    fig.update_layout(boxmode="group", height=380, yaxis={"title": "ms", "type": "log"})
    return _figure_html(fig, "latency")


# -- invalidation cost --------------------------------------------------------------------------
def _cost_chart(costs: Sequence[Cost]) -> str:
    if not costs:
        return _empty("no purge reached a tier whose requests were recorded")
    fig = go.Figure()
    types = sorted({c.event_type for c in costs})
    for tier in TIERS:
        mine = {c.event_type: c for c in costs if c.tier == tier}
        if not mine:
            continue
        color = _TIER_COLORS[tier]
        fig.add_trace(
            go.Bar(
                x=types,
                y=[mine[t].per_event(mine[t].origin_after) if t in mine else 0 for t in types],
                name=f"{tier}: after",
                marker={"color": color},
                offsetgroup=tier,
                hovertemplate="%{y:.2f} origin requests per event<extra>" + tier + "</extra>",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=types,
                y=[mine[t].per_event(mine[t].origin_before) if t in mine else 0 for t in types],
                name=f"{tier}: before",
                mode="markers",
                marker={"color": color, "symbol": "line-ew-open", "size": 22, "line": {"width": 3}},
                hovertemplate="%{y:.2f} per event before<extra>" + tier + "</extra>",
            )
        )
    fig.update_layout(barmode="group", height=420, yaxis={"title": "origin requests per event"})
    return _figure_html(fig, "cost")


def _cost_table(costs: Sequence[Cost]) -> str:
    if not costs:
        return ""
    rows = []
    for c in costs:
        rows.append(
            "<tr>"
            f"<td>{html.escape(c.event_type)}</td><td>{html.escape(c.tier)}</td>"
            f"<td>{c.events}</td>"
            f"<td>{c.per_event(c.origin_after):.2f}</td>"
            f"<td>{c.per_event(c.origin_before):.2f}</td>"
            f"<td>{c.excess_per_event:+.2f}</td>"
            f"<td>{c.per_event(c.misses_after):.2f}</td>"
            f"<td>{c.per_event(c.warm_saved):.2f}</td>"
            "</tr>"
        )
    return (
        '<table class="costs"><thead><tr><th>event type (rule)</th><th>tier</th><th>events</th>'
        "<th>origin requests / event after</th><th>before</th><th>excess</th>"
        "<th>misses / event after</th><th>warming saved / event</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _warm_chart(costs: Sequence[Cost]) -> str:
    warmed = [c for c in costs if c.warm_saved > 0 or c.tier == "varnish"]
    if not warmed:
        return _empty("no warmed tier had its requests recorded")
    fig = go.Figure()
    types = sorted({c.event_type for c in warmed})
    for tier in TIERS:
        mine = {c.event_type: c for c in warmed if c.tier == tier}
        if not mine:
            continue
        fig.add_trace(
            go.Bar(
                x=types,
                y=[mine[t].per_event(mine[t].warm_saved) if t in mine else 0 for t in types],
                name=f"{tier}: saved by warming",
                marker={"color": _TIER_COLORS[tier]},
                hovertemplate="%{y:.2f} guest misses saved per event<extra>" + tier + "</extra>",
            )
        )
        fig.add_trace(
            go.Bar(
                x=types,
                y=[mine[t].per_event(mine[t].origin_after) if t in mine else 0 for t in types],
                name=f"{tier}: origin requests",
                marker={"color": _TIER_COLORS[tier], "opacity": 0.35},
                hovertemplate="%{y:.2f} origin requests per event<extra>" + tier + "</extra>",
            )
        )
    fig.update_layout(barmode="group", height=380, yaxis={"title": "per event"})
    lines = []
    for c in sorted(warmed, key=lambda c: (c.event_type, c.tier)):
        if c.tier != "varnish":
            continue
        lines.append(
            f"<li><code>{html.escape(c.event_type)}</code>: "
            f"{c.per_event(c.origin_after):.1f} origin requests per event at the edge, "
            f"warming saved {c.per_event(c.warm_saved):.1f} guest misses</li>"
        )
    return _figure_html(fig, "warming") + (f"<ul>{''.join(lines)}</ul>" if lines else "")


# -- consistency --------------------------------------------------------------------------------
def _nines_chart(data: ReportData) -> str:
    if not data.consistency:
        return _empty("the consistency checker recorded nothing in this range")
    labels, nines, text = [], [], []
    for (region, sink), (probed, converged) in sorted(data.consistency.items()):
        tally = Tally(probed=probed, converged=converged)
        labels.append(f"{region} / {sink}")
        nines.append(round(tally.nines, 2))
        text.append(f"{tally.share:.2%} of {probed}")
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=nines,
            text=text,
            textposition="outside",
            marker={"color": "#17becf"},
            hovertemplate="%{y} nines (%{text})<extra></extra>",
        )
    )
    fig.update_layout(height=380, yaxis={"title": "nines"})
    return _figure_html(fig, "nines")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cachesync: cache effectiveness</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1rem 2rem;
       color: #222; background: #fafafa; }}
h1 {{ margin-bottom: 0.2rem; }}
.range {{ color: #666; margin-top: 0; }}
section {{ background: #fff; border: 1px solid #e4e4e4; border-radius: 6px; margin: 1.2rem 0;
          padding: 0.6rem 1.2rem 1rem; }}
.caption {{ color: #555; margin-top: 0; }}
.figures {{ display: flex; flex-wrap: wrap; gap: 0.8rem; }}
.figure {{ background: #fff; border: 1px solid #e4e4e4; border-radius: 6px; padding: 0.6rem 1rem;
          min-width: 150px; }}
.figure .value {{ font-size: 1.6rem; font-weight: 600; }}
.figure .label {{ color: #555; font-size: 0.85rem; }}
table.costs {{ border-collapse: collapse; width: 100%; font-size: 0.9rem; margin-top: 0.8rem; }}
table.costs th, table.costs td {{ border-bottom: 1px solid #eee; padding: 0.25rem 0.5rem;
                                 text-align: right; }}
table.costs th:nth-child(-n+2), table.costs td:nth-child(-n+2) {{ text-align: left; }}
.empty {{ color: #999; font-style: italic; }}
</style>
<script type="text/javascript">{plotly}</script>
</head><body>
<h1>Cache effectiveness</h1>
<p class="range">{since} to {until}</p>
{headline}
{sections}
{notes}
</body></html>
"""
