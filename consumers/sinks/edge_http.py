"""A lean HTTP/1.1 client for a region's edge: persistent connections, pipelined requests.

The HTTP-purge sink and the warmer talk to one Varnish/Fastly-style edge, with small
requests whose answers they read only the status line and a header or two of. Through
httpx each request cost about 1.6 ms of CPU (its transport stack, anyio, and a span
from the httpx instrumentation); the edge itself answers a PURGE in microseconds. This
client costs some 10 us of CPU per pipelined request against the local Varnish (30 us
for one at a time, as the warmer sends them):

- a pool of at most `connections` keep-alive connections, each an `asyncio.Protocol`
  that parses the answers itself (status line, headers, a Content-Length, chunked or
  read-to-close body), so a request is one `bytes` write and a response one buffer scan;
- `many` sends a batch pipelined: spread over the connections, `depth` requests written
  at a time on each, their answers read back in order (the edge answers a connection's
  requests one after the other, as HTTP/1.1 requires);
- a connection that gets no byte for `timeout_s` while it waits for an answer is closed,
  and so is one whose answer says `Connection: close` (after that answer).

Every failure to get an answer (refused, reset, timed out, not HTTP/1.x) is an
`EdgeError`, given per request: what it means for the batch is the caller's (the sinks
retry it with `sinks/retry.py`). Only idempotent requests belong here (GET, PURGE, BAN
and xkey purges are): a request whose connection died may have reached the edge, and it
is sent again.

`HttpxEdge` answers the same calls through an httpx transport: what unit tests inject
(`httpx.MockTransport`) to play an edge without a server.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast
from urllib.parse import quote, urlsplit

import httpx

# What a request target may not carry as it is (controls, space, DEL, beyond ASCII): it is
# percent-encoded there, as a browser or httpx sends it. What a header value may not carry
# at all (controls but the tab: a line break would end the header); it is sent as UTF-8.
_UNSAFE_TARGET = re.compile(r"[^\x21-\x7e]")
_UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_SAFE = "/:?#[]@!$&'()*+,;=%~"
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A response head larger than this is not an edge's answer.
MAX_HEAD_BYTES = 64 * 1024


def wire_target(target: str) -> str:
    """`target` as it goes on the wire: percent-encoded where it has a space, a control or
    a non-ASCII character (as a browser sends it, so as the edge caches it)."""
    if _UNSAFE_TARGET.search(target):
        return quote(target, safe=_TARGET_SAFE)
    return target


class EdgeError(Exception):
    """The edge gave no usable answer to a request: refused, reset, timed out, not HTTP/1.x."""


class InvalidRequest(ValueError):
    """A request that cannot be put on the wire (a header value with a line break)."""


@dataclass(frozen=True, slots=True)
class EdgeRequest:
    """One request to the edge: a method, a target (path and query) and extra headers."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, host: bytes, common: bytes) -> bytes:
        """The request on the wire, with `Host` and the client's `common` header lines."""
        target = wire_target(self.target)
        extra = ""
        for name, value in self.headers:
            if _UNSAFE_VALUE.search(value) or not _HEADER_NAME.fullmatch(name):
                raise InvalidRequest(f"header {name!r} cannot be sent: {value[:80]!r}")
            extra += f"{name}: {value}\r\n"
        return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (
            self.method.encode(),
            target.encode(),
            host,
            common,
            extra.encode(),
        )


class Headers(dict[str, str]):
    """Header values by name, whatever the case the caller spells it in (stored lower)."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name.lower() if isinstance(name, str) else name)

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


@dataclass(slots=True)
class EdgeResponse:
    """The edge's answer: status, reason, the raw header block (parsed on demand), body."""

    status: int
    reason: str
    head: bytes  # the header lines, without the status line
    body: bytes = b""
    _headers: dict[str, str] | None = field(default=None, repr=False)

    @property
    def status_code(self) -> int:  # as httpx names it
        return self.status

    @property
    def headers(self) -> Mapping[str, str]:
        """The headers by any case of their names; a repeated one's values joined by ", "."""
        if self._headers is None:
            # Built as a plain dict (its own methods, not Headers' case-folding ones, which
            # cost more than the parse itself at a warm's thousands of answers a second).
            parsed: dict[str, str] = {}
            for line in self.head.decode("latin-1").split("\r\n"):
                name, sep, value = line.partition(":")
                if not sep:
                    continue
                name, value = name.strip().lower(), value.strip()
                known = parsed.get(name)
                parsed[name] = value if known is None else f"{known}, {value}"
            self._headers = Headers(parsed)
        return self._headers

    def header(self, name: str, default: str | None = None) -> str | None:
        """One header's value, by any case of its name."""
        value: str | None = self.headers.get(name, default)
        return value


Answer = EdgeResponse | EdgeError


class EdgeHttp(Protocol):
    """What the sinks need of an edge client (`EdgeClient`, or `HttpxEdge` in unit tests)."""

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[str, str]] = ()
    ) -> EdgeResponse:
        """One request; raises EdgeError when no answer came."""
        ...

    async def many(self, requests: Sequence[EdgeRequest]) -> list[Answer]:
        """Every request of a batch, each with its answer or its EdgeError, in order."""
        ...

    async def aclose(self) -> None: ...


# -- the wire ---------------------------------------------------------------------


class _Batch:
    """Answers of requests written together on one connection, delivered at once."""

    __slots__ = ("answers", "future", "left")

    def __init__(self, count: int, future: asyncio.Future[list[Answer]]) -> None:
        self.answers: list[Answer] = []
        self.left = count
        self.future = future

    def add(self, answer: Answer) -> None:
        self.answers.append(answer)
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(self.answers)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: requests written in order, answers parsed in order."""

    def __init__(self, timeout_s: float, label: str) -> None:
        self.timeout_s = timeout_s
        self.label = label
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        # One entry per request awaiting its answer: its batch, and whether it was a HEAD.
        self._waiting: deque[tuple[_Batch, bool]] = deque()
        self._head: tuple[int, str, bytes] | None = None  # parsed head of the answer in hand
        self._body_left = 0  # Content-Length still to read; -1 chunked, -2 until close
        self._chunks: list[bytes] = []
        self._close_after = False
        self._loop = asyncio.get_running_loop()
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, as create_connection makes: uvloop's is not a subclass of
        # asyncio.Transport, so no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        if not self._waiting:
            # Bytes no request asked for (an idle edge's 408 before it hangs up): kept, they
            # would pass for the answer to the next request.
            self._fail(EdgeError(f"{self.label}: the edge sent {len(data)} bytes unasked"))
            return
        self._buf += data
        try:
            self._parse()
            if self._buf and not self._waiting and self._head is None:
                raise EdgeError(f"{self.label}: the edge sent {len(self._buf)} bytes unasked")
        except EdgeError as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        if self._head is not None and self._body_left == -2:
            self._finish(bytes(self._buf))
            self._buf.clear()
        self._fail(EdgeError(f"{self.label}: connection closed by the edge"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {type(exc).__name__}: {exc}" if exc else ""
        self._fail(EdgeError(f"{self.label}: connection lost{why}"))

    # -- requests
    def send(self, payload: bytes, heads: Sequence[bool]) -> asyncio.Future[list[Answer]]:
        """Write `payload` (len(heads) requests; True for a HEAD); its answers, in order."""
        future: asyncio.Future[list[Answer]] = self._loop.create_future()
        batch = _Batch(len(heads), future)
        if self.closed or self.transport is None:
            for _ in heads:
                batch.add(EdgeError(f"{self.label}: connection closed"))
            return future
        if not self._waiting:
            self._last_read = self._loop.time()
            self._arm()
        for head in heads:
            self._waiting.append((batch, head))
        self.transport.write(payload)
        return future

    @property
    def idle(self) -> bool:
        return not self._waiting and not self.closed

    def close(self) -> None:
        self._fail(EdgeError(f"{self.label}: connection closed"))

    # -- parsing
    def _parse(self) -> None:
        buf = self._buf
        while self._waiting:
            if self._head is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise EdgeError(f"{self.label}: response head over {MAX_HEAD_BYTES} bytes")
                    return
                if not self._start(bytes(buf[:end])):
                    del buf[: end + 4]
                    continue  # a 1xx answer: the real one follows
                del buf[: end + 4]
            if self._body_left >= 0:
                if len(buf) < self._body_left:
                    return
                body = bytes(buf[: self._body_left])
                del buf[: self._body_left]
                self._finish(body)
            elif self._body_left == -1:
                if not self._read_chunks():
                    return
            else:
                return  # read until the edge closes the connection

    def _start(self, head: bytes) -> bool:
        """Parse an answer's head; False for a 1xx, which has no answer of its own."""
        line, _, rest = head.partition(b"\r\n")
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise EdgeError(f"{self.label}: not an HTTP/1.x answer: {line[:60]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            return False
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        headers = b"\r\n" + rest.lower()
        is_head = self._waiting[0][1]
        self._close_after = b"\r\nconnection: close" in headers or parts[0] == b"HTTP/1.0"
        if is_head or status in (204, 304):
            self._body_left = 0
        elif b"\r\ntransfer-encoding:" in headers and b"chunked" in _value(
            headers, b"transfer-encoding"
        ):
            self._body_left = -1
        elif b"\r\ncontent-length:" in headers:
            length = _value(headers, b"content-length").strip()
            if not length.isdigit():
                raise EdgeError(f"{self.label}: bad Content-Length {length[:20]!r}")
            self._body_left = int(length)
        else:
            self._body_left = -2
            self._close_after = True
        self._head = (status, reason, rest)
        return True

    def _read_chunks(self) -> bool:
        """Consume chunked body parts; True once the last chunk (and trailers) is in."""
        buf = self._buf
        while True:
            end = buf.find(b"\r\n")
            if end < 0:
                return False
            size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise EdgeError(f"{self.label}: bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", end)
                if trailer_end < 0:
                    return False
                del buf[: trailer_end + 4]
                self._finish(b"".join(self._chunks))
                self._chunks = []
                return True
            if len(buf) < end + 2 + size + 2:
                return False
            self._chunks.append(bytes(buf[end + 2 : end + 2 + size]))
            del buf[: end + 2 + size + 2]

    def _finish(self, body: bytes) -> None:
        assert self._head is not None
        status, reason, head = self._head
        self._head = None
        batch, _ = self._waiting.popleft()
        batch.add(EdgeResponse(status, reason, head, body))
        if self._close_after:
            self._fail(EdgeError(f"{self.label}: the edge closed the connection"))

    # -- failure and time
    def _fail(self, exc: EdgeError) -> None:
        """Close the connection; every request still waiting gets `exc`."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, deque()
        for batch, _ in waiting:
            batch.add(exc)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_at(self._last_read + self.timeout_s, self._check)

    def _check(self) -> None:
        """Closes a connection that waited `timeout_s` without a byte; re-arms otherwise."""
        self._timer = None
        if not self._waiting or self.closed:
            return
        if self._loop.time() - self._last_read >= self.timeout_s:
            self._fail(EdgeError(f"{self.label}: no answer within {self.timeout_s:g}s"))
        else:
            self._arm()


def _value(headers: bytes, name: bytes) -> bytes:
    """The value of `name` in a lower-cased header block that starts with CRLF."""
    start = headers.find(b"\r\n" + name + b":") + len(name) + 3
    end = headers.find(b"\r\n", start)
    return headers[start : end if end >= 0 else len(headers)]


# -- the client -------------------------------------------------------------------


class EdgeClient:
    """Persistent HTTP/1.1 connections to one edge (`http://host:port`).

    `connections` bounds the pool (the sink's concurrency), `depth` the requests written
    at once on one connection by `many`; `headers` go on every request (a User-Agent). A
    connection idle for `keep_idle_s` is not used again: the edge may be closing it
    (Varnish's `timeout_idle` is 5 s), and a request written as it does would be lost.
    """

    def __init__(
        self,
        base_url: str,
        *,
        connections: int = 16,
        timeout_s: float = 5.0,
        depth: int = 64,
        keep_idle_s: float = 2.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"edge URL {base_url!r}: only http://host[:port] is supported")
        self.base_url = base_url.rstrip("/")
        self.label = f"edge {self.base_url}"
        self.host = parts.hostname
        self.port = parts.port or 80
        self.connections = connections
        self.depth = depth
        self.timeout_s = timeout_s
        self.keep_idle_s = keep_idle_s
        self._host = parts.netloc.encode()
        self._common = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
        self._idle: list[tuple[float, _Connection]] = []  # (idle since, connection)
        self._open = 0
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._closed = False

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[str, str]] = ()
    ) -> EdgeResponse:
        payload = EdgeRequest(method, target, tuple(headers)).encode(self._host, self._common)
        conn = await self._acquire()
        try:
            (answer,) = await conn.send(payload, (method == "HEAD",))
        finally:
            self._release(conn)
        if isinstance(answer, EdgeError):
            raise answer
        return answer

    async def many(self, requests: Sequence[EdgeRequest]) -> list[Answer]:
        """Every request pipelined over the pool; each answer, or EdgeError, in order.

        A request that cannot be encoded is an InvalidRequest, raised before any is sent.
        """
        payloads = [r.encode(self._host, self._common) for r in requests]
        heads = [r.method == "HEAD" for r in requests]
        answers: list[Answer] = [_UNANSWERED] * len(payloads)
        lanes = min(self.connections, len(payloads))
        await asyncio.gather(
            *(self._lane(payloads, heads, answers, i, lanes) for i in range(lanes))
        )
        return answers

    async def _lane(
        self, payloads: list[bytes], heads: list[bool], answers: list[Answer], lane: int, lanes: int
    ) -> None:
        """Requests lane, lane + lanes, ... on one connection, `depth` at a time; the rest of
        the lane goes on a fresh connection when the edge closes one."""
        mine = range(lane, len(payloads), lanes)
        for start in range(0, len(mine), self.depth):
            chunk = mine[start : start + self.depth]
            try:
                conn = await self._acquire()
            except EdgeError as exc:
                for i in mine[start:]:
                    answers[i] = exc
                return
            try:
                got = await conn.send(
                    b"".join(payloads[i] for i in chunk), [heads[i] for i in chunk]
                )
            finally:
                self._release(conn)
            for i, answer in zip(chunk, got, strict=True):
                answers[i] = answer

    async def _acquire(self) -> _Connection:
        if self._closed:
            raise EdgeError(f"{self.label}: client closed")
        while True:
            now = asyncio.get_running_loop().time()
            while self._idle:
                since, conn = self._idle.pop()
                if not conn.closed and now - since < self.keep_idle_s:
                    return conn
                self._open -= 1
                conn.close()
            if self._open < self.connections:
                self._open += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake(None)
                    raise
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                conn_or_none = await waiter
            except asyncio.CancelledError:
                # Handed a connection just as the caller was cancelled: back to the pool.
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self._release(waiter.result())  # type: ignore[arg-type]
                raise
            if conn_or_none is not None:
                return conn_or_none

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self.timeout_s, self.label), self.host, self.port
                ),
                self.timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise EdgeError(f"{self.label}: cannot connect: {type(exc).__name__}: {exc}") from exc
        return conn

    def _release(self, conn: _Connection) -> None:
        """Back to the pool (or to a waiting caller) if it can serve again; closed if not
        (also when a cancelled caller left answers unread on it)."""
        if conn.idle and not self._closed:
            if not self._wake(conn):
                self._idle.append((asyncio.get_running_loop().time(), conn))
            return
        self._open -= 1
        conn.close()
        self._wake(None)  # a waiter may open a connection in its place

    def _wake(self, conn: _Connection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for _, conn in idle:
            conn.close()
        self._open -= len(idle)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(EdgeError(f"{self.label}: client closed"))


# A slot of `many` before its lane fills it (every slot is filled before `many` returns).
_UNANSWERED = EdgeError("no answer yet")


# -- httpx, for tests --------------------------------------------------------------


class HttpxEdge:
    """The same calls through an httpx client: what a unit test's MockTransport answers."""

    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport,
        timeout_s: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.client = httpx.AsyncClient(
            base_url=base_url, transport=transport, timeout=timeout_s, headers=dict(headers or {})
        )

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[str, str]] = ()
    ) -> EdgeResponse:
        try:
            response = await self.client.request(method, target, headers=list(headers))
        except httpx.TransportError as exc:
            raise EdgeError(f"{type(exc).__name__}: {exc}") from exc
        head = "\r\n".join(f"{k}: {v}" for k, v in response.headers.items()).encode("latin-1")
        return EdgeResponse(response.status_code, response.reason_phrase, head, response.content)

    async def many(self, requests: Sequence[EdgeRequest]) -> list[Answer]:
        async def one(r: EdgeRequest) -> Answer:
            try:
                return await self.request(r.method, r.target, r.headers)
            except EdgeError as exc:
                return exc

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def aclose(self) -> None:
        await self.client.aclose()


def edge_client(
    base_url: str,
    *,
    connections: int,
    timeout_s: float,
    headers: Mapping[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> EdgeHttp:
    """The lean client for `base_url`, or an httpx one over `transport` when a test gives one."""
    if transport is not None:
        return HttpxEdge(base_url, transport=transport, timeout_s=timeout_s, headers=headers)
    return EdgeClient(base_url, connections=connections, timeout_s=timeout_s, headers=headers)
