"""Takeover across nodes under fast reconnects, from the outside: the resume soak on two real
``sluice serve`` nodes sharing one real redis-server, every resume on a random node.

A client that cuts its connection and reattaches within milliseconds, on the other node, must never
be closed 4009 by the late announcement of the transport it replaced: a 4009 without a newer
transport ends the soak (`tests.reliability.links.LinkClosed`). Bounded (``bench/soak.py --nodes 2``
runs the full 1,000 cuts): 300 cuts over SSE, 300 with the session moving between WebSocket and
SSE, with no pauses and few events read between cuts, so reattaches come as fast as the client can
make them; the text of every generation must equal the emulator's and seq must be gap-free.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.resume import SoakConfig, run_soak
from tests.reliability.serving import start_reliability_server
from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.redis_server import RedisServer, run_redis
from tests.support.server import ServerProcess

CUTS = 300


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[RedisServer, Emulator, list[ServerProcess]]]:
    with run_redis() as redis, start_emulator(token_rate=400.0, tokens=300) as emu:
        nodes: list[ServerProcess] = []
        try:
            for name in ("a", "b"):
                env = {"SLUICE_OLLAMA_URLS": emu.url, "SLUICE_REDIS_URL": redis.url, "SLUICE_NODE_ID": name}
                nodes.append(start_reliability_server(env))
            yield redis, emu, nodes
        finally:
            for node in nodes:
                node.stop()


@pytest.mark.parametrize("transport", ["sse", "mixed"])
async def test_fast_reattaches_on_either_node_are_never_closed_by_an_older_transport(
    transport: str, two_nodes: tuple[RedisServer, Emulator, list[ServerProcess]]
) -> None:
    _, emu, nodes = two_nodes
    emu.reset()
    config = SoakConfig(
        transport=transport,  # type: ignore[arg-type]
        disconnects=CUTS,
        seed=3,
        max_read=12,
        pause_chance=0.0,
        long_pause_chance=0.0,
        time_limit_s=90,
    )
    urls = [node.url for node in nodes]
    result = await run_soak(config, base_url=urls[0], emulator=emu, nodes=urls)
    print("\n" + result.summary())
    assert not result.stopped_early, result.summary()
    assert result.disconnects == CUTS
    assert result.generations >= 2
    assert all(result.node_resumes.get(url, 0) > CUTS // 4 for url in urls), result.node_resumes
    if transport == "mixed":
        assert result.resumes["ws"] > 0 and result.resumes["sse"] > 0
