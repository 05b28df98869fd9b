"""A vendor API that caches like a real one: an ASGI app the tests and the benchmark serve with uvicorn.

Every path answers JSON about itself with `Cache-Control`, a strong `ETag` and
`Last-Modified`, and honours `If-None-Match` / `If-Modified-Since` with a bodiless
304. Per path, a test can slow it, make it fail in the ways real vendors do, change
its data (`bump`) and count what it was asked.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from typing import Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Failure = Literal["503", "500-html", "429", "404", "not-json", "huge", "no-body-304"]
_EPOCH = 1_750_000_000  # Last-Modified of version 0


@dataclass
class Behaviour:
    cache_control: str | None = "public, max-age=60"
    delay_s: float | tuple[float, float] = 0.0  # fixed, or uniform in [lo, hi]
    fail: Failure | None = None
    etag: bool = True
    last_modified: bool = True
    huge_bytes: int = 2_000_000


@dataclass
class VendorApiStub:
    """State shared between the test (any thread) and the app (uvicorn's thread)."""

    default: Behaviour = field(default_factory=Behaviour)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)  # every GET that reached us
    conditional: Counter[str] = field(default_factory=Counter)  # of which carried a validator
    not_modified: Counter[str] = field(default_factory=Counter)  # answered 304
    bodies: Counter[str] = field(default_factory=Counter)  # answered 200 with a body
    versions: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def configure(self, path: str, **changes: object) -> None:
        with self._lock:
            self.behaviours[path] = replace(self.behaviours.get(path, self.default), **changes)  # type: ignore[arg-type]

    def bump(self, path: str) -> None:
        """The vendor's data at `path` changed: new body, new ETag, new Last-Modified."""
        with self._lock:
            self.versions[path] += 1

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET"])])

    async def _handle(self, request: Request) -> Response:
        path = request.url.path
        with self._lock:
            behaviour = self.behaviours.get(path, self.default)
            version = self.versions[path]
            self.calls[path] += 1
            inm = request.headers.get("if-none-match")
            ims = request.headers.get("if-modified-since")
            if inm or ims:
                self.conditional[path] += 1
        delay = behaviour.delay_s
        if isinstance(delay, tuple):
            delay = random.uniform(*delay)
        if delay:
            await asyncio.sleep(delay)

        if behaviour.fail == "503":
            return Response('{"error": "maintenance"}', 503, media_type="application/json")
        if behaviour.fail == "500-html":
            page = "<html><body><h1>500 Internal Server Error</h1>nginx</body></html>"
            return Response(page, 500, media_type="text/html")
        if behaviour.fail == "429":
            return Response('{"error": "slow down"}', 429, headers={"retry-after": "30"})
        if behaviour.fail == "404":
            return Response('{"error": "no such vendor"}', 404, media_type="application/json")

        etag = f'"{hashlib.sha256(f"{path}:{version}".encode()).hexdigest()[:16]}"'
        last_modified = formatdate(_EPOCH + 60 * version, usegmt=True)
        headers = {"date": formatdate(usegmt=True)}
        if behaviour.cache_control is not None:
            headers["cache-control"] = behaviour.cache_control
        if behaviour.etag:
            headers["etag"] = etag
        if behaviour.last_modified:
            headers["last-modified"] = last_modified

        unchanged = (behaviour.etag and inm == etag) or (
            not inm and behaviour.last_modified and ims == last_modified
        )
        if unchanged and behaviour.fail != "no-body-304":
            with self._lock:
                self.not_modified[path] += 1
            return Response(status_code=304, headers=headers)

        with self._lock:
            self.bodies[path] += 1
        if behaviour.fail == "not-json":
            # A captive-portal style page with a 200: it must never be cached.
            return Response(
                "<html>Please log in</html>", 200, headers=headers, media_type="text/html"
            )
        payload: dict[str, object] = {
            "path": path,
            "version": version,
            "query": dict(request.query_params),
            "slots": [f"2026-06-{d:02d}" for d in range(1, 8)],
        }
        if behaviour.fail == "huge":
            payload["padding"] = "x" * behaviour.huge_bytes
        return Response(json.dumps(payload), 200, headers=headers, media_type="application/json")


def main(port: int) -> None:
    """Serve one stand-in for every vendor API of the local topology (each integration's
    `base_url` is a path on it: /availability/v1, /prices/v2, ...), as
    `deploy/local/up.d/vendor_api.sh` starts it. Ctrl-C or SIGTERM stops it."""
    import uvicorn

    uvicorn.run(VendorApiStub().app(), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    import sys

    main(int(sys.argv[1]))
