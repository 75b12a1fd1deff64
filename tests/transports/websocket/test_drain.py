"""SIGTERM on a real ``sluice serve`` process: goaway, running streams finish, close 1012, exit 0."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.support.ollama_emulator import Emulator
from tests.transports.websocket.conftest import Servers
from tests.transports.websocket.wsclient import Client, terminal_of, text_of

pytestmark = pytest.mark.models


async def test_sigterm_sends_goaway_lets_the_stream_finish_then_closes_1012(
    servers: Servers, emu: Emulator
) -> None:
    server = servers.draining
    emu.configure(token_rate=40, tokens=80)  # two seconds of stream, well inside the drain timeout
    streaming = await Client.connect(server.ws_url)
    await streaming.send({"type": "generate", "id": "d", "model": "llama3.2:1b", "prompt": "drain me"})
    await streaming.until(lambda ev: len(ev) >= 5)
    idle = await Client.connect(server.ws_url, hello={})
    await idle.recv()

    server.signal(signal.SIGTERM)
    await streaming.until(lambda ev: any(e["type"] == "goaway" for e in ev))
    # Draining: a new request is refused, the running one goes on.
    await streaming.send({"type": "embed", "id": "late", "input": "x"})
    streaming_code = await streaming.until_closed(within=20)
    idle_code = await idle.until_closed(within=20)

    events = streaming.events
    kinds = [e["type"] for e in events]
    goaway = events[kinds.index("goaway")]
    assert goaway["retry_after_ms"] >= 0 and goaway["reason"]
    done = terminal_of(events, "d")
    assert done is not None and done["type"] == "done" and done["finish_reason"] == "stop"
    assert kinds.index("goaway") < events.index(done)
    record = next(r for r in emu.generations() if r.body.get("prompt") == "drain me")
    assert text_of(events, "d") == emu.expected_text(record.body)
    refusal = next(e for e in events if e.get("ref") == "late")
    assert refusal["code"] == "shutting_down" and refusal["retryable"] is True
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert streaming_code == 1012 and idle_code == 1012
    assert [e["type"] for e in idle.events] == ["goaway"]

    assert await asyncio.to_thread(server.wait, 30) == 0
    with pytest.raises(OSError):
        await Client.connect(server.ws_url)
    assert "drained in" in server.log_text()
