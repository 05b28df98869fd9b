"""The harness's output: the figure/ceiling/ratio table (markdown) and the plot (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Row = dict[str, str]


def _num(x: float | None, digits: int = 0) -> str:
    if x is None or x == float("inf"):
        return "unbounded"  # some events were not applied within the run
    return f"{x:,.{digits}f}"


def _spread(s: dict[str, float], digits: int = 0) -> str:
    if s["min"] == s["max"]:
        return _num(s["median"], digits)
    return f"{_num(s['median'], digits)} ({_num(s['min'], digits)}-{_num(s['max'], digits)})"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(out: dict[str, Any]) -> list[Row]:
    s = out["summary"]
    rows: list[Row] = []
    for key, figure, target in (
        ("mapper", "Mapper throughput, 1 core (events/s; decode, rules, produce x3 regions)", 0.7),
        ("sink", "Redis sink apply rate, 1 core (commands/s; decode, apply, commit)", 0.5),
    ):
        f = s[key]
        rows.append(
            {
                "figure": figure,
                "value": _spread(f["value"]),
                "ceiling": _spread(f["ceiling"])
                + (" (bare aiokafka loop)" if key == "mapper" else " (pipelined DELs)"),
                "ratio": _spread(f["ratio"], 2),
                "target": f"≥ {target}",
                "met": _met(f["ratio"]["median"] >= target),
            }
        )
    plan = out["plan"]
    runs = [(s["latency"], plan["latency_rate"], plan["latency_seconds"], out["latency"])]
    if out.get("latency_low"):
        low = out["latency_low"]
        runs.append(
            (
                {
                    q: {"median": low[q], "min": low[q], "max": low[q]}
                    for q in ("p50", "p99", "max")
                },
                low["rate"],
                low["seconds"],
                [low],
            )
        )
    for lat, rate, seconds, reps in runs:
        missed = sum(r["incomplete"] for r in reps)
        events = sum(r["events"] + r["incomplete"] for r in reps)
        note = f"; {missed:,} of {events:,} not applied within the run" if missed else ""
        for q in ("p50", "p99", "max"):
            p99 = lat["p99"]["median"]
            rows.append(
                {
                    "figure": f"End-to-end latency {q} (ms; event produced → purge applied in all 3 "
                    f"regions, {rate:,}/s for {seconds:.0f} s{note})",
                    "value": _spread(lat[q]),
                    "ceiling": "—",
                    "ratio": (_num(p99 / 100, 2) + " of 100 ms") if q == "p99" else "—",
                    "target": "< 100" if q == "p99" else "—",
                    "met": _met(p99 < 100) if q == "p99" else "—",
                }
            )
    b = s["backlog"]
    small, large = b["sizes"]
    for size, drain in zip(b["sizes"], b["drain_s"], strict=True):
        rows.append(
            {
                "figure": f"Backlog of {size:,} events: time to drain (s; mapper + 3 Redis sinks)",
                "value": _num(drain, 1),
                "ceiling": "—",
                "ratio": "—",
                "target": "—",
                "met": "—",
            }
        )
    peaks = {name: v[1] for name, v in b["peak_rss_mb"].items()}
    worst = max(peaks, key=lambda n: peaks[n])
    rows.append(
        {
            "figure": f"Peak RSS per process at {large:,} backlog (MB; worst: {worst})",
            "value": _num(peaks[worst], 1),
            "ceiling": "300 (limit)",
            "ratio": _num(peaks[worst] / 300, 2),
            "target": "< 300",
            "met": _met(peaks[worst] < 300),
        }
    )
    growth = {n: v[1] / v[0] for n, v in b["peak_rss_mb"].items()}
    worst = max(growth, key=lambda n: growth[n])
    rows.append(
        {
            "figure": f"Peak RSS growth {small:,} → {large:,} backlog (worst: {worst}, "
            f"{_num(b['peak_rss_mb'][worst][0], 1)} → {_num(b['peak_rss_mb'][worst][1], 1)} MB)",
            "value": f"x{growth[worst]:.2f}",
            "ceiling": "—",
            "ratio": "—",
            "target": "≤ x1.25 (bounded)",
            "met": _met(growth[worst] <= 1.25),
        }
    )
    cdn = out.get("cdn", {})
    if cdn.get("status") == "ok":
        for provider, t in cdn["totals"].items():
            ratio = t["calls"] / t["minimum"] if t["minimum"] else float("nan")
            rows.append(
                {
                    "figure": f"CDN API calls, {provider} (burst of {plan['cdn_events']:,} events, "
                    f"{plan['cdn_weddings']:,} weddings)",
                    "value": _num(t["calls"]),
                    "ceiling": f"{_num(t['minimum'])} (minimum the batch limits allow)",
                    "ratio": _num(ratio, 2),
                    "target": "≤ 1.10",
                    "met": _met(ratio <= 1.10),
                }
            )
    else:
        rows.append(
            {
                "figure": "CDN API calls vs minimum (bench/cdn_burst.py) — HOOK",
                "value": " ".join(
                    [cdn.get("status", "missing"), *cdn.get("detail", "").splitlines()[:1]]
                ),
                "ceiling": "—",
                "ratio": "—",
                "target": "≤ 1.10",
                "met": "—",
            }
        )
    return rows


def markdown(out: dict[str, Any], rows: list[Row]) -> str:
    head = ["figure", "value", "ceiling", "ratio", "target", "met?"]
    lines = [
        f"# cachesync benchmarks{' (smoke run)' if out['smoke'] else ''}",
        "",
        f"Run `{out['run']}`, {out['started_at']}, {out['machine']['cpus']} CPUs, "
        f"Python {out['machine']['python']}; one-core figures pinned to CPU "
        f"{out['machine']['pinned_cpu']}. Values are the median (min-max) of "
        f"{out['plan']['reps']} repeats (latency: {out['plan']['latency_reps']}), each ceiling "
        "measured in the same run. Plot: [latest.png](latest.png).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in rows:
        cells = [r["figure"], r["value"], r["ceiling"], r["ratio"], r["target"], r["met"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    b = out["summary"]["backlog"]
    lines.append(
        "Peak RSS by process (MB) at "
        + " / ".join(f"{n:,}" for n in b["sizes"])
        + " events of backlog: "
        + "; ".join(f"{name} {v[0]:.1f} / {v[1]:.1f}" for name, v in b["peak_rss_mb"].items())
        + "."
    )
    if out.get("profile"):
        lines.append(
            f"Slowest stage by ratio: **{out['profile']['slowest']}**; its profile is in "
            "[profile.txt](profile.txt)."
        )
    cdn = out.get("cdn", {})
    if cdn.get("status") != "ok":
        lines.append(
            f"CDN efficiency: bench/cdn_burst.py {cdn.get('status', 'missing')}; the hook is "
            "`bench.harness.bench_cdn` (it parses the script's `total <provider> N calls, "
            "minimum M` lines)."
        )
    return "\n".join(lines) + "\n"


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    reps = out["latency"]
    # The repeat whose p99 is the median one, so the curve is the figure the table quotes.
    rep = sorted(reps, key=lambda r: r["p99"])[len(reps) // 2]
    t = [row[0] for row in rep["timeline"]]
    for col, label, style in ((1, "p50", "-"), (2, "p99", "-"), (3, "max", ":")):
        ax1.plot(t, [row[col] for row in rep["timeline"]], style, label=label)
    low = out.get("latency_low")
    if low:
        lt = [row[0] for row in low["timeline"]]
        ax1.plot(lt, [row[2] for row in low["timeline"]], "--", label=f"p99 at {low['rate']:,}/s")
    ax1.axhline(100, color="red", linestyle="--", linewidth=1, label="p99 target 100 ms")
    ax1.set_yscale("log")
    ax1.set_xlabel("seconds into the measured window")
    ax1.set_ylabel("event → applied in all 3 regions (ms, per second)")
    ax1.set_title(
        f"End-to-end latency at {out['plan']['latency_rate']:,} events/s (applied events only)"
    )
    ax1.legend(loc="upper right", fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)

    s = out["summary"]
    labels = ["mapper\n(events/s)", "Redis sink\n(commands/s)"]
    x = range(len(labels))
    for offset, field, label in ((-0.2, "value", "cachesync"), (0.2, "ceiling", "ceiling")):
        med = [s[k][field]["median"] for k in ("mapper", "sink")]
        err = [
            [m - s[k][field]["min"] for k, m in zip(("mapper", "sink"), med, strict=True)],
            [s[k][field]["max"] - m for k, m in zip(("mapper", "sink"), med, strict=True)],
        ]
        ax2.bar([i + offset for i in x], med, 0.4, yerr=err, capsize=4, label=label)
    for i, k in enumerate(("mapper", "sink")):
        ax2.annotate(
            f"ratio {s[k]['ratio']['median']:.2f}",
            (i, s[k]["ceiling"]["median"]),
            xytext=(0, 6),
            textcoords="offset points",
            ha="center",
            fontsize=9,
        )
    ax2.set_xticks(list(x), labels)
    ax2.set_yscale("log")
    ax2.set_title("Throughput on one core against the ceiling")
    ax2.legend(fontsize=8)
    ax2.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
