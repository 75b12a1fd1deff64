"""An SSE stream's end of life on servers of their own: drained on SIGTERM, cut when not read."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable

import httpx
import pytest

from tests.api.conftest import MODEL, SERVER_ENV
from tests.support.ollama_emulator import Emulator
from tests.support.server import start_server
from tests.transports.sse.session_helpers import EventStream, open_session, post

pytestmark = pytest.mark.timeout(120)


async def test_sigterm_drains_an_sse_session(emulator: Emulator, paced: Callable[..., None]) -> None:
    paced(token_rate=100.0, tokens=150)  # 1.5 s of generation, well inside the drain timeout
    process = start_server({**SERVER_ENV, "SLUICE_OLLAMA_URLS": emulator.url, "SLUICE_DRAIN_TIMEOUT_S": "20"})
    try:
        async with httpx.AsyncClient(base_url=process.url, timeout=30.0) as client:
            session = (await open_session(client))["session"]
            prompt = "finish me while draining"
            async with EventStream(client, session) as stream:
                await post(client, session, {"type": "generate", "id": "g", "model": MODEL, "prompt": prompt})
                await stream.until(lambda: len(stream.events) >= 3)
                process.signal(signal.SIGTERM)
                await asyncio.wait_for(stream.ended.wait(), 30.0)
        assert process.wait(30.0) == 0
    finally:
        process.stop()
    types = [event["type"] for event in stream.events]
    assert "goaway" in types and types[-1] == "done"
    assert stream.terminal("g") is not None and stream.terminal("g")["finish_reason"] == "stop"  # type: ignore[index]
    assert stream.text("g") == emulator.expected_text({"prompt": prompt})
    assert [event["seq"] for event in stream.events] == list(range(1, len(stream.events) + 1))
    assert stream.closed_with is not None and stream.closed_with["code"] == 1012


def _metric(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rpartition(" ")[2])
    return 0.0


async def test_a_stream_nobody_reads_is_cut_and_detached(
    emulator: Emulator, paced: Callable[..., None]
) -> None:
    paced(token_rate=0.0, tokens=50_000)
    env = {
        **SERVER_ENV,
        "SLUICE_OLLAMA_URLS": emulator.url,
        "SLUICE_OUTBOUND_STALL_S": "1",
        "SLUICE_OUTBOUND_SOFT_BYTES": "16384",
        "SLUICE_OUTBOUND_HARD_BYTES": "65536",
        # Small kernel buffers, so that a reader that stops blocks the server's writes soon.
        "SLUICE_SOCKET_SEND_BUFFER_BYTES": "16384",
    }
    process = start_server(env)
    try:
        async with httpx.AsyncClient(base_url=process.url, timeout=30.0) as client:
            session = (await open_session(client))["session"]
            # A client that opens the stream and then never reads: a tiny receive buffer fills at once.
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.connect(("127.0.0.1", process.port))
            raw.sendall(f"GET /v1/sessions/{session}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await asyncio.sleep(0.5)
            generate = {"type": "generate", "id": "g", "model": MODEL, "prompt": "flood"}
            assert (await post(client, session, generate)).status_code == 202
            deadline = time.monotonic() + 30.0
            metrics = ""
            while time.monotonic() < deadline:
                metrics = (await client.get("/metrics")).text
                if _metric(metrics, "sluice_outbound_slow_closes_total") >= 1:
                    break
                await asyncio.sleep(0.2)
            assert _metric(metrics, "sluice_outbound_slow_closes_total") == 1
            assert _metric(metrics, 'sluice_connections_open{transport="sse"}') == 0
            raw.close()
            # The session lives on and takes a new stream.
            async with EventStream(client, session, last_event_id=None) as again:
                status = await again.opened()
            assert status in (200, 410)
            assert (await client.delete(f"/v1/sessions/{session}")).status_code == 204
        # uvicorn logs one line for the response it could not finish; nothing escaped as a traceback.
        assert "Traceback" not in process.log_text()
    finally:
        process.stop()
