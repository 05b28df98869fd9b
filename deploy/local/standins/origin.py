"""A tiny origin for the local edge: every page carries surrogate keys (xkey) like the platform's.

`python -m deploy.local.standins.origin PORT`, run from the repository root, serves
any GET path with Cache-Control: public, max-age=3600, an `xkey` header naming the
keys the platform would tag that page with, and X-Origin-Generation, a counter that
tells a fresh fetch from a cached copy. Standard library only: it runs before the
project's virtualenv exists.
"""

from __future__ import annotations

import itertools
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_generation = itertools.count(1)

# path pattern -> surrogate keys, mirroring the tags in topology/topology.yaml's rules.
_RULES: list[tuple[re.Pattern[str], list[str]]] = [
    (
        re.compile(r"^/weddings/(?P<w>[^/]+)/photos/(?P<p>[^/.]+)"),
        ["wedding:{w}:photos", "photo:{p}"],
    ),
    (re.compile(r"^/weddings/(?P<w>[^/]+)/gallery"), ["wedding:{w}:photos"]),
    (
        re.compile(r"^/weddings/(?P<w>[^/]+)/albums/(?P<a>[^/]+)"),
        ["wedding:{w}:photos", "album:{a}"],
    ),
    (re.compile(r"^/weddings/(?P<w>[^/]+)"), ["wedding:{w}"]),
    (re.compile(r"^/w/(?P<w>[^/]+)"), ["wedding:{w}"]),
    (re.compile(r"^/vendors/(?P<v>[^/]+)"), ["vendor:{v}"]),
]


def surrogate_keys(path: str) -> list[str]:
    keys: list[str] = []
    for pattern, templates in _RULES:
        m = pattern.match(path)
        if m:
            keys.extend(t.format(**m.groupdict()) for t in templates)
    return list(dict.fromkeys(keys))


class Origin(BaseHTTPRequestHandler):
    server_version = "cachesync-origin/1"
    # Keep-alive, as a real origin behind Varnish: a new connection (and thread) per page
    # cost 0.45 ms of CPU per fetch, against 0.12 ms. Every answer has a Content-Length.
    # Without Nagle's algorithm: the headers and the body go out as two writes, and with
    # it the body waited for the delayed ACK, some 40 ms per page on a kept connection.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/_health":
            body = b"ok"
            self.send_response(200)
            self.send_header("Cache-Control", "no-store")
        else:
            generation = next(_generation)
            body = f"<html><body>{path} generation {generation}</body></html>".encode()
            self.send_response(200)
            self.send_header("Cache-Control", "public, max-age=3600")
            self.send_header("X-Origin-Generation", str(generation))
            keys = surrogate_keys(path)
            if keys:
                self.send_header("xkey", " ".join(keys))
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 16090
    ThreadingHTTPServer(("127.0.0.1", port), Origin).serve_forever()
