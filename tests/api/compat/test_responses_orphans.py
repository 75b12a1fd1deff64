"""Cluster mode when the node running a background response dies, from the outside: real ``sluice
serve`` nodes on one real redis-server and the Ollama emulator, the real ``openai`` and ``redis``
packages. While it runs, ``GET`` on another node shows its text so far; once its node is SIGKILLed,
a reader on another node gets ``response.failed`` (the text so far, a retryable ``server_error``)
within a few seconds, not after the log's 30 s of silence; the node that reaps the dead one settles
its responses in the store though nobody reads them; a cancel whose node does not answer is a
typed, retryable 503."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis.asyncio as aioredis

from tests.api.compat.conftest import Cluster, cluster_env, reading_cluster
from tests.support.ollama_emulator import Emulator
from tests.support.server import ServerProcess, start_server

pytestmark = pytest.mark.timeout(150)

MODEL = "llama3.2:1b"
KEY = "orphan-responses"
# The lease (5 s) must lapse before a node counts as dead; the event log's silence limit is 30 s.
SETTLED_WITHIN_S = 15.0
Doomed = tuple[ServerProcess, str]  # the node and its id


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Redis, the emulator (slow: twenty seconds a response) and node ``b``, which outlives the
    nodes each test kills."""
    with reading_cluster(KEY, token_rate=20.0, tokens=400) as cluster:
        yield cluster


@pytest.fixture
async def on_b(cluster: Cluster) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{cluster[2].url}/v1", api_key=KEY, max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def doomed_node(cluster: Cluster) -> Iterator[Doomed]:
    """A node of the cluster that the test kills, and its id."""
    redis, emu, _ = cluster
    node_id = f"doomed-{time.monotonic_ns()}"
    node = start_server({**cluster_env(redis, emu, KEY), "SLUICE_NODE_ID": node_id})
    try:
        yield node, node_id
    finally:
        node.signal(signal.SIGCONT)
        node.stop()


async def _background(node: ServerProcess, user_text: str) -> str:
    async with openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=KEY, max_retries=0) as sdk:
        return (await sdk.responses.create(model=MODEL, input=user_text, background=True)).id


async def _text_grows(on_b: openai.AsyncOpenAI, response_id: str) -> Any:
    """The response as GET on node b shows it once it holds some text (it runs elsewhere)."""
    async with asyncio.timeout(20):
        while True:
            response = await on_b.responses.retrieve(response_id)
            if response.output_text:
                return response
            await asyncio.sleep(0.1)


def _expected(emu: Emulator, user_text: str) -> str:
    (body,) = [
        record.body
        for record in emu.generations()
        if isinstance(record.body, dict) and record.body["messages"][-1]["content"] == user_text
    ]
    return emu.expected_text(body)


async def test_a_reader_elsewhere_gets_failed_soon_after_the_node_dies(
    cluster: Cluster, doomed_node: Doomed, on_b: openai.AsyncOpenAI
) -> None:
    doomed, _ = doomed_node
    _, emu, _ = cluster
    response_id = await _background(doomed, "Orphan read")
    running = await _text_grows(on_b, response_id)
    assert running.status == "in_progress"
    assert _expected(emu, "Orphan read").startswith(running.output_text)
    events: list[Any] = []

    async def read() -> None:
        async for event in await on_b.responses.retrieve(response_id, stream=True, starting_after=-1):
            events.append(event)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.5)
    doomed.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.wait_for(reader, SETTLED_WITHIN_S + 5)
    took = time.monotonic() - killed_at

    assert took < SETTLED_WITHIN_S, took
    final = events[-1]
    assert final.type == "response.failed" and final.response.status == "failed"
    assert final.response.error.code == "server_error" and "retry" in final.response.error.message
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert len(text) >= len(running.output_text) and _expected(emu, "Orphan read").startswith(text)
    assert final.response.output[0].status == "incomplete"
    after = await on_b.responses.retrieve(response_id)
    assert after.status == "failed" and after.output_text == text
    cancelled = await on_b.responses.cancel(response_id)  # it ended: answered as it is
    assert cancelled.status == "failed"


async def test_the_reaper_settles_a_dead_nodes_responses_that_nobody_reads(
    cluster: Cluster, doomed_node: Doomed, on_b: openai.AsyncOpenAI
) -> None:
    doomed, doomed_id = doomed_node
    redis, _, _ = cluster
    response_id = await _background(doomed, "Orphan unread")
    await _text_grows(on_b, response_id)
    client = aioredis.Redis.from_url(redis.url)
    try:
        members = await client.smembers(f"sluice:node-responses:{doomed_id}")
        assert [orjson.loads(member)[0] for member in members] == [response_id]
        doomed.signal(signal.SIGKILL)
        async with asyncio.timeout(SETTLED_WITHIN_S):  # read in Redis itself: no GET settles it
            while True:
                stored = orjson.loads(await client.get(f"sluice:response:{response_id}"))
                if stored["response"]["status"] != "in_progress":
                    break
                await asyncio.sleep(0.2)
        events = [
            orjson.loads(raw) for raw in await client.lrange(f"sluice:response-events:{response_id}", 0, -1)
        ]
        running_there = await client.smembers(f"sluice:node-responses:{doomed_id}")
    finally:
        await client.aclose()
    assert stored["response"]["status"] == "failed" and stored["node"] == "" and not running_there
    assert events[-1] == {"type": "sluice.end"} and events[-2]["type"] == "response.failed"
    assert [event["sequence_number"] for event in events[:-1]] == list(range(len(events) - 1))
    after = await on_b.responses.retrieve(response_id)
    assert after.status == "failed" and after.output_text


async def test_a_cancel_whose_node_does_not_answer_is_a_retryable_503(
    cluster: Cluster, doomed_node: Doomed, on_b: openai.AsyncOpenAI
) -> None:
    doomed, _ = doomed_node
    response_id = await _background(doomed, "Orphan cancel")
    await _text_grows(on_b, response_id)
    doomed.signal(signal.SIGSTOP)  # alive by its lease for a few seconds more, answering nothing
    async with httpx.AsyncClient(base_url=cluster[2].url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        answer = await http.post(f"/v1/responses/{response_id}/cancel", timeout=20)
    doomed.signal(signal.SIGKILL)
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "upstream_unavailable" and "did not answer" in error["message"]
    assert int(answer.headers["Retry-After"]) >= 1
