"""Stored OpenAI responses in cluster mode, from the outside: two real ``sluice serve`` nodes on
loopback sharing one real redis-server and the Ollama emulator, driven by the real ``openai``
SDK. A response made on one node is retrieved, listed, chained from and deleted on the other,
only by its key, until its TTL; a background response running on one node is resumed on the
other from its event log in Redis (exact text, consecutive sequence numbers), and cancelled from
the other (the upstream closed on the node running it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest

from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.redis_server import RedisServer, run_redis
from tests.support.server import ServerProcess, start_server

pytestmark = pytest.mark.timeout(120)

MODEL = "llama3.2:1b"
KEY_A, KEY_B = "cluster-responses-a", "cluster-responses-b"
TTL_S = 4
Cluster = tuple[RedisServer, Emulator, list[ServerProcess]]
Clients = tuple[openai.AsyncOpenAI, openai.AsyncOpenAI, openai.AsyncOpenAI]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with run_redis() as redis, start_emulator(token_rate=0.0, tokens=20) as emu:
        env = {
            "SLUICE_OLLAMA_URLS": emu.url,
            "SLUICE_LOAD_LOCAL_GENERATION": "false",
            "SLUICE_REDIS_URL": redis.url,
            "SLUICE_API_KEYS": f"{KEY_A},{KEY_B}",
            "SLUICE_RESPONSES_TTL_S": str(TTL_S),
            "SLUICE_LOG_LEVEL": "warning",
        }
        nodes: list[ServerProcess] = []
        try:
            for name in ("a", "b"):
                nodes.append(start_server({**env, "SLUICE_NODE_ID": name}))
            yield redis, emu, nodes
        finally:
            for node in nodes:
                node.stop()


@pytest.fixture
async def clients(cluster: Cluster) -> AsyncIterator[Clients]:
    """The owner on node A, the owner on node B, another key on node B."""
    _, _, (a, b) = cluster
    async with (
        openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key=KEY_A, max_retries=0) as on_a,
        openai.AsyncOpenAI(base_url=f"{b.url}/v1", api_key=KEY_A, max_retries=0) as on_b,
        openai.AsyncOpenAI(base_url=f"{b.url}/v1", api_key=KEY_B, max_retries=0) as other,
    ):
        yield on_a, on_b, other


async def test_a_response_made_on_one_node_is_everywhere(clients: Clients, cluster: Cluster) -> None:
    on_a, on_b, other = clients
    redis, emu, _ = cluster
    first = await on_a.responses.create(model=MODEL, input="One", metadata={"where": "a"})
    assert (await on_b.responses.retrieve(first.id)).model_dump() == first.model_dump()
    listed = await on_b.responses.input_items.list(first.id)
    assert [item.content[0].text for item in listed.data] == ["One"]
    second = await on_b.responses.create(model=MODEL, input="Two", previous_response_id=first.id)
    body: Any = emu.generations()[-1].body
    assert [message["content"] for message in body["messages"]] == ["One", first.output_text, "Two"]
    chained = await on_a.responses.input_items.list(second.id)
    assert [item.content[0].text for item in chained.data] == ["Two", first.output_text, "One"]
    for call in (
        other.responses.retrieve(first.id),
        other.responses.input_items.list(first.id),
        other.responses.delete(first.id),
    ):
        with pytest.raises(openai.NotFoundError):
            await call
    with pytest.raises(openai.BadRequestError) as chained_by_other:
        await other.responses.create(model=MODEL, input="Yours?", previous_response_id=first.id)
    assert chained_by_other.value.param == "previous_response_id"
    await on_b.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await on_a.responses.retrieve(first.id)
    assert (await on_a.responses.retrieve(second.id)).output_text == second.output_text
    ttl_ms = int(redis.command("PTTL", f"sluice:response:{second.id}"))
    assert 0 < ttl_ms <= TTL_S * 1000
    await asyncio.sleep(TTL_S + 0.5)
    with pytest.raises(openai.NotFoundError):
        await on_b.responses.retrieve(second.id)


async def test_a_background_response_running_on_one_node_resumes_on_the_other(
    clients: Clients, cluster: Cluster
) -> None:
    on_a, on_b, other = clients
    redis, emu, _ = cluster
    emu.configure(token_rate=40.0, tokens=80)
    try:
        stream = await on_a.responses.create(model=MODEL, input="A long story", background=True, stream=True)
        first: list[Any] = []
        async for event in stream:
            first.append(event)
            if event.type == "response.output_text.delta" and event.sequence_number >= 6:
                break
        await stream.close()  # dropped on node A; resumed on node B while A still runs it
        response_id, last = first[0].response.id, first[-1].sequence_number
        running = await on_b.responses.retrieve(response_id)
        assert running.status == "in_progress" and running.background
        with pytest.raises(openai.NotFoundError):
            await other.responses.retrieve(response_id, stream=True, starting_after=0)
        resumed = await on_b.responses.retrieve(response_id, stream=True, starting_after=last)
        rest = [event async for event in resumed]
        assert [event.sequence_number for event in rest] == list(range(last + 1, last + 1 + len(rest)))
        assert rest[-1].type == "response.completed"
        expected = emu.expected_text(emu.generations()[-1].body)
        deltas = [e.delta for e in first + rest if e.type == "response.output_text.delta"]
        assert "".join(deltas) == expected == rest[-1].response.output_text
        on_a_whole = await on_a.responses.retrieve(response_id, stream=True)
        on_b_whole = await on_b.responses.retrieve(response_id, stream=True)
        assert [e.model_dump() async for e in on_b_whole] == [e.model_dump() async for e in on_a_whole]
        assert (await on_b.responses.cancel(response_id)).status == "completed"  # ended: as it is
        await on_b.responses.delete(response_id)
        assert int(redis.command("EXISTS", f"sluice:response-events:{response_id}")) == 0
    finally:
        emu.configure(token_rate=0.0, tokens=20)


async def test_a_cancel_on_one_node_closes_the_upstream_on_the_node_running_it(
    clients: Clients, cluster: Cluster
) -> None:
    on_a, on_b, other = clients
    _, emu, _ = cluster
    emu.configure(token_rate=40.0, tokens=400)  # ten seconds of text
    try:
        before = len(emu.generations())  # earlier tests' generations stay in the emulator's list
        created = await on_a.responses.create(model=MODEL, input="A very long story", background=True)
        assert await emu.until(
            lambda: len(emu.generations()) > before and emu.generations()[before].pieces_sent > 2
        )
        record = emu.generations()[before]
        async with asyncio.timeout(10):  # node A has taken some of it in (B shows its text so far)
            while True:
                if (await on_b.responses.retrieve(created.id)).output_text:
                    break
                await asyncio.sleep(0.02)
        with pytest.raises(openai.NotFoundError):
            await other.responses.cancel(created.id)
        cancelled = await on_b.responses.cancel(created.id)
        assert cancelled.status == "cancelled" and cancelled.output_text
        assert await emu.until(lambda: record.client_closed_early), "upstream still open"
        assert record.text_sent.startswith(cancelled.output_text)
        assert (await on_a.responses.retrieve(created.id)).model_dump() == cancelled.model_dump()
        assert (await on_b.responses.cancel(created.id)).model_dump() == cancelled.model_dump()
    finally:
        emu.configure(token_rate=0.0, tokens=20)
