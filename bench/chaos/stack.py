"""The chaos suite's own stack: its own directory, every port offset from the defaults, its own PIDs.

The suite kills brokers and processes, so it never runs on the shared stack (`.stack/`,
Kafka on 19092, Redis on 16379-16382, ...), which others use at the same time.
`deploy/local/up.sh` brings up a second one in `.stack-chaos/` on the default ports
+ 1000, two more Varnish edges are added so each region has its own, and every
process the suite starts gets an environment that names only this stack.

A signal goes only to a PID read from `.stack-chaos/run/` whose command line names
this stack (its directory or its port), never to one listed in `.stack/run/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from bench.common import REPO, read_env_file
from cachesync.consumers.settings import region_env_var, region_var

STACK_DIR = REPO / ".stack-chaos"
SHARED_DIR = REPO / ".stack"
OFFSET = 1000
# The defaults of deploy/local/env.sh and up.d/*.sh, which the shared stack uses.
DEFAULT_PORTS = {
    "KAFKA_PORT": 19092,
    "KAFKA_CONTROLLER_PORT": 19093,
    "REDIS_PORT_US_EAST": 16379,
    "REDIS_PORT_EU_WEST": 16380,
    "REDIS_PORT_AP_SOUTHEAST": 16381,
    "REDIS_PORT_STATE": 16382,
    "CLOUDFLARE_STUB_PORT": 16095,
    "MOTO_PORT": 16096,
    "VARNISH_PORT": 16081,
    "ORIGIN_PORT": 16090,
}
PORTS = {name: port + OFFSET for name, port in DEFAULT_PORTS.items()}
# The region served by up.sh's Varnish; the others get an edge of their own here.
FIRST_EDGE_REGION = "us-east"
EXTRA_EDGE_PORTS = {"eu-west": PORTS["VARNISH_PORT"] + 1, "ap-southeast": PORTS["VARNISH_PORT"] + 2}
# The Cloudflare stand-in the suite serves itself (storms, ledger); up.sh's stays idle.
CLOUDFLARE_PORT = PORTS["MOTO_PORT"] + 1
CLOUDFLARE_TOKEN = "chaos-cloudflare-token"  # the stand-in's; never a real one
# Variables that could point a process at another stack: dropped, then set again below.
_FOREIGN = (
    "KAFKA_",
    "REDIS_",
    "CACHESYNC_",
    "CLOUDFLARE_",
    "CLOUDFRONT_",
    "EDGE_URL_",
    "AWS_",
    "VARNISH_",
    "ORIGIN_",
    "MOTO_",
    "OTEL_",
)


class StackError(RuntimeError):
    """The chaos stack could not be brought up, or a signal was refused as unsafe."""


def _redis_port_var(name: str) -> str:
    return region_var("REDIS_PORT_", name)


class ChaosStack:
    """Brings the stack up and down, and signals its processes (only its own)."""

    def __init__(self, regions: list[str], directory: Path = STACK_DIR) -> None:
        self.dir = directory
        self.regions = regions
        self.ports = dict(PORTS)
        self.log_dir = directory / "log"
        self.cdn: dict[str, str] = {}
        self.shared_pids = _pids_in(SHARED_DIR / "run")
        for port in [*self.ports.values(), *EXTRA_EDGE_PORTS.values(), CLOUDFLARE_PORT]:
            if port in DEFAULT_PORTS.values():
                raise StackError(f"port {port} is one of the shared stack's")

    # -- addresses ------------------------------------------------------------
    def redis_port(self, name: str) -> int:
        return self.ports[_redis_port_var(name)]

    def redis_url(self, name: str, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.redis_port(name)}/{db}"

    def edge_port(self, region: str) -> int:
        return EXTRA_EDGE_PORTS.get(region, self.ports["VARNISH_PORT"])

    def edge_url(self, region: str) -> str:
        return f"http://127.0.0.1:{self.edge_port(region)}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports['KAFKA_PORT']}"

    @property
    def cloudflare_url(self) -> str:
        return f"http://127.0.0.1:{CLOUDFLARE_PORT}"

    def stack_env(self) -> dict[str, str]:
        """What up.sh and down.sh need: this stack's directory and ports, nothing else."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN)}
        env.update({name: str(port) for name, port in self.ports.items()})
        env["CACHESYNC_STACK_DIR"] = str(self.dir)
        env["KAFKA_HEAP_MB"] = "512"
        env["REDIS_INSTANCES"] = " ".join(
            f"{name}:{self.redis_port(name)}" for name in [*self.regions, "state"]
        )
        env["PYTHON"] = str(REPO / ".venv" / "bin" / "python")
        return env

    def env(self) -> dict[str, str]:
        """The environment of every pipeline process: addresses of this stack only."""
        env = self.stack_env()
        env.update(
            {
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "CACHESYNC_STATE_REDIS_URL": self.redis_url("state"),
                "CACHESYNC_METRICS_PORT": "0",  # 16 processes; and 9464 may be someone's
                "OTEL_SDK_DISABLED": "true",
                "OTEL_TRACES_EXPORTER": "none",
                "PYTHONUNBUFFERED": "1",
                "CLOUDFLARE_API_URL": self.cloudflare_url,
                "CLOUDFLARE_API_TOKEN": CLOUDFLARE_TOKEN,
                "CLOUDFRONT_ENDPOINT_URL": self.cdn["CLOUDFRONT_ENDPOINT_URL"],
                "AWS_ACCESS_KEY_ID": self.cdn.get("AWS_ACCESS_KEY_ID", "testing"),
                "AWS_SECRET_ACCESS_KEY": self.cdn.get("AWS_SECRET_ACCESS_KEY", "testing"),
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        for region in self.regions:
            env[region_env_var(region)] = self.redis_url(region)
            env[region_var("EDGE_URL_", region)] = self.edge_url(region)
            env[region_var("CLOUDFLARE_ZONE_", region)] = f"chaos-zone-{region}"
            var = region_var("CLOUDFRONT_DISTRIBUTION_", region)
            env[var] = self.cdn[var]
        return env

    def adopt(self) -> None:
        """Make this process's own environment the pipeline's (settings are read from it)."""
        env = self.env()
        for key in [k for k in os.environ if k.startswith(_FOREIGN)]:
            del os.environ[key]
        os.environ.update(env)

    # -- up and down ----------------------------------------------------------
    async def up(self) -> None:
        """A fresh stack: stop and wipe what a previous run left (ours only), then up.sh,
        then the extra edges."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._kafka_jars()
        await self._script("down.sh", "--wipe")
        await self._script("up.sh")
        self.cdn = read_env_file(self.dir / "cdn.env")
        for region, port in EXTRA_EDGE_PORTS.items():
            if region in self.regions:
                await self._start_edge(region, port)

    async def restart_services(self) -> None:
        """up.sh again: it starts only what is down (a killed broker, a killed Redis)."""
        await self._script("up.sh")

    async def down(self) -> None:
        """Wake anything frozen, then down.sh by this stack's PID files."""
        for name in [*self.regions, "state"]:
            with contextlib.suppress(StackError, ProcessLookupError):
                self.signal(f"redis-{name}", signal.SIGCONT)
        await self._script("down.sh")

    def _kafka_jars(self) -> None:
        """The broker's jars, linked from the shared stack's copy when it has one (no Maven)."""
        lib, shared = self.dir / "kafka" / "lib", SHARED_DIR / "kafka" / "lib"
        if (lib / ".complete").exists() or not (shared / ".complete").exists():
            return
        lib.parent.mkdir(parents=True, exist_ok=True)

        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        shutil.copytree(shared, lib, copy_function=link, dirs_exist_ok=True)

    async def _script(self, name: str, *args: str) -> None:
        log = self.log_dir / "stack.log"
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                "bash",
                str(REPO / "deploy" / "local" / name),
                *args,
                cwd=REPO,
                env=self.stack_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            code = await proc.wait()
        if code != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise StackError(f"deploy/local/{name} {' '.join(args)} failed ({code}):\n{tail}")

    async def _start_edge(self, region: str, port: int) -> None:
        """One more Varnish (same VCL, same origin), its PID file in run/ so down.sh stops it."""
        pidf = self.dir / "run" / f"varnish-{region}.pid"
        if _alive(pidf) and _http_ok(port):
            return
        work = self.dir / f"varnish-{region}" / "work"
        work.mkdir(parents=True, exist_ok=True)
        # As up.d/varnish.sh does it: setsid, so the edge outlives this process until down.sh.
        command = " ".join(
            [
                "setsid varnishd -j none -F",
                f"-n '{work}' -a 127.0.0.1:{port} -T 127.0.0.1:0",
                f"-f '{self.dir / 'varnish' / 'default.vcl'}' -s malloc,64m",
                f">>'{self.log_dir / f'varnish-{region}.log'}' 2>&1 </dev/null &",
                f"echo $! > '{pidf}'",
            ]
        )
        proc = await asyncio.create_subprocess_exec("bash", "-c", command, cwd=REPO)
        if await proc.wait() != 0:
            raise StackError(f"varnish for {region}: could not start it")
        deadline = time.monotonic() + 30
        while not _http_ok(port):
            if time.monotonic() > deadline or not _alive(pidf):
                raise StackError(f"varnish for {region} did not come up on :{port}")
            await asyncio.sleep(0.3)

    # -- signals ----------------------------------------------------------------
    def pid(self, name: str) -> int | None:
        return _pid(self.dir / "run" / f"{name}.pid")

    def signal(self, name: str, sig: signal.Signals) -> int:
        """Send `sig` to this stack's service `name` (kafka, redis-eu-west, ...); refused
        unless the PID is ours beyond doubt."""
        pid = self.pid(name)
        if pid is None:
            raise StackError(f"{name}: no PID file in {self.dir / 'run'}")
        if pid in self.shared_pids:
            raise StackError(f"{name}: PID {pid} belongs to the shared stack; refusing")
        needle = self._needle(name)
        if needle not in _cmdline(pid):
            raise StackError(f"{name}: PID {pid} does not name {needle!r}; refusing")
        os.kill(pid, sig)
        return pid

    def _needle(self, name: str) -> str:
        """What the command line of this stack's service `name` must contain."""
        if name.startswith("redis-"):
            return f"127.0.0.1:{self.redis_port(name.removeprefix('redis-'))}"
        return str(self.dir)


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _pids_in(run_dir: Path) -> set[int]:
    return {pid for f in run_dir.glob("*.pid") if (pid := _pid(f)) is not None}


def _alive(pidf: Path) -> bool:
    pid = _pid(pidf)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def listeners(ports: list[int]) -> dict[int, list[int]]:
    """Which PIDs listen on each of `ports` (from `ss -ltnp`): to show the shared stack untouched."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=False).stdout
    found: dict[int, list[int]] = {p: [] for p in ports}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        port_s = fields[3].rsplit(":", 1)[-1]
        if not port_s.isdigit() or int(port_s) not in found:
            continue
        found[int(port_s)] = sorted({int(p) for p in re.findall(r"pid=(\d+)", line)})
    return found
