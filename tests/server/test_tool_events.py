"""Tool calls through the server core, in-process: `generation_request` hands a message's format,
tools, tool_choice and tool turns to the backend, and the runtime turns each `ToolCall` a backend
yields into a numbered ``tool_call`` event (pending text flushed first, ``index`` from 0, a
server-made ``call_id``), ending with ``done`` ``finish_reason: "tool_calls"``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson

from protocol.codec import decode, encode
from protocol.messages import Generate, Limits, Models, ServerInfo, Welcome
from protocol.session import Session, SessionLimits
from server.backends.base import (
    GenerationItem,
    GenerationRequest,
    GenerationResult,
    Generator,
    Tool,
    ToolCall,
    ToolChoice,
    Turn,
)
from server.dispatcher import Dispatcher, generation_request
from server.metrics import Metrics
from server.outbox import Outbox
from server.ratelimit import RateLimiter
from server.runtime import SessionRuntime
from server.settings import Settings
from tests.server.fakes import FakeRegistry

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "now"}}


def generate(**fields: Any) -> Generate:
    message = decode(orjson.dumps({"type": "generate", "id": "g", **fields}), max_bytes=1 << 20)
    assert isinstance(message, Generate)
    return message


# ---------------------------------------------------------------------------------------------
# generation_request


def test_prompt_request_carries_format_tools_and_choice() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = generation_request(
        "m",
        generate(
            prompt="p",
            system="s",
            format=schema,
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "now"}},
        ),
    )
    assert (request.prompt, request.system, request.messages) == ("p", "s", None)
    assert request.format == schema
    assert request.tools == (
        Tool(
            name="get_weather", description="weather of a city", parameters=WEATHER["function"]["parameters"]
        ),
        Tool(name="now"),
    )
    assert request.tool_choice == ToolChoice(mode="required", name="now")


def test_choices_map_to_backend_modes() -> None:
    assert generation_request("m", generate(prompt="p")).tool_choice == ToolChoice("auto")
    assert generation_request("m", generate(prompt="p")).tools == ()
    for mode in ("auto", "none", "required"):
        request = generation_request("m", generate(prompt="p", tools=[CLOCK], tool_choice=mode))
        assert request.tool_choice == ToolChoice(mode)
    assert generation_request("m", generate(prompt="p", format="json")).format == "json"


def test_tool_turns_become_backend_turns() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    request = generation_request(
        "m",
        generate(
            messages=[
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "rain", "tool_call_id": "call_1"},
            ],
            tools=[WEATHER],
            tool_choice="none",
        ),
    )
    assert request.messages == (
        Turn(role="user", content="weather?"),
        Turn(
            role="assistant",
            content="",
            tool_calls=(ToolCall(name="get_weather", arguments='{"city":"Oslo"}', id="call_1"),),
        ),
        Turn(role="tool", content="rain", tool_call_id="call_1"),
    )
    assert request.tools[0].name == "get_weather" and request.tool_choice == ToolChoice("none")


# ---------------------------------------------------------------------------------------------
# runtime: ToolCall items become tool_call events


class CallingGenerator(Generator):
    """Text, then the scripted calls, then ``finish_reason: "tool_calls"``."""

    def __init__(self, script: list[str | ToolCall]) -> None:
        self.script = script
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationItem]:
        self.requests.append(request)
        for item in self.script:
            await asyncio.sleep(0)
            yield item
        calls = sum(isinstance(item, ToolCall) for item in self.script)
        yield GenerationResult(
            finish_reason="tool_calls" if calls else "stop",
            prompt_tokens=2,
            completion_tokens=len(self.script),
        )


def welcome(session_id: str, last_seq: int) -> Welcome:
    return Welcome(
        session=session_id,
        resumed=False,
        last_seq=last_seq,
        server=ServerInfo(version="test"),
        limits=Limits(max_message_bytes=1024, max_inflight=8, replay_events=4096, session_ttl_s=60),
        models=Models(generate=[], embed=[], classify=[]),
    )


async def run(
    script: list[str | ToolCall], message: Generate, soft: int = 64 * 1024
) -> tuple[list[dict[str, Any]], Session]:
    backend = CallingGenerator(script)
    settings = Settings()
    dispatcher = Dispatcher(FakeRegistry(backend), limiter=RateLimiter(settings), metrics=Metrics())
    session = Session("s1", SessionLimits())
    runtime = SessionRuntime(session, dispatcher=dispatcher, metrics=Metrics(), key_id="k")
    box = Outbox(encode=encode, soft_bytes=soft, hard_bytes=1 << 20)
    assert runtime.attach(box, 0, welcome)
    runtime.handle(message)
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        while not events or events[-1]["type"] != "done":
            frame = await box.next_frame()
            assert frame is not None
            events.append(orjson.loads(frame))
    await runtime.close()
    assert backend.requests[0].tools  # the backend saw the tools
    return events[1:], session


async def test_calls_become_numbered_events_after_the_text_before_them() -> None:
    script: list[str | ToolCall] = [
        "Let me ",
        "check.",
        ToolCall(name="get_weather", arguments='{"city":"Oslo"}'),
        ToolCall(name="now", arguments="{}"),
    ]
    events, session = await run(script, generate(prompt="weather?", tools=[WEATHER, CLOCK], history=True))
    kinds = [e["type"] for e in events]
    assert kinds[-3:] == ["tool_call", "tool_call", "done"]
    assert set(kinds[:-3]) == {"delta"}
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "Let me check."
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    first, second = events[-3], events[-2]
    assert (first["index"], first["name"], first["arguments"]) == (0, "get_weather", '{"city":"Oslo"}')
    assert (second["index"], second["name"], second["arguments"]) == (1, "now", "{}")
    assert first["call_id"].startswith("call_") and first["call_id"] != second["call_id"]
    assert events[-1]["finish_reason"] == "tool_calls"
    # The reply's calls are kept on the assistant turn, under the ids the client saw.
    assistant = session.history[-1]
    assert assistant.tool_calls is not None
    assert [c.id for c in assistant.tool_calls] == [first["call_id"], second["call_id"]]


async def test_pending_text_is_flushed_before_a_call_when_the_outbox_is_full() -> None:
    # A tiny soft limit makes the runtime merge deltas; the call must still come after its text.
    script: list[str | ToolCall] = ["a" * 50, "b" * 50, "c", ToolCall(name="now", arguments="{}"), "d"]
    events, _ = await run(script, generate(prompt="p", tools=[CLOCK]), soft=1)
    kinds = [e["type"] for e in events]
    call_at = kinds.index("tool_call")
    before = "".join(e["text"] for e in events[:call_at] if e["type"] == "delta")
    after = "".join(e["text"] for e in events[call_at:] if e["type"] == "delta")
    assert (before, after) == ("a" * 50 + "b" * 50 + "c", "d")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
