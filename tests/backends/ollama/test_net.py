"""`LoopBackend`: httpcore's network interface over asyncio protocols, against real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpcore
import httpx
import pytest
import uvloop

from server.backends.ollama.net import HIGH_WATER, LoopBackend
from server.backends.ollama.transport import ShardedTransport
from tests.support.ollama_emulator import start_emulator

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


async def read_exactly(stream: httpcore.AsyncNetworkStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.read(65536, timeout=5)
        assert chunk, f"stream ended after {len(data)} of {size} bytes"
        data += chunk
    return data


async def test_echo_round_trip() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    async with serving(echo) as port:
        stream = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5)
        await stream.write(b"hello")
        assert await read_exactly(stream, 5) == b"hello"
        assert await stream.read(100) == b""  # the server closed: end of stream
        assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
        assert stream.get_extra_info("client_addr")[0] == "127.0.0.1"
        assert stream.get_extra_info("ssl_object") is None
        assert stream.get_extra_info("socket") is not None
        await stream.aclose()


async def test_pieces_that_arrived_together_come_out_in_one_read_within_max_bytes() -> None:
    sent = asyncio.Event()

    async def burst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for piece in (b"aaa", b"bbb", b"ccc"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)  # separate segments
        sent.set()
        await reader.read()

    async with serving(burst) as port:
        stream = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5)
        await sent.wait()
        await asyncio.sleep(0.05)
        assert await stream.read(7) == b"aaabbb"  # never more than asked for
        assert await stream.read(2) == b"cc"
        assert await stream.read(2) == b"c"
        await stream.aclose()


async def test_a_large_body_is_paused_and_resumed_and_arrives_whole() -> None:
    body = bytes(range(256)) * (4 * HIGH_WATER // 256)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(body)
        await writer.drain()
        writer.close()

    async with serving(flood) as port:
        stream = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5)
        await asyncio.sleep(0.2)  # let the reader fill up past its high-water mark
        assert await read_exactly(stream, len(body)) == body
        assert await stream.read(10) == b""
        await stream.aclose()


async def test_a_read_with_a_timeout_times_out_and_one_without_waits() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with serving(silent) as port:
        stream = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5)
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(100, timeout=0.1)
        # No timeout: only the caller's own cancellation ends the wait, and the stream stays usable.
        waiting = asyncio.create_task(stream.read(100))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await stream.write(b"still open")
        await stream.aclose()


async def test_a_reset_connection_is_a_read_error() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with serving(reset) as port:
        stream = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5)
        await stream.write(b"x")
        with pytest.raises(httpcore.ReadError):
            await stream.read(100, timeout=5)
        await stream.aclose()


async def test_an_idle_connection_the_server_closed_is_readable() -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with serving(close_at_once) as port:
        stream = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5)
        for _ in range(100):
            if stream.get_extra_info("is_readable"):
                break
            await asyncio.sleep(0.01)
        assert stream.get_extra_info("is_readable") is True
        await stream.aclose()


async def test_our_close_reaches_the_server_and_a_waiting_read_ends() -> None:
    closed = asyncio.Event()

    async def wait_for_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        closed.set()

    async with serving(wait_for_eof) as port:
        stream = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5)
        waiting = asyncio.create_task(stream.read(100))
        await asyncio.sleep(0.05)
        await stream.aclose()
        assert await asyncio.wait_for(waiting, 2) == b""
        await asyncio.wait_for(closed.wait(), 2)
        with pytest.raises(httpcore.WriteError):
            await stream.write(b"too late")


async def test_a_write_to_a_peer_that_never_reads_times_out() -> None:
    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    async with serving(never_read) as port:
        stream = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5)
        chunk = b"x" * (1 << 20)
        with pytest.raises(httpcore.WriteTimeout):
            for _ in range(256):  # far more than both socket buffers hold
                await stream.write(chunk, timeout=0.2)
        await stream.aclose()


async def test_refused_connect_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(httpcore.ConnectError):
        await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5)


async def test_connect_timeout_is_a_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    async def never_connects(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(10)

    monkeypatch.setattr(loop, "create_connection", never_connects)
    with pytest.raises(httpcore.ConnectTimeout):
        await LoopBackend().connect_tcp("127.0.0.1", 9, timeout=0.1)


async def test_socket_options_are_applied() -> None:
    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with serving(idle) as port:
        option = (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        stream = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5, socket_options=[option])
        sock = stream.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        await stream.aclose()


async def test_unix_socket(tmp_path: Path) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(3))
        await writer.drain()

    path = str(tmp_path / "s.sock")
    server = await asyncio.start_unix_server(echo, path)
    try:
        stream = await LoopBackend().connect_unix_socket(path, timeout=5)
        await stream.write(b"abc")
        assert await read_exactly(stream, 3) == b"abc"
        await stream.aclose()
    finally:
        server.close()


_OPENSSL_REQ = (
    "openssl",
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-days",
    "1",
    "-subj",
    "/CN=localhost",
)
_OPENSSL_REQ += ("-addext", "subjectAltName=IP:127.0.0.1")


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


async def test_start_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()

    async with serving(echo, server_context) as port:
        plain = await LoopBackend().connect_tcp("127.0.0.1", port, timeout=5)
        stream = await plain.start_tls(client_context, server_hostname="127.0.0.1", timeout=5)
        assert stream.get_extra_info("ssl_object") is not None
        await stream.write(b"ping")
        assert await read_exactly(stream, 4) == b"ping"
        await stream.aclose()


async def test_httpx_through_the_sharded_transport_streams_and_reuses_connections() -> None:
    with start_emulator(token_rate=0, tokens=5) as emu:
        transport = ShardedTransport(shards=2, max_connections=8, keepalive_expiry=30)
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(4):
                async with client.stream(
                    "POST", emu.url + "/api/generate", json={"model": "llama3.2:1b", "prompt": "p"}
                ) as r:
                    assert r.status_code == 200
                    lines = [line async for line in r.aiter_lines() if line]
                assert len(lines) == 6  # five pieces and the final line
            assert (await client.get(emu.url + "/api/version")).status_code == 200
        assert len({record.connection for record in emu.generations()}) <= 2
