"""PROTOCOL.md §2 from the outside: a reader that stalls (socket open, nothing read) while a fast
stream goes on, then drops, resumes exactly. A real ``sluice serve`` with its default replay
window (4,096 events, 4 MiB) over the Ollama emulator at 1,000 tokens/s, one token per write:
10,000 deltas, the 20 s at 500 tokens/s of the issue in 10 s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.server import ServerProcess, start_server

TOKENS = 10_050
READ_BEFORE_STALL = 50


@pytest.fixture(scope="module")
def stalled_stream_server() -> Iterator[tuple[Emulator, ServerProcess]]:
    with start_emulator(token_rate=1000.0, tokens=TOKENS, lines_per_write=1, split_lines=False) as emu:
        server = start_server({"SLUICE_OLLAMA_URLS": emu.url, "SLUICE_LOAD_LOCAL_GENERATION": "false"})
        try:
            yield emu, server
        finally:
            server.stop()


async def _recv(ws: Any) -> dict[str, Any]:
    event: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
    return event


async def test_a_reader_stalled_through_10000_deltas_resumes_exactly(
    stalled_stream_server: tuple[Emulator, ServerProcess],
) -> None:
    emu, server = stalled_stream_server
    request = {"type": "generate", "id": "g", "model": "llama3.2:1b", "prompt": "a long answer"}
    # max_queue=1: the client library stops reading the socket as soon as one frame waits, so
    # what the server sends piles up in the kernel's buffers, as with a stalled reader.
    async with connect(server.ws_url, subprotocols=["sluice.v1"], max_queue=1) as ws:  # type: ignore[list-item]
        await ws.send(orjson.dumps(request).decode())
        welcome = await _recv(ws)
        seen = [await _recv(ws) for _ in range(READ_BEFORE_STALL)]
        deadline = time.monotonic() + 60
        while not (emu.generations() and emu.generations()[0].finished):  # the stall
            assert time.monotonic() < deadline, "the stream did not finish"
            await asyncio.sleep(0.1)
        ws.transport.abort()  # then the connection drops, with no close handshake
    last_seq = seen[-1]["seq"]
    assert [e["seq"] for e in seen] == list(range(1, last_seq + 1))
    async with connect(server.ws_url, subprotocols=["sluice.v1"]) as ws:  # type: ignore[list-item]
        hello = {"type": "hello", "protocol": 1, "session": welcome["session"], "last_seq": last_seq}
        await ws.send(orjson.dumps(hello).decode())
        again = await _recv(ws)
        assert again["resumed"] is True, again
        events = []
        while not events or events[-1]["type"] != "done":
            events.append(await _recv(ws))
    deltas = [e for e in seen + events if e["type"] == "delta"]
    assert [e["seq"] for e in seen + events] == list(range(1, len(seen) + len(events) + 1))
    # Tokens went out (nearly) one per delta while the connection looked alive: more events
    # after the reader's last seq than the 4,096 a log by count alone would hold.
    assert len(events) > 4096
    record = emu.generations()[0]
    assert "".join(e["text"] for e in deltas) == emu.expected_text(record.body)
    assert events[-1]["finish_reason"] == "stop"
