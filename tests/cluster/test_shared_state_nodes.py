"""Shared state from the outside: two real ``sluice serve`` nodes on loopback, one real
redis-server, the Ollama emulator. A ticket issued by one node opens a WebSocket on the other,
once; a per-key request rate is one budget for both nodes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.redis_server import RedisServer, run_redis
from tests.support.server import ServerProcess, start_server

KEY = "sk-nodes-0123456789"
RATE = 4


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with run_redis() as redis, start_emulator(tokens=4) as emu:
        started: list[ServerProcess] = []
        try:
            for _ in range(2):
                started.append(start_server(_env(redis, emu)))
            yield started[0], started[1]
        finally:
            for node in started:
                node.stop()


def _env(redis: RedisServer, emu: Emulator) -> dict[str, str]:
    return {
        "SLUICE_OLLAMA_URLS": emu.url,
        "SLUICE_LOAD_LOCAL_GENERATION": "false",
        "SLUICE_DEFAULT_MODEL": "llama3.2:1b",
        "SLUICE_REDIS_URL": redis.url,
        "SLUICE_API_KEYS": KEY,
        "SLUICE_REQUESTS_PER_MINUTE": str(RATE),
        "SLUICE_LOG_LEVEL": "warning",
    }


async def _welcome(node: ServerProcess, ticket: str) -> dict[str, object]:
    async with connect(f"{node.ws_url}?ticket={ticket}", subprotocols=["sluice.v1"]) as ws:  # type: ignore[list-item]
        await ws.send('{"type":"hello","protocol":1}')
        event: dict[str, object] = orjson.loads(await asyncio.wait_for(ws.recv(), 20))
        return event


async def test_a_ticket_from_one_node_opens_a_socket_on_the_other_once(
    nodes: tuple[ServerProcess, ServerProcess],
) -> None:
    node_a, node_b = nodes
    async with httpx.AsyncClient(timeout=10) as http:
        issued = await http.post(f"{node_a.url}/v1/tickets", headers={"Authorization": f"Bearer {KEY}"})
    assert issued.status_code == 200, issued.text
    ticket = issued.json()["ticket"]
    assert (await _welcome(node_b, ticket))["type"] == "welcome"
    for node in (node_a, node_b):  # spent: refused on both nodes, closed 1008 "unauthorized"
        with pytest.raises(ConnectionClosed) as refused:
            await _welcome(node, ticket)
        assert refused.value.rcvd is not None and refused.value.rcvd.code == 1008
        assert "unauthorized" in refused.value.rcvd.reason


def test_a_per_key_rate_limit_is_shared_by_both_nodes(nodes: tuple[ServerProcess, ServerProcess]) -> None:
    statuses = []
    with httpx.Client(timeout=20, headers={"Authorization": f"Bearer {KEY}"}) as http:
        for n in range(RATE + 2):
            node = nodes[n % 2]
            response = http.post(f"{node.url}/api/v1/generate", json={"prompt": f"hi {n}"})
            statuses.append(response.status_code)
            time.sleep(0.3)  # more than a sync interval (50 ms): each node has heard of the other
    # Alone, each node would have allowed RATE requests; together they allow RATE.
    assert statuses == [200] * RATE + [429, 429]
