"""The seed HTTP stream's relay buffer over a real socket: bounded when the client stops reading,
and the upstream closed when the client leaves while pieces wait in it.

The server runs with a small outbound bound and socket send buffer, and the client's socket
with a small receive buffer, so that a client that stops reading fills the kernel buffers and
the transport's write buffer within a few thousand pieces; then each new piece waits in the
relay's buffer (`server.api.calls.Relay`), whose bound ends the stream ``slow_consumer``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import orjson
import pytest

from tests.api.conftest import MODEL, sluice
from tests.support.ollama_emulator import Emulator, RequestRecord, start_emulator
from tests.support.server import ServerProcess

pytestmark = pytest.mark.timeout(120)

HARD_BYTES = 4096
TOKENS = 50_000  # far more than the buffers hold: the stream must be cut, not finish
ROOMY_BYTES = 16 * 1_048_576  # more than a whole stream of TOKENS pieces
WAITING_PIECES = 10_000  # over 200 KiB of framed pieces, a fifth of the stream


@pytest.fixture(scope="module")
def fast_emulator() -> Iterator[Emulator]:
    with start_emulator(tokens=TOKENS, token_rate=0.0) as emu:
        yield emu


def _server(emulator: Emulator, hard_bytes: int) -> Iterator[ServerProcess]:
    """A server on ``emulator`` with small socket send buffers and ``hard_bytes`` as its bound."""
    env = {
        "SLUICE_OLLAMA_URLS": emulator.url,
        "SLUICE_OUTBOUND_HARD_BYTES": str(hard_bytes),
        "SLUICE_SOCKET_SEND_BUFFER_BYTES": "4096",
    }
    with sluice(env) as process:
        yield process


@pytest.fixture(scope="module")
def bounded(fast_emulator: Emulator) -> Iterator[ServerProcess]:
    yield from _server(fast_emulator, HARD_BYTES)


@pytest.fixture(scope="module")
def roomy(fast_emulator: Emulator) -> Iterator[ServerProcess]:
    """The same small socket buffers, with a bound above the whole stream's bytes."""
    yield from _server(fast_emulator, ROOMY_BYTES)


async def _open(url: str, prompt: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    body = orjson.dumps({"model": MODEL, "prompt": prompt})
    writer.write(
        b"POST /api/v1/generate/stream HTTP/1.1\r\nhost: %b\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (host.encode(), len(body), body)
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


def _record(emulator: Emulator, prompt: str) -> RequestRecord | None:
    for record in emulator.generations():
        if isinstance(record.body, dict) and record.body.get("prompt") == prompt:
            return record
    return None


async def test_a_client_that_stops_reading_ends_slow_consumer_and_closes_the_upstream(
    bounded: ServerProcess, fast_emulator: Emulator
) -> None:
    prompt = "stop reading: bound"
    reader, writer = await _open(bounded.url, prompt)
    try:
        assert await fast_emulator.until(
            lambda: (r := _record(fast_emulator, prompt)) is not None and r.client_closed_early, 20.0
        )
        rest = await asyncio.wait_for(reader.readuntil(b"data: [DONE]\n\n"), 20.0)
    finally:
        writer.close()
    events = [line for line in rest.split(b"\n") if line.startswith(b"data: {")]
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "slow_consumer", last
    texts = [orjson.loads(line.removeprefix(b"data: "))["text"] for line in events[:-1]]
    assert 0 < len(texts) < TOKENS  # cut short, with what came before the bound delivered


async def test_a_client_that_leaves_while_pieces_wait_closes_the_upstream(
    roomy: ServerProcess, fast_emulator: Emulator
) -> None:
    # The pieces' bytes pass what the kernel buffers and the transport's write buffer hold
    # (well under 200 KiB) long before the stream ends, and never reach the roomy bound: however
    # the machine schedules the test, the client leaves while pieces wait in the relay's buffer.
    fast_emulator.configure(token_rate=2500.0)  # 20 s for the whole stream
    try:
        prompt = "stop reading: leave"
        _, writer = await _open(roomy.url, prompt)
        assert await fast_emulator.until(
            lambda: (r := _record(fast_emulator, prompt)) is not None and r.pieces_sent >= WAITING_PIECES,
            30.0,
        )
        record = _record(fast_emulator, prompt)
        assert record is not None and not record.client_closed_early
        assert record.pieces_sent < TOKENS  # still streaming
        writer.transport.abort()
        assert await fast_emulator.until(
            lambda: (r := _record(fast_emulator, prompt)) is not None and r.client_closed_early, 15.0
        )
    finally:
        fast_emulator.configure(token_rate=0.0)
