"""`UpstreamTransport` and its `Connection`s: HTTP/1.1 on asyncio protocols + httptools, from the
parser up to real sockets (emulator faults, split lines, early close, pool bounds)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import httpx
import orjson
import pytest
import uvloop

from server.backends.ollama.net import HIGH_WATER, Connection
from server.backends.ollama.transport import UpstreamTransport, body_stream
from tests.support.ollama_emulator import start_emulator

pytestmark = pytest.mark.timeout(30)

MODEL = "llama3.2:1b"


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test on both loops: the server runs on uvloop, whose transports are not asyncio's."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


def transport(**overrides: Any) -> UpstreamTransport:
    options: dict[str, Any] = {"max_connections": 8, "keepalive_expiry": 30.0} | overrides
    return UpstreamTransport(**options)


def client(**overrides: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport(**overrides), timeout=httpx.Timeout(5.0))


# -- the parser, fed by hand -------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False
        self.paused = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def fed(pieces: list[bytes]) -> tuple[Connection, bytes]:
    conn = Connection(asyncio.get_running_loop())
    conn.connection_made(cast(asyncio.Transport, FakeTransport()))
    conn.begin(head_only=False)
    body = b""
    for piece in pieces:
        conn.data_received(piece)
        body += conn.take()
    return conn, body


LINES = [orjson.dumps({"response": word, "done": False}) + b"\n" for word in ("héllo", " wörld", " ✓")]
NDJSON = b"".join(LINES)
# Chunk sizes of two hex digits, and a cut inside a line, so splits land inside the size lines too.
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"%x\r\n%s\r\n" % (len(NDJSON) - 7, NDJSON[:-7])
    + b"%x;ext=1\r\n%s\r\n" % (7, NDJSON[-7:])
    + b"0\r\n\r\n"
)
WITH_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(NDJSON), NDJSON)


@pytest.mark.parametrize("raw", [CHUNKED, WITH_LENGTH], ids=["chunked", "content-length"])
async def test_every_two_way_split_parses_the_same(raw: bytes) -> None:
    for cut in range(1, len(raw)):
        conn, body = fed([raw[:cut], raw[cut:]])
        assert body == NDJSON, cut
        assert (conn.status, conn.complete, conn.keep_alive, conn.error) == (200, True, True, None)


@pytest.mark.parametrize("raw", [CHUNKED, WITH_LENGTH], ids=["chunked", "content-length"])
async def test_one_byte_at_a_time_and_three_way_splits(raw: bytes) -> None:
    conn, body = fed([raw[i : i + 1] for i in range(len(raw))])
    assert body == NDJSON and conn.complete and conn.reason == b"OK"
    for first in range(1, len(raw), 7):
        for second in range(first + 1, len(raw), 11):
            conn, body = fed([raw[:first], raw[first:second], raw[second:]])
            assert body == NDJSON and conn.complete, (first, second)


async def test_headers_keep_their_order_and_case() -> None:
    conn, _ = fed([CHUNKED])
    assert conn.headers == [(b"Content-Type", b"application/x-ndjson"), (b"Transfer-Encoding", b"chunked")]


async def test_bytes_after_a_complete_response_make_the_connection_unusable() -> None:
    conn, body = fed([WITH_LENGTH + b"HTTP/1.1 200 OK\r\n"])
    assert body == NDJSON and conn.complete and conn.status == 200
    assert conn.stray and not conn.reusable


async def test_a_large_body_pauses_reading_until_taken() -> None:
    conn = Connection(asyncio.get_running_loop())
    fake = FakeTransport()
    conn.connection_made(cast(asyncio.Transport, fake))
    conn.begin(head_only=False)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * HIGH_WATER))
    conn.data_received(b"x" * (HIGH_WATER + 1))
    assert fake.paused
    assert len(conn.take()) == HIGH_WATER + 1
    assert not fake.paused


# -- real sockets ------------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request's head and Content-Length body; None at the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_ndjson_split_across_writes_streams_through_httpx() -> None:
    with start_emulator(token_rate=0, tokens=40, lines_per_write=2, split_lines=True) as emu:
        body = {"model": MODEL, "prompt": "split me"}
        async with client() as http, http.stream("POST", emu.url + "/api/generate", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/x-ndjson"
            raw = b"".join([data async for data in response.aiter_bytes()])
        chunks = [orjson.loads(line) for line in raw.splitlines()]
        assert "".join(c["response"] for c in chunks) == emu.expected_text(body)
        assert chunks[-1]["done"] is True


async def test_connections_are_reused_one_after_another_and_bounded_when_concurrent() -> None:
    with start_emulator(token_rate=200, tokens=5) as emu:
        async with client() as http:
            for _ in range(3):
                response = await http.post(emu.url + "/api/generate", json={"model": MODEL, "prompt": "p"})
                assert response.status_code == 200
                assert (await http.get(emu.url + "/api/version")).json() == {"version": "0.6.2"}
            assert {r.connection for r in emu.records} == {1}

            async def one(prompt: str) -> int:
                response = await http.post(emu.url + "/api/chat", json={"model": MODEL, "messages": []})
                return response.status_code

            assert await asyncio.gather(*(one(str(i)) for i in range(3))) == [200] * 3
            assert max(r.connection for r in emu.records) == 3  # one reused, two opened


async def test_early_close_reaches_the_upstream_at_once_and_the_connection_is_not_reused() -> None:
    with start_emulator(token_rate=50, tokens=500) as emu:
        async with client() as http:
            body = {"model": MODEL, "prompt": "long"}
            async with http.stream("POST", emu.url + "/api/generate", json=body) as response:
                async for _ in response.aiter_bytes():
                    break
            record = emu.generations()[0]
            assert await emu.until(lambda: record.client_closed_early)
            assert record.pieces_sent < 100
            assert (await http.get(emu.url + "/api/version")).status_code == 200
            assert emu.records[-1].connection == 2


async def test_an_idle_connection_the_server_closed_is_replaced() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is not None:
            writer.write(ok())
            await writer.drain()
        writer.close()

    async with serving(once) as url, client() as http:
        assert (await http.get(url)).content == b"ok"
        await asyncio.sleep(0.1)  # the server's FIN is in
        assert (await http.get(url)).content == b"ok"


async def test_a_reused_connection_closed_as_the_request_went_out_is_retried_once_on_a_fresh_one() -> None:
    seen: list[int] = []

    async def serve_one_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(set(seen)) + 1
        while await read_request(reader) is not None:
            seen.append(number)
            if seen.count(number) > 1:
                break  # the second request on a connection: close without a byte
            writer.write(ok())
            await writer.drain()
        writer.close()

    async with serving(serve_one_then_drop) as url, client() as http:
        assert (await http.get(url)).content == b"ok"
        assert (await http.post(url, content=b"again")).content == b"ok"
        assert seen == [1, 1, 2]


async def test_the_retry_happens_once_and_never_on_a_fresh_connection() -> None:
    requests = 0

    async def first_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        while await read_request(reader) is not None:
            requests += 1
            if requests > 1:
                break
            writer.write(ok())
            await writer.drain()
        writer.close()

    async with serving(first_only) as url, client() as http:
        assert (await http.get(url)).content == b"ok"
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)
        assert requests == 3  # the request, then one retry on a fresh connection
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)
        assert requests == 4  # a fresh connection failing is never retried


async def test_connection_close_and_http_1_0_answers_are_not_reused() -> None:
    connections = 0

    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        old = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold"
        writer.write(ok(extra=b"Connection: close\r\n") if connections == 1 else old)
        await writer.drain()
        await reader.read()  # the client must close, not wait for us
        writer.close()

    async with serving(closing) as url, client() as http:
        assert (await http.get(url)).content == b"ok"
        assert (await http.get(url)).content == b"old"
        assert (await http.get(url)).content == b"old"
        assert connections == 3


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    ],
    ids=["status", "status-line", "header", "two-lengths"],
)
async def test_malformed_heads_are_remote_protocol_errors(answer: bytes) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        await reader.read()

    async with serving(bad) as url, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
    ],
    ids=["chunk-size", "chunk-end"],
)
async def test_malformed_bodies_are_remote_protocol_errors(answer: bytes) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        await reader.read()

    async with serving(bad) as url, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"",
    ],
    ids=["chunked", "content-length", "head", "nothing"],
)
async def test_a_response_cut_short_is_a_remote_protocol_error(answer: bytes) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with serving(cut) as url, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)


async def test_a_reset_mid_body_is_a_read_error() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with serving(reset) as url, client() as http:
        async with http.stream("GET", url) as response:
            with pytest.raises(httpx.ReadError):
                await response.aread()


async def test_refused_connect_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")


async def test_connect_timeout_is_a_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never_connects(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(10)

    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", never_connects)
    async with httpx.AsyncClient(transport=transport(), timeout=httpx.Timeout(5.0, connect=0.1)) as http:
        with pytest.raises(httpx.ConnectTimeout):
            await http.get("http://127.0.0.1:9/")


async def test_read_timeouts_apply_only_when_given() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if request is not None and b"/body" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
            await writer.drain()
        await reader.read()

    async with serving(stall) as url, client() as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(url + "/head", timeout=httpx.Timeout(5.0, read=0.1))
        async with http.stream("GET", url + "/body", timeout=httpx.Timeout(5.0, read=0.1)) as response:
            with pytest.raises(httpx.ReadTimeout):
                await response.aread()
        waiting = asyncio.create_task(http.get(url + "/head", timeout=httpx.Timeout(5.0, read=None)))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting


async def test_the_pool_is_bounded_and_a_freed_connection_serves_the_waiter() -> None:
    with start_emulator(token_rate=100, tokens=5) as emu:
        async with client(max_connections=1) as http:
            body = {"model": MODEL, "prompt": "p"}
            async with http.stream("POST", emu.url + "/api/generate", json=body) as first:
                with pytest.raises(httpx.PoolTimeout):
                    await http.get(emu.url + "/api/version", timeout=httpx.Timeout(5.0, pool=0.1))
                waiter = asyncio.create_task(http.get(emu.url + "/api/version"))
                await asyncio.sleep(0.05)
                assert not waiter.done()
                await first.aread()
            assert (await waiter).status_code == 200
        assert {r.connection for r in emu.records} == {1}


async def test_idle_connections_expire() -> None:
    with start_emulator() as emu:
        async with client(keepalive_expiry=0.1) as http:
            await http.get(emu.url + "/api/version")
            await asyncio.sleep(0.25)
            await http.get(emu.url + "/api/version")
        assert [r.connection for r in emu.records] == [1, 2]


async def test_a_body_without_length_runs_to_the_end_of_the_connection() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"this")
        writer.close()

    async with serving(until_close) as url, client() as http:
        assert (await http.get(url)).content == b"all of this"
        assert (await http.get(url)).content == b"all of this"  # on a new connection


async def test_informational_answers_are_skipped_and_head_has_no_body() -> None:
    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            if request.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final"))
            await writer.drain()
        writer.close()

    async with serving(answers) as url, client() as http:
        response = await http.get(url)
        assert (response.status_code, response.content) == (200, b"final")
        head = await http.head(url)
        assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "5")
        assert (await http.get(url)).content == b"final"


async def test_request_head_and_bodies_reach_the_server_as_sent() -> None:
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            if b"chunked" in request:
                request += await reader.readuntil(b"0\r\n\r\n")
            received.append(request)
            writer.write(ok())
            await writer.drain()
        writer.close()

    async def parts() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cd"

    async with serving(record) as url, client() as http:
        await http.post(url + "/api/embed?x=1", content=b'{"a":1}', headers={"X-Test": "yes"})
        await http.post(url + "/stream", content=parts())
    head, _, body = received[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /api/embed?x=1 HTTP/1.1"
    assert b"X-Test: yes" in lines[1:] or b"x-test: yes" in lines[1:]
    assert any(line.lower().startswith(b"host: 127.0.0.1:") for line in lines)
    assert body == b'{"a":1}'
    assert received[1].endswith(b"\r\n\r\n4\r\nabcd\r\n0\r\n\r\n")


async def test_a_large_body_arrives_whole() -> None:
    payload = bytes(range(256)) * (4 * HIGH_WATER // 256)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(payload))
        await writer.drain()
        await reader.read()

    async with serving(flood) as url, client() as http:
        async with http.stream("GET", url) as response:
            await asyncio.sleep(0.2)  # let it buffer past the high-water mark
            assert await response.aread() == payload


async def test_closing_the_transport_closes_its_connections() -> None:
    with start_emulator(token_rate=20, tokens=500) as emu:
        http = client()
        body = {"model": MODEL, "prompt": "long"}
        async with http.stream("POST", emu.url + "/api/generate", json=body) as response:
            async for _ in response.aiter_bytes():
                break
            await http.aclose()
            record = emu.generations()[0]
            assert await emu.until(lambda: record.client_closed_early)


async def test_unsupported_schemes_are_refused() -> None:
    async with client() as http:
        with pytest.raises(httpx.UnsupportedProtocol):
            await http.get("ftp://127.0.0.1/")


async def test_a_failed_connect_frees_its_slot_for_the_next_waiter() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with client(max_connections=1) as http:
        url = f"http://127.0.0.1:{port}/"
        answers = await asyncio.gather(http.get(url), http.get(url), return_exceptions=True)
    assert [type(answer) for answer in answers] == [httpx.ConnectError, httpx.ConnectError]


@pytest.mark.parametrize("encoded", [False, True], ids=["plain", "gzip"])
async def test_body_stream_gives_the_decoded_body_as_it_arrives(encoded: bool) -> None:
    first, second = NDJSON[:10], NDJSON[10:]
    pieces = [gzip.compress(NDJSON)[:20], gzip.compress(NDJSON)[20:]] if encoded else [first, second]
    sent_second = asyncio.Event()

    async def two_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        encoding = b"Content-Encoding: gzip\r\n" if encoded else b""
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + encoding + b"\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.05)
        sent_second.set()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with serving(two_chunks) as url, client() as http:
        async with http.stream("GET", url) as response:
            received = []
            async for data in body_stream(response):
                received.append(data)
                if not encoded:
                    assert not sent_second.is_set()  # each piece comes as it arrives, not at the end
    assert b"".join(received) == NDJSON  # decoded when the upstream compressed it
    if not encoded:
        assert received == [first, second]
