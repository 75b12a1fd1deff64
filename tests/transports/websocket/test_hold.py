"""Held deltas over a real WebSocket (`Settings.delta_hold_s`): a fast stream arrives as fewer,
larger deltas than the upstream wrote pieces, with the exact text and contiguous seqs; a slow
stream's deltas are never held, each piece arriving alone.

Its own ``sluice serve`` with a 20 ms window (wide enough that the two cases cannot be told apart
by the machine's load), on the session's shared Ollama emulator.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.ollama_emulator import Emulator
from tests.support.server import ServerProcess
from tests.transports.websocket.test_streams import assert_contiguous, generate, record_for
from tests.transports.websocket.wsclient import Client, terminal_of, text_of

HOLD_S = 0.02


@pytest.fixture(scope="module")
def held(emulator: Emulator) -> Iterator[ServerProcess]:
    server = ServerProcess(
        {
            "SLUICE_OLLAMA_URLS": emulator.url,
            "SLUICE_LOAD_LOCAL_GENERATION": "false",
            "SLUICE_DELTA_HOLD_S": str(HOLD_S),
        }
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def deltas_of(events: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "delta" and e["id"] == request_id]


async def test_a_fast_stream_arrives_in_fewer_larger_deltas_with_the_exact_text(
    held: ServerProcess, emu: Emulator
) -> None:
    # A piece every 0.5 ms, each in its own upstream write: the server reads them one by one.
    emu.configure(token_rate=2000, tokens=400, lines_per_write=1)
    client = await Client.connect(held.ws_url)
    await client.send(generate("fast", "a fast stream"))
    events = await client.until_terminal("fast")
    await client.close()
    record = record_for(emu, "a fast stream")
    done = terminal_of(events, "fast")
    assert done is not None and done["type"] == "done" and done["finish_reason"] == "stop"
    assert text_of(events, "fast") == "".join(record.planned) and record.pieces_sent == 400
    assert_contiguous(events)
    deltas = deltas_of(events, "fast")
    # About one delta per window over the stream's ~200 ms; unheld, one per upstream write.
    assert len(deltas) <= record.writes // 5, (len(deltas), record.writes)
    assert deltas[0]["text"] == record.planned[0]  # the first delta is never held


async def test_a_slow_stream_is_never_held(held: ServerProcess, emu: Emulator) -> None:
    # A piece every 500 ms, 25 windows apart: each goes out alone, as soon as it is read. (At 100 ms
    # apart, a server or emulator stalled for 200 ms on a busy machine read three pieces at once,
    # and the third was rightly held with the second.)
    emu.configure(token_rate=2, tokens=6, lines_per_write=1, split_lines=False)
    client = await Client.connect(held.ws_url)
    await client.send(generate("slow", "a slow stream"))
    events = await client.until_terminal("slow")
    await client.close()
    record = record_for(emu, "a slow stream")
    assert [d["text"] for d in deltas_of(events, "slow")] == list(record.planned)
    assert_contiguous(events)
