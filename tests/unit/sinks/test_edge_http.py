"""The lean edge client against a scripted HTTP/1.1 server on loopback: framing, keep-alive,
pipelining, and every way an answer can fail to come."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from cachesync.consumers.sinks.edge_http import (
    EdgeClient,
    EdgeError,
    EdgeRequest,
    EdgeResponse,
    InvalidRequest,
    wire_target,
)

# Reads one request head and says what to write back (None: close without answering).
Answer = Callable[[bytes], Awaitable[bytes | None]]


class Server:
    """A loopback server that answers each request on a connection in order."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                out = await self.answer(head)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(answer: Answer) -> Server:
        server = Server(answer)
        server.server = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        servers.append(server)
        return server

    yield start
    for s in servers:
        assert s.server is not None
        s.server.close()
        await s.server.wait_closed()


def ok(body: bytes = b"ok", **headers: str) -> bytes:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra.encode(), body)


def target(head: bytes) -> str:
    return head.split(b" ", 2)[1].decode()


async def test_pipelined_batch_answers_in_order_over_few_connections(serve) -> None:
    """200 requests over 4 connections, 8 deep: every answer is its own request's, in order."""

    async def echo(head: bytes) -> bytes:
        return ok(target(head).encode(), x_path=target(head))

    server = await serve(echo)
    client = EdgeClient(server.url, connections=4, depth=8)
    answers = await client.many([EdgeRequest("PURGE", f"/p/{i}") for i in range(200)])
    await client.aclose()
    assert [a.body for a in answers if isinstance(a, EdgeResponse)] == [
        f"/p/{i}".encode() for i in range(200)
    ]
    assert answers[7].header("X-Path") == "/p/7"  # type: ignore[union-attr]
    assert server.connections == 4


async def test_chunked_bodies_head_requests_and_1xx_are_framed(serve) -> None:
    """A chunked body is joined, a HEAD's Content-Length announces no body, a 100 Continue
    is skipped: the next answer on the connection is still read correctly."""

    async def answer(head: bytes) -> bytes:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"
        if b"/chunked" in head:
            return (
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
            )
        return ok(b"after")

    server = await serve(answer)
    client = EdgeClient(server.url, connections=1)
    answers = await client.many(
        [EdgeRequest("GET", "/chunked"), EdgeRequest("HEAD", "/h"), EdgeRequest("GET", "/x")]
    )
    await client.aclose()
    assert [a.body for a in answers if isinstance(a, EdgeResponse)] == [b"abcde", b"", b"after"]


async def test_connection_close_ends_the_connection_and_the_rest_goes_on_a_new_one(serve) -> None:
    """An answer with Connection: close is delivered, the requests pipelined behind it get an
    EdgeError (the edge never read them), and the next batch opens a fresh connection."""

    async def answer(head: bytes) -> bytes | None:
        if b"/close" in head:
            return ok(b"bye", connection="close")
        return ok()

    server = await serve(answer)
    client = EdgeClient(server.url, connections=1, depth=3)
    first = await client.many([EdgeRequest("GET", p) for p in ("/a", "/close", "/b")])
    assert isinstance(first[0], EdgeResponse) and isinstance(first[1], EdgeResponse)
    assert first[1].body == b"bye" and isinstance(first[2], EdgeError)
    again = await client.request("GET", "/c")
    await client.aclose()
    assert again.status == 200 and server.connections == 2


async def test_a_silent_edge_times_out_and_a_closed_port_is_an_edge_error(serve) -> None:
    """No byte within timeout_s fails the waiting requests; nothing listening fails to connect."""

    async def hang(head: bytes) -> bytes:
        await asyncio.sleep(5)
        return ok()

    server = await serve(hang)
    client = EdgeClient(server.url, timeout_s=0.3)
    with pytest.raises(EdgeError, match=r"no answer within 0\.3s"):
        await client.request("PURGE", "/x")
    await client.aclose()

    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    closed = EdgeClient(f"http://127.0.0.1:{port}", timeout_s=1)
    answers = await closed.many([EdgeRequest("PURGE", "/a"), EdgeRequest("PURGE", "/b")])
    await closed.aclose()
    assert all(isinstance(a, EdgeError) and "cannot connect" in str(a) for a in answers)


async def test_an_edge_hanging_up_mid_batch_fails_only_the_unanswered(serve) -> None:
    """The server answers two requests and drops the connection: those two are answered,
    the rest get EdgeError to be retried."""
    count = 0

    async def answer(head: bytes) -> bytes | None:
        nonlocal count
        count += 1
        return ok() if count <= 2 else None

    server = await serve(answer)
    client = EdgeClient(server.url, connections=1, depth=5)
    answers = await client.many([EdgeRequest("PURGE", f"/{i}") for i in range(5)])
    await client.aclose()
    assert [isinstance(a, EdgeResponse) for a in answers] == [True, True, False, False, False]


async def test_not_http_is_an_edge_error(serve) -> None:
    async def garbage(head: bytes) -> bytes:
        return b"SSH-2.0-OpenSSH\r\n\r\n"

    server = await serve(garbage)
    client = EdgeClient(server.url)
    with pytest.raises(EdgeError, match=r"not an HTTP/1\.x answer"):
        await client.request("GET", "/")
    await client.aclose()


async def test_the_pool_never_opens_more_than_its_connections(serve) -> None:
    """50 concurrent single requests through a pool of 3 use 3 connections."""

    async def slow(head: bytes) -> bytes:
        await asyncio.sleep(0.01)
        return ok()

    server = await serve(slow)
    client = EdgeClient(server.url, connections=3)
    answers = await asyncio.gather(*(client.request("GET", f"/{i}") for i in range(50)))
    await client.aclose()
    assert {a.status for a in answers} == {200} and server.connections == 3


async def test_targets_are_percent_encoded_and_header_line_breaks_refused(serve) -> None:
    """A space or an accent in a path goes percent-encoded (existing escapes kept); a header
    value with a line break is never written."""
    server = await serve(lambda head: asyncio.sleep(0, ok()))
    client = EdgeClient(server.url)
    await client.request("GET", "/a b/café?x=%41")
    assert target(server.requests[-1]) == "/a%20b/caf%C3%A9?x=%41" == wire_target("/a b/café?x=%41")
    with pytest.raises(InvalidRequest):
        await client.many([EdgeRequest("PURGE", "/", (("xkey-purge", "a\r\nX-Evil: 1"),))])
    await client.aclose()


async def test_bytes_no_request_asked_for_never_pass_for_the_next_answer(serve) -> None:
    """An edge writing a second answer after the first: the connection is dropped, and the
    next request gets its own answer on a fresh one."""
    sent = 0

    async def answer(head: bytes) -> bytes:
        nonlocal sent
        sent += 1
        return ok(b"first") + ok(b"stray") if sent == 1 else ok(b"second")

    server = await serve(answer)
    client = EdgeClient(server.url, connections=1)
    assert (await client.request("GET", "/1")).body == b"first"
    assert (await client.request("GET", "/2")).body == b"second"
    await client.aclose()
    assert server.connections == 2


def test_the_client_runs_on_uvloop() -> None:
    """uvloop's transports are not asyncio.Transport subclasses: a client that insisted
    got 'connection closed' for every request on a host application's uvloop."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[int]:
        async def answer(head: bytes) -> bytes:
            return ok(target(head).encode())

        server = Server(answer)
        server.server = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        client = EdgeClient(server.url, connections=1, timeout_s=5)
        try:
            answers = await client.many([EdgeRequest("PURGE", f"/p/{n}") for n in range(3)])
        finally:
            await client.aclose()
            server.server.close()
        return [a.status for a in answers if isinstance(a, EdgeResponse)]

    assert uvloop.run(scenario()) == [200, 200, 200]
