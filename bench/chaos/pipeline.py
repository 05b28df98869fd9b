"""The pipeline as separate `cachesync run` processes, kept alive the way a supervisor would.

The mapper and each (region, sink) run as their own process, so a fault can SIGKILL
exactly one of them. A process that exits without being told to (a crash) is
recorded with the tail of its log and started again after a short pause, as systemd
or Kubernetes would; a process killed by a fault stays down until the fault restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO

CACHESYNC = REPO / ".venv" / "bin" / "cachesync"
RESTART_AFTER_S = 2.0


@dataclass
class Exit:
    """A process that ended without the suite asking it to."""

    role: str
    at: float
    code: int | None
    tail: str

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "at": self.at, "code": self.code, "log_tail": self.tail}


@dataclass
class RoleProcess:
    name: str
    argv: list[str]
    log: Path
    proc: asyncio.subprocess.Process | None = None
    held_down: bool = False  # killed or stopped on purpose: not restarted by the supervisor
    starts: int = 0
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Pipeline:
    """Starts, kills, restarts and finally stops every role process."""

    def __init__(self, env: dict[str, str], regions: list[str], kinds: list[str], log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.roles: dict[str, RoleProcess] = {}
        self.add("mapper", ["run", "mapper"])
        for region in regions:
            for kind in kinds:
                self.add(
                    sink_name(region, kind), ["run", "sink", "--region", region, "--sink", kind]
                )
        self.exits: list[Exit] = []
        self._closing = False

    def add(self, name: str, args: list[str]) -> RoleProcess:
        role = RoleProcess(name, [str(CACHESYNC), *args], self.log_dir / f"{name}.log")
        self.roles[name] = role
        return role

    def of_kind(self, kind: str) -> list[str]:
        return [n for n in self.roles if n.startswith("sink.") and n.endswith(f".{kind}")]

    async def start_all(self) -> None:
        for name in list(self.roles):
            await self.start(name)

    async def start(self, name: str) -> None:
        role = self.roles[name]
        role.held_down = False
        if role.running:
            return
        with role.log.open("ab") as out:
            out.write(f"\n=== start {time.strftime('%H:%M:%S')} ===\n".encode())
            out.flush()
            role.proc = await asyncio.create_subprocess_exec(
                *role.argv,
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
            )
        role.starts += 1
        role.watcher = asyncio.create_task(self._watch(role, role.proc))

    async def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal a role process (our own child) and keep it down until `start`."""
        role = self.roles[name]
        role.held_down = True
        if role.proc is not None and role.proc.returncode is None:
            role.proc.send_signal(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(role.proc.wait(), timeout=30)
            if role.proc.returncode is None:
                role.proc.kill()
                await role.proc.wait()

    async def restart(self, name: str) -> None:
        await self.start(name)

    async def _watch(self, role: RoleProcess, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._closing or role.held_down or role.proc is not proc:
            return
        self.exits.append(Exit(role.name, time.time(), code, _tail(role.log)))
        await asyncio.sleep(RESTART_AFTER_S)
        if not self._closing and not role.held_down and role.proc is proc:
            await self.start(role.name)

    async def stop_all(self) -> None:
        """SIGTERM (drain and commit), then SIGKILL what is still running after 20 s."""
        self._closing = True
        live = [r for r in self.roles.values() if r.running]
        for role in live:
            assert role.proc is not None
            role.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*(self._ended(role) for role in live))
        for role in self.roles.values():
            if role.watcher is not None:
                role.watcher.cancel()

    @staticmethod
    async def _ended(role: RoleProcess, wait_s: float = 20) -> None:
        assert role.proc is not None
        try:
            await asyncio.wait_for(role.proc.wait(), timeout=wait_s)
        except TimeoutError:
            role.proc.kill()
            await role.proc.wait()

    def exits_since(self, t0: float) -> list[Exit]:
        return [e for e in self.exits if e.at >= t0]


def sink_name(region: str, kind: str) -> str:
    return f"sink.{region}.{kind}"


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])
