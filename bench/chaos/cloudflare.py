"""The Cloudflare stand-in of the chaos stack, served from the suite's own process.

It is `deploy/local/standins/cloudflare.py`'s contract stub, unchanged, in front of
which the suite can (1) answer a share of calls with 429 or 5xx for a while (a storm,
through the stub's own `fail_next`), and (2) read the stub's record of every call,
with wall-clock times: the ledger of accepted purges the oracle checks. Token
revocation is the stub's own feature when it has one (`revocation`); the suite does
not fake it.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from deploy.local.standins.cloudflare import CloudflareStub
from deploy.local.standins.serve import serve

# What a storm answers with: throttling and the 5xx a provider's bad day brings.
STORM_STATUSES = (429, 429, 500, 502, 503)


@dataclass(frozen=True)
class Accepted:
    """One purge call the stub accepted (HTTP 200)."""

    zone: str
    kind: str
    items: tuple[str, ...]
    at: float  # wall clock, seconds


class ChaosCloudflare:
    def __init__(self, token: str, *, seed: int = 12) -> None:
        self.stub = CloudflareStub(token=token)
        # A generous zone, as the local stack's: the sinks pace themselves (topology's rate).
        self.stub.set_rate(50, 50)
        self._storm_until = 0.0
        self._storm_share = 0.0
        self.storm_answers = 0
        self._rng = random.Random(seed)
        # StubCall.at is monotonic; the ledger speaks wall-clock time, like the events.
        self._wall_offset = time.time() - time.monotonic()
        self._read = 0

    async def _front(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The stub's ASGI app, with the storm in front of its purge endpoint."""
        if (
            scope.get("type") == "http"
            and scope.get("method") == "POST"
            and str(scope.get("path", "")).endswith("/purge_cache")
            and time.monotonic() < self._storm_until
            and self._rng.random() < self._storm_share
        ):
            self.stub.fail_next.append(self._rng.choice(STORM_STATUSES))
            self.storm_answers += 1
        await self.stub.app(scope, receive, send)

    @contextlib.contextmanager
    def serving(self, port: int) -> Iterator[str]:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await self._front(scope, receive, send)  # a plain function: uvicorn sees ASGI 3

        with serve(app, port=port) as url:
            yield url

    def storm(self, seconds: float, share: float) -> None:
        """From now on for `seconds`, answer `share` of purge calls with a 429 or a 5xx."""
        self._storm_share = share
        self._storm_until = time.monotonic() + seconds

    def calm(self) -> None:
        self._storm_until = 0.0
        self.stub.fail_next.clear()

    def new_accepted(self) -> list[Accepted]:
        """Accepted calls since the last read, oldest first."""
        calls = self.stub.calls
        end = len(calls)
        out = [
            Accepted(c.zone, str(c.kind), tuple(c.items), c.at + self._wall_offset)
            for c in calls[self._read : end]
            if c.status == 200 and c.kind is not None
        ]
        self._read = end
        return out

    def status_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for call in list(self.stub.calls):
            counts[call.status] = counts.get(call.status, 0) + 1
        return counts

    def revocation(self) -> tuple[Callable[[], Any], Callable[[], Any]] | None:
        """(revoke, restore) if the stub can revoke its token; None if it cannot (yet)."""
        for revoke_name, restore_name in (
            ("revoke_token", "restore_token"),
            ("revoke", "restore"),
            ("revoke_token", "unrevoke_token"),
        ):
            revoke = getattr(self.stub, revoke_name, None)
            restore = getattr(self.stub, restore_name, None)
            if callable(revoke) and callable(restore):
                return revoke, restore
        return None
