"""The chaos run's results: `bench/results/chaos.md` (tables, then what went wrong) and `chaos.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SINK_COLUMNS = ("redis", "cloudflare", "cloudfront", "http_purge")


def _lost_cell(fault: dict[str, Any], sink: str, regions: list[str]) -> str:
    by_region = fault["purges"]["lost_by_sink"].get(sink, {})
    expected = fault["purges"]["expected_by_sink"].get(sink, {})
    if not expected:
        return "—"
    values = [by_region.get(r, 0) for r in regions]
    text = " · ".join(str(v) for v in values)
    return f"**{text}**" if any(values) else text


def _recovery(fault: dict[str, Any]) -> str:
    value = fault["recovery_s"]
    if value is None:
        return "**not recovered**" if fault["purges"]["lost"] else "—"
    return f"{value:.1f} s"


def _dead(fault: dict[str, Any]) -> str:
    dead = fault["dead_letters"]
    parts = [str(dead["total"])]
    if dead["poison_sent"]:
        parts.append(f"({dead['poison_dead_lettered']} of {dead['poison_sent']} poison)")
    if dead["other"]:
        parts.append(f"**{dead['other']} other**")
    return " ".join(parts)


def markdown(out: dict[str, Any]) -> str:
    regions: list[str] = out["regions"]
    run = [f for f in out["faults"] if f["status"] == "run"]
    lines = [
        "# Chaos: one fault at a time through the real pipeline, checked in the caches",
        "",
        f"Commit `{out['commit']}`, {out['started_at']}, "
        f"{'`--quick`' if out['plan']['quick'] else 'full run'}: {len(out['faults'])} faults in "
        f"{out['seconds'] / 60:.1f} min on {out['machine']['cpus']} CPUs; "
        f"{out['plan']['rate']:g} events/s, each fault on weddings and vendors of its own. "
        f"`python -m bench.chaos{' --quick' if out['plan']['quick'] else ''}` (`make chaos`).",
        "",
        "| fault | events acked | purges expected | purges lost | dead letters | recovery | "
        "unexpected process exits |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for f in out["faults"]:
        if f["status"] != "run":
            lines.append(f"| {f['title']} | {f['reason']} | | | | | |")
            continue
        lost = f["purges"]["lost"]
        moving = (f["purges"].get("draining_at_end") or {}).get("moving")
        draining = " (still draining)" if moving else ""
        lines.append(
            f"| {f['title']} | {f['events']['acknowledged']:,} | {f['purges']['expected']:,} | "
            f"{f'**{lost:,}**{draining}' if lost else '0'} | {_dead(f)} | {_recovery(f)} | "
            f"{len(f['process_exits']) or 0} |"
        )
    lines += [
        "",
        f"Purges lost per sink, by region ({' · '.join(regions)}); — where the sink has "
        "nothing to check for that fault:",
        "",
        "| fault | " + " | ".join(SINK_COLUMNS) + " |",
        "|---|" + "---:|" * len(SINK_COLUMNS),
    ]
    for f in run:
        cells = " | ".join(_lost_cell(f, s, regions) for s in SINK_COLUMNS)
        lines.append(f"| {f['name']} | {cells} |")
    lines += ["", *_legend(), "", "## What happened, fault by fault", ""]
    for f in run:
        lines += _details(f)
    shared = out.get("shared_stack", {})
    lines += [
        "## The shared stack",
        "",
        "The suite ran on its own stack (`.stack-chaos/`, every port the default + 1000) and "
        "signalled only PIDs from `.stack-chaos/run/` whose command line names that stack. "
        "Listeners on the shared stack's ports (`ss -ltnp`) before and after the run were "
        f"{'the same processes' if shared.get('untouched') else '**not the same**'}: "
        f"`{json.dumps(shared.get('listeners_after', {}))}`.",
        "",
    ]
    return "\n".join(lines)


def _legend() -> list[str]:
    return [
        "How it is checked (never from the project's own audit records or metrics): before "
        "each event is published, the keys its purge must delete (and an entry under each "
        "tag it purges) are written to each region's Redis, and the pages it must purge "
        "(each URL; a page under each prefix and one carrying each surrogate key) are fetched "
        "through each region's Varnish. The rules say which, run offline on the published "
        "bytes with an index of their own. After the fault, the keys must be gone, the pages "
        "must come from the origin again (a new `X-Origin-Generation`), each Cloudflare item "
        "must be covered by a purge the stand-in accepted after the event (its ledger: files, "
        "tags, prefixes, hosts), and each CloudFront path by an invalidation moto created "
        "after it (`list_invalidations`). A copy armed again by a later event counts once. "
        "**Recovery** runs from the end of the fault until every purge of the events "
        "published before that end was observed (observation every second or so); "
        "**not recovered** means some were still missing after the wait.",
    ]


def _details(f: dict[str, Any]) -> list[str]:
    lines = [f"### {f['title']} (`{f['name']}`)", ""]
    for note in f.get("notes", []):
        lines.append(f"- {note}")
    ev = f["events"]
    lines.append(
        f"- events: {ev['sent']:,} sent, {ev['acknowledged']:,} acknowledged by the broker"
        + (f", {ev['resends']} sent again after no ack" if ev["resends"] else "")
    )
    unarmed = f["purges"]["unarmed"]
    if unarmed:
        lines.append(
            "- not armed (the cache was away when the event was published): "
            + ", ".join(f"{k} {v:,}" for k, v in unarmed.items())
        )
    if f.get("not_delivered_arms"):
        lines.append(f"- {f['not_delivered_arms']} expectations dropped: events never acknowledged")
    if f.get("cloudflare_answers"):
        lines.append(
            "- Cloudflare stand-in answers: "
            + ", ".join(f"HTTP {k}: {v}" for k, v in f["cloudflare_answers"].items())
        )
    dead = f["dead_letters"]
    if dead["total"]:
        lines.append(
            "- dead letters: " + ", ".join(f"{k}: {v}" for k, v in dead["reasons"].items())
        )
    for example in dead["other_examples"]:
        lines.append(f"  - not poison: `{json.dumps(example)}`")
    by_sink = f.get("recovery_by_sink_s") or {}
    if by_sink:
        lines.append(
            "- every purge of the fault's events observed, per sink, after the fault ended: "
            + ", ".join(
                f"{s} {'not within the wait' if v is None else f'{v:.1f} s'}"
                for s, v in by_sink.items()
            )
        )
    obs = f.get("observation_s")
    if obs and obs["max"] > 3:
        lines.append(
            f"- one look at every cache took {obs['p50']:.1f} s (median), {obs['max']:.1f} s at "
            "most: recovery times are that coarse"
        )
    if f["caught_up_after_stream_s"] is not None:
        lines.append(
            f"- every purge observed {f['caught_up_after_stream_s']:.1f} s after the stream stopped"
        )
    for exit_ in f["process_exits"]:
        lines.append(f"- **{exit_['role']} exited** (code {exit_['code']}); its log ended:")
        lines += ["", "  ```", *(f"  {x}" for x in exit_["log_tail"].splitlines()), "  ```", ""]
    draining = f["purges"].get("draining_at_end")
    if draining:
        lines.append(
            f"- purges still pending when the wait ended, and {draining['window_s']} s before "
            "(region/sink: before → end): "
            + ", ".join(f"{g} {b:,} → {e:,}" for g, (b, e) in draining["groups"].items())
            + (
                ": all still going down, a backlog worked off more slowly than the wait"
                if draining["moving"]
                else ": some not moving"
            )
        )
    if f["purges"]["lost"]:
        lines.append(f"- **{f['purges']['lost']:,} purges lost**; first ones per region and sink:")
        lines += ["", "  | sink | region | key / item | event |", "  |---|---|---|---|"]
        for arm in f["purges"]["lost_examples"]:
            lines.append(
                f"  | {arm['sink']} | {arm['region']} | `{arm['item']}` | "
                f"{arm['event_type']} `{arm['event_id']}` |"
            )
    lines.append("")
    return lines


def write(out: dict[str, Any], results: Path, name: str = "chaos") -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (results / f"{name}.md").write_text(markdown(out))
