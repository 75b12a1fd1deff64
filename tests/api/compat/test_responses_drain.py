"""SIGTERM on a real ``sluice serve`` node running OpenAI responses, from the outside: the real
``openai`` SDK (HTTP, SSE and WebSocket mode) against the Ollama emulator, the node in cluster mode
on a real redis-server so that a second node retrieves what the first one stored after it exited.

While the node drains, a new response is refused with the typed ``shutting_down`` (a 503 over HTTP,
the SDK's ``error`` event on the socket) and the running responses (background, streamed, on a
socket) finish whole (exact texts); those still running at the drain's deadline end ``failed``
with their text so far, stored so and sent as ``response.failed``; then the socket closes 1012 and
the process exits 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
import websockets

from tests.api.compat.conftest import Cluster, cluster_env, reading_cluster
from tests.support.ollama_emulator import Emulator
from tests.support.server import ServerProcess, start_server

pytestmark = pytest.mark.timeout(150)

MODEL = "llama3.2:1b"
KEY = "drain-responses"
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Redis, the emulator and node ``b``, which outlives the drained nodes and reads after them."""
    with reading_cluster(KEY, token_rate=0.0, tokens=20) as cluster:
        yield cluster


@pytest.fixture
async def reader(cluster: Cluster) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{cluster[2].url}/v1", api_key=KEY, max_retries=0) as sdk:
        yield sdk


def _node(cluster: Cluster, name: str, drain_timeout_s: float) -> ServerProcess:
    redis, emu, _ = cluster
    env = {
        **cluster_env(redis, emu, KEY),
        "SLUICE_NODE_ID": name,
        "SLUICE_DRAIN_TIMEOUT_S": str(drain_timeout_s),
    }
    return start_server(env)


def _expected(emu: Emulator, user_text: str) -> str:
    (body,) = [
        record.body
        for record in emu.generations()
        if isinstance(record.body, dict) and record.body["messages"][-1]["content"] == user_text
    ]
    return emu.expected_text(body)


class _Socket:
    """One SDK socket to the draining node: its events, and the close code that ended it."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.events: list[Any] = []
        self.close_codes: list[int] = []
        self.reconnect_codes: list[int] = []  # what the SDK would have reconnected on

    def reconnecting(self, event: Any) -> Any:
        self.reconnect_codes.append(event.close_code)
        return {"abort": True}  # the node is gone: do not try it again

    async def until(self, done: Any) -> None:
        async with asyncio.timeout(40):
            async for event in self.connection:
                self.events.append(event)
                if done(self.events):
                    return

    async def to_end(self) -> None:
        """Read until the socket is closed (the SDK raises the close once it gave up)."""
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await self.until(lambda _: False)
        assert closed.value.rcvd is not None
        self.close_codes.append(closed.value.rcvd.code)

    def lane(self, stream_id: str) -> list[Any]:
        return [event for event in self.events if getattr(event, "stream_id", None) == stream_id]


def _text(events: list[Any]) -> str:
    return "".join(event.delta for event in events if event.type == "response.output_text.delta")


async def test_sigterm_lets_running_responses_finish_and_refuses_new_ones(
    cluster: Cluster, reader: openai.AsyncOpenAI
) -> None:
    _, emu, _ = cluster
    emu.configure(token_rate=25.0, tokens=50)  # two seconds each, well inside the drain timeout
    node = _node(cluster, "a", drain_timeout_s=20)
    try:
        async with (
            openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=KEY, max_retries=0) as sdk,
            httpx.AsyncClient(base_url=node.url, headers={"Authorization": f"Bearer {KEY}"}) as warm,
        ):
            assert (await warm.get("/health")).status_code == 200  # a kept-alive connection
            background = await sdk.responses.create(model=MODEL, input="Drain bg", background=True)
            streamed = await sdk.responses.create(model=MODEL, input="Drain sse", stream=True)
            socket_cm = sdk.responses.connect(on_reconnecting=lambda event: sock.reconnecting(event))
            async with socket_cm as connection:
                sock = _Socket(connection)
                await connection.response.create(model=MODEL, input="Drain ws", stream_id="s")
                await sock.until(lambda events: any(e.type == "response.output_text.delta" for e in events))

                node.signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                refused = await warm.post("/v1/responses", json={"model": MODEL, "input": "Too late"})
                await connection.response.create(model=MODEL, input="Too late ws", stream_id="late")
                sse_events = [event async for event in streamed]
                await sock.to_end()
            assert await asyncio.to_thread(node.wait, 30) == 0
    finally:
        node.stop()

    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    (late,) = sock.lane("late")
    assert late.type == "error" and late.status == 503 and late.error.code == "shutting_down"
    lane = sock.lane("s")
    assert lane[-1].type == "response.completed"
    assert _text(lane) == lane[-1].response.output_text == _expected(emu, "Drain ws")
    assert sock.close_codes == sock.reconnect_codes == [1012]
    assert sse_events[-1].type == "response.completed"
    assert _text(sse_events) == _expected(emu, "Drain sse")
    assert [event.sequence_number for event in sse_events] == list(range(len(sse_events)))
    after = await reader.responses.retrieve(background.id)  # stored in Redis, read on node b
    assert after.status == "completed" and after.output_text == _expected(emu, "Drain bg")
    assert not any(
        r.body.get("messages", [{}])[-1].get("content", "").startswith("Too late") for r in emu.generations()
    )


async def test_responses_still_running_at_the_deadline_end_failed_and_stored(
    cluster: Cluster, reader: openai.AsyncOpenAI
) -> None:
    _, emu, _ = cluster
    emu.configure(token_rate=20.0, tokens=400)  # twenty seconds each: the deadline cuts them
    node = _node(cluster, "c", drain_timeout_s=1.0)
    try:
        async with openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=KEY, max_retries=0) as sdk:
            background = await sdk.responses.create(model=MODEL, input="Cut bg", background=True)
            socket_cm = sdk.responses.connect(on_reconnecting=lambda event: sock.reconnecting(event))
            async with socket_cm as connection:
                sock = _Socket(connection)
                await connection.response.create(model=MODEL, input="Cut ws", stream_id="s")
                await sock.until(
                    lambda events: sum(e.type == "response.output_text.delta" for e in events) >= 3
                )
                node.signal(signal.SIGTERM)
                await sock.to_end()
            assert await asyncio.to_thread(node.wait, 30) == 0
    finally:
        node.stop()

    lane = sock.lane("s")
    failed = lane[-1]
    assert failed.type == "response.failed" and failed.response.error.code == "server_error"
    assert "shut down" in failed.response.error.message
    assert [event.sequence_number for event in lane] == list(range(len(lane)))
    so_far = _text(lane)
    assert so_far and _expected(emu, "Cut ws").startswith(so_far)
    assert sock.close_codes == sock.reconnect_codes == [1012]
    stored_ws = await reader.responses.retrieve(failed.response.id)
    assert stored_ws.status == "failed" and stored_ws.output_text == so_far

    after = await reader.responses.retrieve(background.id)  # never stuck in_progress
    assert after.status == "failed" and after.error is not None and after.error.code == "server_error"
    assert after.output_text and _expected(emu, "Cut bg").startswith(after.output_text)
    replay = [
        event
        async for event in await reader.responses.retrieve(background.id, stream=True, starting_after=-1)
    ]
    assert replay[-1].type == "response.failed" and replay[-1].response.status == "failed"
    assert _text(replay) == after.output_text
    assert [event.sequence_number for event in replay] == list(range(len(replay)))
