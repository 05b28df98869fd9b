"""`python -m bench.chaos [--quick] [--faults a,b]`: the fault suite; results in bench/results/chaos.*"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import replace
from typing import Annotated

import typer

from bench.chaos import report
from bench.chaos.faults import all_faults, controls
from bench.chaos.run import FULL, QUICK, ChaosRun
from bench.common import RESULTS, first_line, measured_commit, one_command_app

app = one_command_app()


@app.command(help=first_line(__doc__))
def main(
    quick: Annotated[bool, typer.Option("--quick", help="fewer faults, shorter")] = False,
    faults: Annotated[str, typer.Option(help="only these faults, by name (comma-separated)")] = "",
    rate: Annotated[float | None, typer.Option(help="events per second")] = None,
    cap: Annotated[
        float | None, typer.Option(help="the longest wait for recovery, seconds (every fault)")
    ] = None,
) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # A broker that is down is what the suite is for: aiokafka's reconnect chatter is not news.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    # A sink SIGKILLed mid-request leaves the Cloudflare stand-in a ClientDisconnect, which
    # uvicorn prints as a traceback: the fault doing its job, not the suite failing.
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    plan = QUICK if quick else FULL
    if rate is not None:
        plan = replace(plan, rate=rate)
    if cap is not None:
        plan = replace(plan, cap_s=cap, cap_override=True)
    chosen = all_faults(quick)
    if faults:
        names = [n.strip() for n in faults.split(",") if n.strip()]
        known = {f.name: f for f in [*all_faults(False), *controls()]}
        known |= {f.name: f for f in chosen}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise typer.BadParameter(f"unknown faults {unknown}; known: {sorted(known)}")
        chosen = [known[n] for n in names]
    run = ChaosRun(plan)
    measured = measured_commit()
    out = asyncio.run(run.run_all(chosen))
    out["commit"] = measured
    out["regions"] = run.regions
    name = "chaos" if not faults else "chaos-partial"
    report.write(out, RESULTS, name)
    print()
    print(report.markdown(out))
    print(f"written: bench/results/{name}.md, {name}.json")
    if "error" in out:
        print(f"chaos run failed: {out['error']}", file=sys.stderr)
        raise typer.Exit(2)
    lost = sum(f["purges"]["lost"] for f in out["faults"] if f["status"] == "run")
    if lost:
        print(f"{lost:,} purges lost (see bench/results/{name}.md)", file=sys.stderr)
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
