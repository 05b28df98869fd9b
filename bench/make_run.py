"""`make run`'s sustained rate: `cachesync run all --demo` in one process, measured from outside.

The process runs what `make run` runs: the mapper, every sink of every region the local
stack can serve, the demo traffic (its guests and its event generator) and the
consistency checker, on topics and groups of this run's own. After a warm-up, over a
window, the broker says:

- how many events the demo published (the content topics' end offsets);
- how many of them the mapper handled (its group's committed offsets);
- how far behind each sink's group is at the start and at the end of the window: a
  backlog that grows by more than the sink may hold by design is a rate not sustained.

The sustained rate is what the mapper handled per second, if no sink fell further behind
over the window (else the rate the slowest sink group kept up with). The process's CPU
share comes from /proc.

    .venv/bin/python -m bench.make_run [--rate 250] [--seconds 30]

`make bench` asks for more than the 200 events/s the target names, so that the figure is
what the process keeps up with rather than the rate it was asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from bench.common import (
    REPO,
    bench_settings,
    cdn_env,
    one_command_app,
    runnable_sinks,
    stack_env,
    stop_process,
)
from bench.harness import Lag
from cachesync.consumers.settings import Settings
from cachesync.topology.admin import delete_topics

WARM_UP_S = 15.0
# How long the idle CPU of `run all` (no traffic) is measured.
IDLE_S = 10.0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_make_run(rate: int, seconds: float) -> dict[str, Any]:
    """`cachesync run all --demo --rate RATE` for WARM_UP_S + `seconds`; its figures."""
    if rate <= 0:
        return {"status": "skipped", "detail": "not part of the smoke run"}
    stack_env()
    prefix = f"runall-{uuid.uuid4().hex[:8]}"
    settings = bench_settings(prefix)
    env = {
        **os.environ,
        **cdn_env(),
        "CACHESYNC_TOPIC_PREFIX": settings.topic_prefix,
        "CACHESYNC_GROUP_PREFIX": settings.group_prefix,
        "CACHESYNC_METRICS_PORT": "0",
    }
    cli = str(Path(sys.executable).with_name("cachesync"))
    apply = await asyncio.create_subprocess_exec(
        cli, "topology", "apply", env=env, stdout=asyncio.subprocess.DEVNULL
    )
    if await apply.wait() != 0:
        return {"status": "failed", "detail": "cachesync topology apply failed"}
    log = Path(REPO / ".stack" / f"{prefix}.log")
    idle = await _idle_cpu_share(cli, env, log.with_suffix(".idle.log"))
    proc = await _start(cli, ("run", "all", "--demo", "--rate", str(rate)), env, log)
    try:
        await asyncio.sleep(WARM_UP_S)
        if proc.returncode is not None:
            return {"status": "failed", "detail": f"run all exited: see {log}"}
        sink_groups = {
            f"{region}/{kind}": settings.group_id("sink", region, kind)
            for region, kind in runnable_sinks(env)
        }
        async with Lag(settings.kafka_bootstrap_servers) as lag:

            async def sample() -> dict[str, tuple[int, int]]:
                now = {
                    "mapper": await lag.progress(
                        settings.group_id("mapper"), settings.content_topics
                    )
                }
                for name, group in sink_groups.items():
                    region = name.split("/")[0]
                    now[name] = await lag.progress(group, [settings.commands_topic(region)])
                return now

            cpu0, t0, first = _cpu_s(proc.pid), time.monotonic(), await sample()
            await asyncio.sleep(seconds)
            cpu1, t1, last = _cpu_s(proc.pid), time.monotonic(), await sample()
    finally:
        await stop_process(proc)
        with contextlib.suppress(Exception):
            await delete_topics(settings.kafka_bootstrap_servers, settings.topic_prefix)
    _forget_logs(log, idle_too=idle is not None)
    window = t1 - t0
    mapper_done = last["mapper"][0] - first["mapper"][0]
    published = mapper_done + last["mapper"][1] - first["mapper"][1]
    sinks: dict[str, dict[str, Any]] = {
        name: {"lag_start": first[name][1], "lag_end": last[name][1]}
        for name in sink_groups
        if name in first
    }
    # A sink group kept up if its backlog grew by less than what it may hold by design:
    # its offsets are committed once a second (so its backlog read from the broker swings
    # by that much, and by as much again between two readings), and a CDN sink holds a
    # coalesced batch uncommitted for up to its window (CloudFront's is 10 s), so two
    # readings can fall on a trough and a peak of that saw. Otherwise the rate sustained
    # is the mapper's scaled by the share of its commands that sink applied.
    sustained = mapper_done / window
    for name, s in sinks.items():
        done = last[name][0] - first[name][0]
        grew = s["lag_end"] - s["lag_start"]
        s["may_hold_s"] = may_hold = _may_hold_s(settings, name.split("/")[1])
        s["kept_up"] = grew <= may_hold * (done + grew) / window
        if not s["kept_up"]:
            sustained = min(sustained, mapper_done / window * done / (done + grew))
    return {
        "status": "ok",
        "rate": rate,
        "seconds": window,
        "published_per_s": published / window,
        "mapped_per_s": mapper_done / window,
        "sustained_per_s": sustained,
        "sinks": sinks,
        "cpu_share": (cpu1 - cpu0) / window,
        "idle_cpu_share": idle,
        "idle_seconds": IDLE_S,
    }


def _forget_logs(log: Path, *, idle_too: bool) -> None:
    """The logs of a run that went well: only a failed process's log is kept, for
    whoever reads why (they piled up in .stack/, one pair per run)."""
    log.unlink(missing_ok=True)
    if idle_too:
        log.with_suffix(".idle.log").unlink(missing_ok=True)


def _may_hold_s(settings: Settings, kind: str) -> float:
    """How many seconds of its traffic a sink of `kind` may hold uncommitted by design:
    the commit interval twice, plus a CDN sink's coalescing window."""
    held_s = 2 * settings.commit_interval_ms / 1000
    if kind == "redis":
        return held_s
    window_ms = settings.topology.cdn.window_ms
    if kind == "cloudfront":
        window_ms = max(window_ms, settings.topology.cdn.cloudfront.window_ms)
    return held_s + window_ms / 1000


async def _start(
    cli: str, args: tuple[str, ...], env: dict[str, str], log: Path
) -> asyncio.subprocess.Process:
    out = await asyncio.to_thread(log.open, "wb")
    with out:
        return await asyncio.create_subprocess_exec(cli, *args, env=env, stdout=out, stderr=out)


async def _idle_cpu_share(cli: str, env: dict[str, str], log: Path) -> float | None:
    """`run all` without traffic (every sink and the checker on): its share of a core over
    IDLE_S, once started (WARM_UP_S). None if it exited."""
    proc = await _start(cli, ("run", "all"), env, log)
    try:
        await asyncio.sleep(WARM_UP_S)
        if proc.returncode is not None:
            return None
        cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
        await asyncio.sleep(IDLE_S)
        return (_cpu_s(proc.pid) - cpu0) / (time.monotonic() - t0)
    finally:
        await stop_process(proc)


app = one_command_app()


@app.command()
def main(
    rate: Annotated[int, typer.Option(help="the demo's events per second")] = 250,
    seconds: Annotated[float, typer.Option(help="the measured window")] = 30.0,
) -> None:
    """`make run`'s sustained demo rate, measured from the broker."""
    r = asyncio.run(bench_make_run(rate, seconds))
    if r["status"] != "ok":
        raise SystemExit(f"{r['status']}: {r['detail']}")
    print(
        f"run all --demo --rate {rate}: published {r['published_per_s']:.1f}/s, mapped "
        f"{r['mapped_per_s']:.1f}/s, sustained {r['sustained_per_s']:.1f}/s over "
        f"{r['seconds']:.0f} s; one process at {r['cpu_share']:.0%} of a core"
    )
    if r["idle_cpu_share"] is not None:
        print(f"idle, no traffic: {r['idle_cpu_share']:.1%} of a core over {IDLE_S:.0f} s")
    for name, s in r["sinks"].items():
        kept = "kept up" if s["kept_up"] else "fell behind"
        print(
            f"  {name:28s} backlog {s['lag_start']:,} -> {s['lag_end']:,} "
            f"(may hold {s['may_hold_s']:g} s; {kept})"
        )


if __name__ == "__main__":
    app()
