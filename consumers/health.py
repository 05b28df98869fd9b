"""What /healthz and /readyz answer, beside /metrics on the metrics port.

Each consumer loop of a run registers a `Check` (pipeline/assemble.py `watch_health`):

- **/healthz** (liveness) is 200 while every registered loop has polled Kafka within its
  limit (CACHESYNC_LIVENESS_TIMEOUT_S), 503 naming the loops that have not: a handler
  stuck on a hung call, an event loop that no longer turns. Restarting such a process
  loses nothing (offsets are committed only after the effect). Read without the event
  loop's help, so a blocked loop cannot hide itself.
- **/readyz** (readiness) is 200 when every loop has partitions assigned and its backend
  answered a cheap probe (a Redis sink's PING, a TCP connection to a CDN's API or an
  edge), 503 naming each loop that is not, and why. The probes run on the event loop,
  each within `probe_timeout_s`; while the run drains after SIGTERM every loop says
  "stopping".

Both answer JSON: `{"status": "ok" | "fail", "checks": {loop: "ok" | why not}}`.
The HTTP server runs in its own thread (telemetry.py `serve_metrics`); `health` is the
process's one registry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

OK = "ok"


@dataclass(frozen=True)
class Check:
    """One consumer loop: `alive` is read from the server's thread (it must be cheap and
    touch nothing but plain attributes); `ready` runs on the loop's event loop."""

    name: str
    alive: Callable[[], str | None]
    ready: Callable[[], Awaitable[str | None]]
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True)
class Answer:
    ok: bool
    checks: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        status = OK if self.ok else "fail"
        return json.dumps({"status": status, "checks": self.checks}, sort_keys=True).encode()


class Health:
    """The registered checks, and the answers built from them."""

    def __init__(
        self, *, probe_timeout_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.probe_timeout_s = probe_timeout_s
        self.clock = clock
        self._checks: dict[str, Check] = {}
        self._lock = threading.Lock()

    def register(
        self,
        name: str,
        *,
        alive: Callable[[], str | None],
        ready: Callable[[], Awaitable[str | None]],
    ) -> None:
        """Watch the loop `name`; called on the event loop its `ready` probe runs on."""
        check = Check(name, alive, ready, asyncio.get_running_loop())
        with self._lock:
            self._checks[name] = check

    def unregister(self, names: Iterable[str]) -> None:
        with self._lock:
            for name in names:
                self._checks.pop(name, None)

    def _current(self) -> list[Check]:
        with self._lock:
            return list(self._checks.values())

    def liveness(self) -> Answer:
        """Every loop has polled recently. No loop yet (starting, or finished): alive; a
        process that never gets to its loops fails its start-up, it does not hang here."""
        checks = {c.name: c.alive() or OK for c in self._current()}
        return Answer(all(v == OK for v in checks.values()), checks)

    def readiness(self) -> Answer:
        """Every loop has partitions and its backend answers. Called from another thread
        than the event loop's (the HTTP server's): each probe is handed to its loop."""
        current = self._current()
        if not current:
            return Answer(False, {"run": "no consumer loop is running"})
        futures: dict[str, concurrent.futures.Future[str | None]] = {}
        checks: dict[str, str] = {}
        for check in current:
            try:
                futures[check.name] = asyncio.run_coroutine_threadsafe(
                    self._probe(check), check.loop
                )
            except RuntimeError:  # its event loop is closed: the run is over
                checks[check.name] = "not running"
        # A little longer than the probes' own timeout: a loop that does not even get to
        # run them in that time is busy past any readiness.
        deadline = self.clock() + self.probe_timeout_s + 0.5
        for name, future in futures.items():
            try:
                checks[name] = future.result(max(0.0, deadline - self.clock())) or OK
            except TimeoutError:
                future.cancel()
                checks[name] = f"event loop did not answer within {self.probe_timeout_s:g}s"
            except Exception as exc:  # a probe that fails unexpectedly says so, never 500
                checks[name] = f"probe failed: {type(exc).__name__}: {exc}"
        return Answer(all(v == OK for v in checks.values()), checks)

    async def _probe(self, check: Check) -> str | None:
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                return await check.ready()
        except TimeoutError:
            return f"no answer within {self.probe_timeout_s:g}s"


health = Health()

_PATHS = {"/healthz": Health.liveness, "/readyz": Health.readiness}


def health_app(registry: Health, fallback: WSGIApplication) -> WSGIApplication:
    """A WSGI app answering /healthz and /readyz from `registry`, everything else from
    `fallback` (Prometheus' /metrics)."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        answer_of = _PATHS.get(environ.get("PATH_INFO", ""))
        if answer_of is None:
            return fallback(environ, start_response)
        answer = answer_of(registry)
        body = answer.body()
        status = "200 OK" if answer.ok else "503 Service Unavailable"
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        start_response(status, headers)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    return app
