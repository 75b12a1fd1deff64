"""An SSE client that stops reading never grows server memory past its bound, and loses nothing.

The WebSocket case is `tests/transports/websocket/test_streams.py` (closed 4008, memory bounded, resumed);
this is the same promise over the SSE events stream, whose sender is a different code path
(sse-starlette's send timeout, chunk coalescing). The client opens the stream with a tiny receive
buffer, starts a 100k-token generation (unpaced upstream), reads a few events and stops. While
upstream sends everything (and past the stall limit), the server's RSS must stay within a bound
far below what buffering the stream would take (100k deltas as queued events are tens of MB); the
stream must by then be cut (``event: close`` 4008 past the hard bound, or the connection ended
after a write blocked for the stall limit), and resuming with
``Last-Event-ID`` must yield exactly the emulator's text.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import psutil
import pytest

from tests.reliability.checks import StreamCheck
from tests.reliability.health import MODEL
from tests.reliability.links import LinkClosed, SseLink, open_sse_session
from tests.reliability.resume import expected_record
from tests.support.ollama_emulator import Emulator
from tests.support.server import ServerProcess

TOKENS = 100_000
MAX_GROWTH_BYTES = 24 * 1024 * 1024
# Longer than the server's outbound_stall_s (8 s in tests.reliability.serving): by then it must
# have cut the stream, whether or not the backlog reached the hard bound.
STOP_READING_S = 11.0


async def test_an_sse_client_that_stops_reading_keeps_server_memory_bounded_then_resumes(
    server: ServerProcess, emu: Emulator, has_sse: bool
) -> None:
    if not has_sse:
        pytest.skip("the SSE session endpoints (POST /v1/sessions) are not served yet")
    emu.configure(tokens=TOKENS, token_rate=0.0)
    process = psutil.Process(server.process.pid)
    baseline = process.memory_info().rss
    prompt = f"a very long answer {time.monotonic_ns()}"
    check = StreamCheck()
    async with httpx.AsyncClient(timeout=10) as client:
        session = (await open_sse_session(client, server.url))["session"]
        link = await SseLink.open(client, server.url, session, None, rcvbuf=4096)
        await link.send({"type": "generate", "id": "flood", "model": MODEL, "prompt": prompt})
        for _ in range(3):
            check.add(await link.recv(10))
        # Stop reading while upstream sends the whole answer, and for longer than the server waits
        # on a blocked write; watch the server's memory meanwhile.
        stopped = time.monotonic()
        peak = baseline
        deadline = stopped + 120
        while time.monotonic() < deadline:
            peak = max(peak, process.memory_info().rss)
            records = emu.generations()
            if records and records[-1].finished is not None and time.monotonic() - stopped > STOP_READING_S:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("upstream never finished: the server stopped reading it")
        peak = max(peak, process.memory_info().rss)
        # What is still in flight arrives, then the stream ends: the server cut it.
        with pytest.raises(LinkClosed) as closed:
            async with asyncio.timeout(60):
                while True:
                    event = await link.recv(30)
                    check.add(event)
        assert closed.value.code in (4008, None), closed.value
        link.kill()
        resumed = await SseLink.open(client, server.url, session, check.last_seq)
        while check.terminal("flood") is None:
            check.add(await resumed.recv(30))
        await resumed.close()
    terminal = check.terminal("flood")
    assert terminal is not None and terminal["type"] == "done", terminal
    assert check.text("flood") == emu.expected_text(expected_record(emu, prompt).body)
    growth = peak - baseline
    print(f"\nserver RSS grew by {growth / 2**20:.1f} MiB; stream cut with {closed.value.code}")
    assert growth < MAX_GROWTH_BYTES, f"server grew by {growth / 2**20:.1f} MiB"
