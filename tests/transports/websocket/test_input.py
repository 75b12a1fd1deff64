"""End to end on a real server: every kind of bad input gets a typed error and the connection goes on."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support.ollama_emulator import Emulator
from tests.transports.websocket.conftest import Servers
from tests.transports.websocket.wsclient import Client, close_code, terminal_of

pytestmark = pytest.mark.models

# (what is sent, expected code, expected ref, a word the message must contain)
BAD_MESSAGES: list[tuple[Any, str, str | None, str]] = [
    ("{not json", "invalid_message", None, "JSON"),
    ("[1, 2]", "invalid_message", None, "object"),
    ({"id": "a1"}, "invalid_message", "a1", "type"),
    ({"type": 5, "id": "a2"}, "invalid_message", "a2", "type"),
    ({"type": "teleport", "id": "a3"}, "unknown_type", "a3", "teleport"),
    ({"type": "generate", "id": "a4"}, "invalid_message", "a4", "prompt"),
    ({"type": "generate", "id": "a5", "prompt": 5}, "invalid_message", "a5", "prompt"),
    ({"type": "generate", "id": "", "prompt": "x"}, "invalid_message", "", "id"),
    ({"type": "embed", "id": "a6", "input": []}, "invalid_message", "a6", "input"),
    ({"type": "classify", "id": "a7", "input": "x", "labels": ["only"]}, "invalid_message", "a7", "labels"),
    ({"type": "cancel"}, "invalid_message", None, "id"),
    ({"type": "ack", "seq": -1}, "invalid_message", None, "seq"),
    ({"type": "generate", "id": "a8", "prompt": "x" * 5000}, "message_too_large", None, "4096"),
    ({"type": "hello", "protocol": 1}, "invalid_message", None, "hello"),
]


async def test_each_bad_message_gets_a_typed_error_and_the_connection_goes_on(servers: Servers) -> None:
    client = await Client.connect(servers.main.ws_url, hello={})
    await client.recv()
    for sent, code, ref, word in BAD_MESSAGES:
        await client.send(sent if isinstance(sent, str) else orjson.dumps(sent).decode())
        error = await client.recv()
        assert error["type"] == "error", sent
        assert error["code"] == code, (sent, error)
        assert "id" not in error, "a refused message never ends a request"
        assert error.get("ref") == ref, (sent, error)
        assert word.lower() in error["message"].lower(), (sent, error)
        assert error["retryable"] is False
    await client.send(b"\x00\x01binary")
    binary = await client.recv()
    assert binary["code"] == "invalid_message" and "binary" in binary["message"]
    await client.send({"type": "ping", "nonce": "alive"})
    await client.recv()
    assert client.pongs == [{"type": "pong", "nonce": "alive"}]
    seqs = [e["seq"] for e in client.events]
    assert seqs == list(range(1, len(BAD_MESSAGES) + 2))
    await client.close()


async def test_duplicate_id_and_too_many_in_flight_leave_running_requests_alone(
    servers: Servers, emu: Emulator
) -> None:
    emu.configure(token_rate=20, tokens=200)
    client = await Client.connect(servers.main.ws_url)
    await client.send({"type": "generate", "id": "dup", "model": "llama3.2:1b", "prompt": "first"})
    await client.until(lambda ev: any(e["type"] == "delta" for e in ev))
    await client.send({"type": "generate", "id": "dup", "model": "llama3.2:1b", "prompt": "second"})
    refusal = await client.until(lambda ev: any(e["type"] == "error" for e in ev))
    duplicate = next(e for e in refusal if e["type"] == "error")
    assert duplicate["code"] == "duplicate_id" and duplicate["ref"] == "dup" and "id" not in duplicate
    for n in range(5):  # max_inflight is 6 on this server
        await client.send({"type": "generate", "id": f"f{n}", "model": "llama3.2:1b", "prompt": f"fill {n}"})
    await client.send({"type": "embed", "id": "seventh", "input": "x"})
    await client.until(lambda ev: any(e.get("ref") == "seventh" for e in ev))
    too_many = next(e for e in client.events if e.get("ref") == "seventh")
    assert too_many["code"] == "too_many_inflight" and too_many["retryable"] is True
    # The first "dup" still runs: more of its deltas come after the refusal.
    count = len([e for e in client.events if e.get("id") == "dup"])
    await client.until(lambda ev: len([e for e in ev if e.get("id") == "dup"]) > count)
    for request_id in ["dup"] + [f"f{n}" for n in range(5)]:
        await client.send({"type": "cancel", "id": request_id})
    events = await client.until_terminal("dup", "f0", "f1", "f2", "f3", "f4")
    assert all(terminal_of(events, i)["finish_reason"] == "cancelled" for i in ["dup", "f0", "f4"])  # type: ignore[index]
    assert len([r for r in emu.generations() if r.body.get("prompt") == "second"]) == 0
    await client.close()


async def test_unsupported_protocol_as_first_message_opens_a_session_and_says_why(servers: Servers) -> None:
    client = await Client.connect(servers.main.ws_url)
    await client.send({"type": "hello", "protocol": 2})
    welcome = await client.recv()
    assert welcome["type"] == "welcome" and welcome["protocol"] == 1 and welcome["resumed"] is False
    error = await client.recv()
    assert error["code"] == "unsupported_protocol" and error["seq"] == 1
    await client.close()


async def test_a_frame_past_the_transport_limit_closes_1009(servers: Servers) -> None:
    client = await Client.connect(servers.main.ws_url, hello={})
    await client.recv()
    await client.send("x" * 70_000)  # max_frame_bytes is 65536 on this server
    with pytest.raises(ConnectionClosed):
        await client.recv(within=10)
    assert close_code(client.ws) == 1009


async def test_subprotocol_is_selected_only_when_offered(servers: Servers) -> None:
    async with connect(servers.main.ws_url, compression=None) as plain:
        assert plain.subprotocol is None
        await plain.send('{"type":"ping","nonce":1}')
        assert orjson.loads(await plain.recv())["type"] == "welcome"
        assert orjson.loads(await plain.recv()) == {"type": "pong", "nonce": 1}
    offered = await Client.connect(servers.main.ws_url, subprotocols=["other", "sluice.v1"])
    assert offered.ws.subprotocol == "sluice.v1"
    await offered.close()
