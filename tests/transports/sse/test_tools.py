"""Tool calls over the SSE transport on a real server: the ``tool_call`` event on the stream
(``id: <seq>`` / ``event: tool_call``), resumed with ``Last-Event-ID`` from just before a call,
and a refused ``tool_choice`` answered as a typed 422 by ``POST .../messages``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.api.conftest import MODEL
from tests.support.ollama_emulator import Emulator
from tests.support.ollama_replies import instance_of
from tests.transports.sse.session_helpers import EventStream, open_session, post

pytestmark = pytest.mark.timeout(120)

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}},
    {"type": "function", "function": {"name": "now"}},
]


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:
        yield http


@pytest.fixture
def two_calls(emulator: Emulator) -> Iterator[None]:
    before = emulator.config
    emulator.configure(tool_calls=2)
    yield
    emulator.configure(tool_calls=before.tool_calls)


@pytest.mark.usefixtures("two_calls")
async def test_tool_calls_arrive_as_events_and_resume_from_before_a_call(client: httpx.AsyncClient) -> None:
    session = (await open_session(client))["session"]
    async with EventStream(client, session) as stream:
        await stream.opened()
        message = {
            "type": "generate",
            "id": "t",
            "model": MODEL,
            "prompt": "weather and time",
            "tools": TOOLS,
        }
        assert (await post(client, session, message)).status_code == 202
        await stream.until(lambda: stream.terminal("t") is not None)
        events = list(stream.events)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    calls = [e for e in events if e["type"] == "tool_call"]
    assert [(c["index"], c["name"]) for c in calls] == [(0, "get_weather"), (1, "now")]
    assert json.loads(calls[0]["arguments"]) == instance_of(PARAMETERS)
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "tool_calls"
    # The SSE id of each event is its seq (the helper checks it); resuming just before the first
    # call replays the calls and the done exactly.
    before = int(calls[0]["seq"]) - 1
    async with EventStream(client, session, last_event_id=before) as again:
        assert await again.opened() == 200
        await again.until(lambda: again.terminal("t") is not None)
        assert again.events == [e for e in events if e["seq"] > before]


async def test_a_tool_choice_naming_no_tool_is_refused_by_the_post(client: httpx.AsyncClient) -> None:
    session = (await open_session(client))["session"]
    message = {
        "type": "generate",
        "id": "bad",
        "model": MODEL,
        "prompt": "p",
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "missing"}},
    }
    response = await post(client, session, message)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_message" and "tool_choice" in error["message"], error
