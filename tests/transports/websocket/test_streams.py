"""End to end on a real server: multiplexing, cancel, resume, takeover, slow consumers (``/v1/ws``)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import psutil  # type: ignore[import-untyped]
import pytest

from tests.support.ollama_emulator import Emulator, RequestRecord
from tests.transports.websocket.conftest import Servers
from tests.transports.websocket.wsclient import Client, terminal_of, text_of

pytestmark = pytest.mark.models

UPSTREAM = "llama3.2:1b"


def record_for(emu: Emulator, prompt: str) -> RequestRecord:
    found = [r for r in emu.generations() if isinstance(r.body, dict) and r.body.get("prompt") == prompt]
    assert len(found) == 1, f"{len(found)} upstream requests for {prompt!r}"
    return found[0]


def generate(request_id: str, prompt: str, **extra: Any) -> dict[str, Any]:
    return {"type": "generate", "id": request_id, "model": UPSTREAM, "prompt": prompt} | extra


def assert_contiguous(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "seq must start at 1 with no gap or repeat"


async def test_generate_embed_classify_in_flight_together_on_one_socket(
    servers: Servers, emu: Emulator
) -> None:
    emu.configure(token_rate=40, tokens=40)
    client = await Client.connect(servers.main.ws_url)
    assert client.ws.subprotocol == "sluice.v1"
    await client.send(generate("up", "multiplex upstream"))
    await client.send(
        {
            "type": "generate",
            "id": "local",
            "model": "smollm2:135m",
            "prompt": "Say hello.",
            "options": {"max_tokens": 6, "temperature": 0},
        }
    )
    await client.send({"type": "embed", "id": "emb", "input": ["hello world", "bonjour"]})
    await client.send(
        {
            "type": "classify",
            "id": "cls",
            "input": ["I cooked pasta with tomato sauce", "The football match ended in a draw"],
            "labels": ["food", "sports"],
        }
    )
    events = await client.until_terminal("up", "local", "emb", "cls", within=90)
    assert client.welcome is not None and client.welcome["resumed"] is False
    assert {"generate", "embed", "classify"} <= set(client.welcome["models"])
    assert_contiguous(events)
    assert {e["id"] for e in events} == {"up", "local", "emb", "cls"}

    up = terminal_of(events, "up")
    assert up is not None and up["type"] == "done" and up["finish_reason"] == "stop"
    assert up["model"] == UPSTREAM and up["usage"]["completion_tokens"] == 40
    assert text_of(events, "up") == emu.expected_text(record_for(emu, "multiplex upstream").body)

    local = terminal_of(events, "local")
    assert local is not None and local["type"] == "done", local
    assert local["model"] == "smollm2:135m" and 1 <= local["usage"]["completion_tokens"] <= 6
    assert text_of(events, "local").strip()

    emb = terminal_of(events, "emb")
    assert emb is not None and emb["type"] == "embedding" and emb["dimensions"] == 384
    vectors = np.array(emb["embeddings"])
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)

    cls = terminal_of(events, "cls")
    assert cls is not None and cls["type"] == "classification"
    assert [row[0]["label"] for row in cls["results"]] == ["food", "sports"]
    assert all(abs(sum(s["score"] for s in row) - 1.0) < 1e-3 for row in cls["results"])

    # The quick requests were answered while the upstream stream was still running.
    done_at = events.index(up)
    assert events.index(emb) < done_at and events.index(cls) < done_at
    await client.close()

    async with httpx.AsyncClient(base_url=servers.main.url) as http:
        metrics = (await http.get("/metrics")).text
    for series in (
        'sluice_requests_total{kind="embed",outcome="done"}',
        'sluice_generated_tokens_total{model="llama3.2:1b"}',
        "sluice_time_to_first_token_seconds_count",
        'sluice_queue_wait_seconds_count{kind="classify"}',
        'sluice_batch_size_count{model="all-MiniLM-L6-v2"}',
    ):
        assert series in metrics, series


async def test_cancel_ends_the_request_once_and_closes_the_upstream_stream(
    servers: Servers, emu: Emulator
) -> None:
    emu.configure(token_rate=20, tokens=400)
    client = await Client.connect(servers.main.ws_url)
    await client.send(generate("long", "please cancel me"))
    await client.until(lambda ev: len(ev) >= 3)
    await client.send({"type": "cancel", "id": "long"})
    await client.send({"type": "cancel", "id": "long"})  # idempotent
    events = await client.until_terminal("long")
    done = terminal_of(events, "long")
    assert done is not None and done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] >= 3
    record = record_for(emu, "please cancel me")
    assert await emu.until(lambda: record.client_closed_early), "upstream stream still open"
    assert record.pieces_sent < 400
    # Nothing carries the id after its terminal message.
    await client.send({"type": "ping", "nonce": 7})
    await client.until(lambda ev: bool(client.pongs), within=5)
    assert client.events[-1] is done
    await client.close()


async def test_socket_killed_mid_stream_then_resumed_yields_exactly_the_full_text(
    servers: Servers, emu: Emulator
) -> None:
    emu.configure(token_rate=300, tokens=600)
    first = await Client.connect(servers.main.ws_url)
    await first.send(generate("r", "resume after a network failure"))
    await first.until(lambda ev: len(ev) >= 30)
    assert first.welcome is not None
    session, seen = first.welcome["session"], first.last_seq
    first.kill()
    await asyncio.sleep(0.3)  # the generation goes on with nobody attached

    second = await Client.connect(servers.main.ws_url, hello={"session": session, "last_seq": seen})
    events = await second.until_terminal("r")
    assert second.welcome is not None and second.welcome["resumed"] is True
    assert second.welcome["session"] == session
    combined = first.events[: len([e for e in first.events if e["seq"] <= seen])] + events
    assert_contiguous(combined)
    assert text_of(combined, "r") == emu.expected_text(record_for(emu, "resume after a network failure").body)
    await second.close()


async def test_disconnect_during_replay_then_resume_again_loses_and_repeats_nothing(
    servers: Servers, emu: Emulator
) -> None:
    emu.configure(token_rate=1000, tokens=1500)
    first = await Client.connect(servers.main.ws_url)
    await first.send(generate("rp", "replay interrupted"))
    everything = await first.until_terminal("rp", within=30)
    assert len(everything) > 400, "want a long replay: many small deltas"
    assert first.welcome is not None
    session = first.welcome["session"]
    first.kill()

    # A client that only got the first 5 events: its replay is cut after 200 events...
    second = await Client.connect(servers.main.ws_url, hello={"session": session, "last_seq": 5})
    await second.until(lambda ev: len(ev) >= 200)
    second.kill()
    assert terminal_of(second.events, "rp") is None, "the kill must land inside the replay"
    # ...and it resumes again from the last event it got.
    third = await Client.connect(servers.main.ws_url, hello={"session": session, "last_seq": second.last_seq})
    await third.until_terminal("rp")
    assert third.welcome is not None and third.welcome["resumed"] is True
    combined = everything[:5] + second.events + third.events
    assert combined == everything
    assert_contiguous(combined)
    assert text_of(combined, "rp") == emu.expected_text(record_for(emu, "replay interrupted").body)
    await third.close()


async def test_second_socket_resuming_takes_over_and_the_first_is_closed_4009(servers: Servers) -> None:
    first = await Client.connect(servers.main.ws_url, hello={})
    await first.recv()
    assert first.welcome is not None
    second = await Client.connect(servers.main.ws_url, hello={"session": first.welcome["session"]})
    await second.recv()
    assert second.welcome is not None and second.welcome["resumed"] is True
    assert await first.until_closed(within=10) == 4009
    await second.send({"type": "ping", "nonce": "still here"})
    await second.recv()
    assert second.pongs == [{"type": "pong", "nonce": "still here"}]
    await second.close()


async def test_client_that_stops_reading_is_closed_4008_with_bounded_memory_then_resumes(
    servers: Servers, emu: Emulator
) -> None:
    tokens = 100_000
    emu.configure(token_rate=0, tokens=tokens)
    server = psutil.Process(servers.main.process.pid)
    baseline = server.memory_info().rss
    client = await Client.connect(servers.main.ws_url, rcvbuf=8192, max_queue=1)
    await client.send(generate("flood", "a very long answer"))
    await client.until(lambda ev: len(ev) >= 3)
    # Stop reading while the whole answer is produced; watch the server's memory meanwhile.
    peak = baseline
    for _ in range(60):
        peak = max(peak, server.memory_info().rss)
        records = [r for r in emu.generations() if r.body.get("prompt") == "a very long answer"]
        if records and records[0].finished is not None:
            break
        await asyncio.sleep(0.1)
    peak = max(peak, server.memory_info().rss)
    assert await client.until_closed(within=30) == 4008
    assert client.welcome is not None
    resumed = await Client.connect(
        servers.main.ws_url, hello={"session": client.welcome["session"], "last_seq": client.last_seq}
    )
    await resumed.until_terminal("flood", within=30)
    assert resumed.welcome is not None and resumed.welcome["resumed"] is True
    combined = client.events + resumed.events
    assert_contiguous(combined)
    text = text_of(combined, "flood")
    assert text == emu.expected_text(record_for(emu, "a very long answer").body)
    # ~100k tokens as one frame each would be several MB of buffered frames; the outbox holds
    # at most 64 KiB plus pending text, and the log keeps the text merged.
    assert peak - baseline < 48 * 1024 * 1024, f"server grew by {(peak - baseline) / 2**20:.1f} MiB"
    await resumed.close()
