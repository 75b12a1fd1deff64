"""End to end on the guarded server: origin, API keys, tickets, rate limits, session TTL, dead peers."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time

import httpx
import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from tests.transports.websocket.conftest import ALLOWED_ORIGIN, Servers
from tests.transports.websocket.wsclient import Client, close_code, terminal_of

pytestmark = pytest.mark.models


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def closed_with(client: Client, within: float = 10.0) -> int | None:
    """The close code, asserting nothing but the close came first."""
    with pytest.raises(ConnectionClosed):
        await client.recv(within=within)
    return close_code(client.ws)


async def test_a_foreign_origin_is_refused_with_1008(servers: Servers) -> None:
    url = servers.guarded.ws_url
    foreign = await Client.connect(url, origin="https://evil.example", headers=bearer("key-auth"))
    assert await closed_with(foreign) == 1008
    for origin in (ALLOWED_ORIGIN, servers.guarded.url, None):  # listed, the server's own, no header
        client = await Client.connect(url, origin=origin, headers=bearer("key-auth"), hello={})
        assert (await client.recv())["type"] == "welcome", origin
        await client.close()
    localhost = await Client.connect(url, origin="http://localhost:3000", headers=bearer("key-auth"))
    assert await closed_with(localhost) == 1008  # not listed: an explicit list replaces the default


async def test_a_missing_or_wrong_key_is_refused_with_1008(servers: Servers) -> None:
    url = servers.guarded.ws_url
    nothing = await Client.connect(url, hello={})
    assert await closed_with(nothing) == 1008
    assert nothing.welcome is None
    wrong_header = await Client.connect(url, headers=bearer("not-a-key"))
    assert await closed_with(wrong_header) == 1008
    wrong_token = await Client.connect(url, hello={"token": "not-a-key"})
    assert await closed_with(wrong_token) == 1008
    token = await Client.connect(url, hello={"token": "key-auth"})
    assert (await token.recv())["type"] == "welcome"
    await token.close()


async def test_a_ticket_opens_one_connection(servers: Servers) -> None:
    async with httpx.AsyncClient(base_url=servers.guarded.url) as http:
        refused = await http.post("/v1/tickets")
        assert refused.status_code == 401
        issued = await http.post("/v1/tickets", headers=bearer("key-auth"))
        assert issued.status_code == 200
    ticket = issued.json()["ticket"]
    url = f"{servers.guarded.ws_url}?ticket={ticket}"
    client = await Client.connect(url, hello={})
    assert (await client.recv())["type"] == "welcome"
    await client.close()
    reused = await Client.connect(url)  # refused at once, before any message
    assert await closed_with(reused) == 1008


async def test_requests_past_the_per_key_rate_are_refused_with_retry_after(servers: Servers) -> None:
    client = await Client.connect(servers.guarded.ws_url, headers=bearer("key-limited"))
    for n in range(4):  # 3 per minute on this server
        await client.send({"type": "embed", "id": f"e{n}", "input": f"text {n}"})
    events = await client.until(
        lambda ev: all(terminal_of(ev, f"e{n}") for n in range(3)) and any(e.get("ref") == "e3" for e in ev)
    )
    refusal = next(e for e in events if e.get("ref") == "e3")
    assert refusal["code"] == "rate_limited" and "id" not in refusal
    assert refusal["retryable"] is True and refusal["retry_after_ms"] > 0
    assert terminal_of(events, "e3") is None
    await client.close()


async def test_a_session_is_resumable_within_its_ttl_and_gone_after(servers: Servers) -> None:
    url = servers.guarded.ws_url
    first = await Client.connect(url, headers=bearer("key-ttl"), hello={})
    await first.send({"type": "ping"})
    await first.until(lambda _: bool(first.pongs))
    assert first.welcome is not None
    session = first.welcome["session"]
    first.kill()
    soon = await Client.connect(url, headers=bearer("key-ttl"), hello={"session": session})
    assert (await soon.recv())["resumed"] is True  # within the 1 s TTL
    soon.kill()
    await asyncio.sleep(2.5)  # TTL 1 s, swept every 0.25 s
    late = await Client.connect(url, headers=bearer("key-ttl"), hello={"session": session, "last_seq": 0})
    welcome = await late.recv()
    assert welcome["resumed"] is False and welcome["session"] != session and welcome["last_seq"] == 0
    await late.close()


# A peer that completes the handshake and then goes silent (no reads, no pongs), built by hand:
# every WebSocket client library answers pings by itself.


def _raw_connect(port: int, key: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    nonce = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _send_text(sock: socket.socket, text: str) -> None:
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    first, second = _read_exact(sock, 2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", _read_exact(sock, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", _read_exact(sock, 8))[0]
    return first & 0x0F, _read_exact(sock, length)


async def test_a_dead_peer_is_detected_closed_and_detached(servers: Servers) -> None:
    sock = _raw_connect(servers.guarded.port, "key-ping")
    try:
        _send_text(sock, '{"type":"hello","protocol":1}')
        opcode, payload = _read_frame(sock)
        assert opcode == 1
        session = orjson.loads(payload)["session"]
        await asyncio.sleep(2.0)  # pings every 0.5 s, 0.5 s to answer: silent, so it is closed
        opcodes: list[int] = []
        close_payload = b""
        started = time.monotonic()
        with pytest.raises(EOFError):
            while time.monotonic() - started < 10:
                opcode, payload = _read_frame(sock)
                opcodes.append(opcode)
                if opcode == 8:
                    close_payload = payload
        assert 9 in opcodes, "the server pinged"
        assert 8 in opcodes and struct.unpack("!H", close_payload[:2])[0] == 1011
    finally:
        sock.close()
    await asyncio.sleep(2.0)  # detached, so its 1 s TTL runs out
    again = await Client.connect(
        servers.guarded.ws_url, headers=bearer("key-ping"), hello={"session": session}
    )
    assert (await again.recv())["resumed"] is False
    await again.close()
