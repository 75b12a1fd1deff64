"""`Connection` on real loopback sockets: reads batched, writes bounded, TLS, a peer's close."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import uvloop

from server.backends.ollama.net import HIGH_WATER, Connection
from server.backends.ollama.transport import UpstreamTransport

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test on both loops: the server runs on uvloop, whose transports are not asyncio's."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_context)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def connect(port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Connection(loop), "127.0.0.1", port)
    return conn


HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_pieces_that_arrived_while_the_reader_was_busy_come_out_in_one_take() -> None:
    async def three_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        writer.write(HEAD)
        for piece in (b"one\n", b"two\n", b"three\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with serving(three_chunks) as port:
        conn = await connect(port)
        conn.begin(head_only=False)
        conn.send(b"ping")
        await conn.head(5)
        await asyncio.sleep(0.2)  # the reader is busy elsewhere while all three arrive
        assert conn.take() == b"one\ntwo\nthree\n"
        assert await conn.body(5) == b""
        assert conn.complete and conn.reusable
        conn.close()


async def test_a_waiting_body_read_times_out_only_when_given_a_limit() -> None:
    async def head_then_silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        writer.write(HEAD)
        await writer.drain()
        await reader.read()

    async with serving(head_then_silence) as port:
        conn = await connect(port)
        conn.begin(head_only=False)
        conn.send(b"ping")
        await conn.head(5)
        with pytest.raises(httpx.ReadTimeout):
            await conn.body(0.1)
        unbounded = asyncio.create_task(conn.body(None))
        await asyncio.sleep(0.2)
        assert not unbounded.done()
        conn.close()  # our own close wakes the waiting read, which then sees the lost connection
        with pytest.raises(httpx.RemoteProtocolError):
            await asyncio.wait_for(unbounded, 2)


async def test_a_large_body_is_paused_and_resumed_and_arrives_whole() -> None:
    size = 4 * HIGH_WATER

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
        await writer.drain()
        await reader.read()

    async with serving(big) as port:
        conn = await connect(port)
        conn.begin(head_only=False)
        conn.send(b"ping")
        await conn.head(5)
        await asyncio.sleep(0.2)
        assert conn._size <= HIGH_WATER + 256 * 1024  # paused near the mark, not the whole body
        received = 0
        while chunk := await conn.body(5):
            received += len(chunk)
        assert received == size
        conn.close()


async def test_a_request_to_a_peer_that_never_reads_times_out_as_a_write_timeout() -> None:
    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    async with serving(never_read) as port:
        body = b"x" * (64 << 20)  # far more than both socket buffers hold
        timeout = httpx.Timeout(5.0, write=0.2)
        async with httpx.AsyncClient(
            transport=UpstreamTransport(max_connections=2, keepalive_expiry=30)
        ) as http:
            with pytest.raises(httpx.WriteTimeout):
                await http.post(f"http://127.0.0.1:{port}/", content=body, timeout=timeout)


_OPENSSL_REQ = ("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1")
_OPENSSL_REQ += ("-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1")


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(
            [*_OPENSSL_REQ, "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"openssl cannot make a test certificate here: {exc}")
    return cert, key


async def test_an_https_upstream_streams_and_reuses_its_connection(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(HEAD + b"5\r\nhello\r\n0\r\n\r\n")
                await writer.drain()

    async with serving(answer, server_context) as port:
        upstream = UpstreamTransport(max_connections=2, keepalive_expiry=30, ssl_context=client_context)
        async with httpx.AsyncClient(transport=upstream, timeout=5) as http:
            for _ in range(3):
                assert (await http.get(f"https://127.0.0.1:{port}/")).content == b"hello"
    assert connections == 1


async def test_an_https_upstream_with_an_unknown_certificate_is_a_connect_error(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read()

    async with serving(answer, server_context) as port:
        upstream = UpstreamTransport(max_connections=2, keepalive_expiry=30)  # the system CAs only
        async with httpx.AsyncClient(transport=upstream, timeout=5) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(f"https://127.0.0.1:{port}/")
