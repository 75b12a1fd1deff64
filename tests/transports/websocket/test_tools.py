"""Tools and structured outputs end to end on a real ``sluice serve`` (``/v1/ws``) with the Ollama
emulator upstream: the ``tool_call`` event sequence, a tool round trip kept in the session's
history, a resume in the middle of a generation that made calls (replayed exactly), ``format``
passed upstream and held to, and bad input refused with typed errors while the session goes on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from tests.support.ollama_emulator import Emulator, RequestRecord
from tests.support.ollama_replies import ReplyFault, instance_of
from tests.transports.websocket.conftest import Servers
from tests.transports.websocket.wsclient import Client, terminal_of, text_of

pytestmark = pytest.mark.models

UPSTREAM = "llama3.2:1b"
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "the time"}}


@pytest.fixture(autouse=True)
def plain_replies(emu: Emulator) -> Iterator[None]:
    emu.configure(tool_calls=1, text_before_calls=2, reply_fault=ReplyFault.NONE)
    yield
    emu.configure(tool_calls=1, text_before_calls=2, reply_fault=ReplyFault.NONE)


def generate(request_id: str, prompt: str, **extra: Any) -> dict[str, Any]:
    return {"type": "generate", "id": request_id, "model": UPSTREAM, "prompt": prompt} | extra


def of(events: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("id") == request_id]


def chat_record(emu: Emulator, content: str) -> RequestRecord:
    found = [
        r
        for r in emu.generations()
        if r.path == "/api/chat" and any(m.get("content") == content for m in r.body.get("messages", []))
    ]
    assert len(found) == 1, f"{len(found)} upstream chats with {content!r}"
    return found[0]


def assert_contiguous(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "seq must start at 1 with no gap or repeat"


async def test_calls_stream_as_tool_call_events_then_done_tool_calls(servers: Servers, emu: Emulator) -> None:
    emu.configure(tool_calls=2)
    client = await Client.connect(servers.main.ws_url)
    await client.send(generate("t", "weather and time, please", tools=[WEATHER, CLOCK]))
    events = of(await client.until_terminal("t"), "t")
    kinds = [e["type"] for e in events]
    assert kinds[-3:] == ["tool_call", "tool_call", "done"] and set(kinds[:-3]) == {"delta"}
    record = chat_record(emu, "weather and time, please")
    assert [t["function"]["name"] for t in record.body["tools"]] == ["get_weather", "now"]
    assert text_of(events, "t") == "".join(record.planned)
    first, second, done = events[-3:]
    assert (first["index"], first["name"], second["index"], second["name"]) == (0, "get_weather", 1, "now")
    assert json.loads(first["arguments"]) == instance_of(WEATHER_PARAMETERS)
    jsonschema.validate(json.loads(first["arguments"]), WEATHER_PARAMETERS)
    assert json.loads(second["arguments"]) == {}
    assert first["call_id"].startswith("call_") and first["call_id"] != second["call_id"]
    assert done["finish_reason"] == "tool_calls"
    assert_contiguous(client.events)
    await client.close()


async def test_a_tool_round_trip_through_the_session_history(servers: Servers, emu: Emulator) -> None:
    client = await Client.connect(servers.main.ws_url)
    await client.send(generate("ask", "weather in Oslo?", tools=[WEATHER], history=True))
    events = await client.until_terminal("ask")
    (call,) = [e for e in events if e["type"] == "tool_call"]
    answer = {"role": "tool", "content": '{"temp_c": 7}', "tool_call_id": call["call_id"]}
    await client.send(
        {
            "type": "generate",
            "id": "answer",
            "model": UPSTREAM,
            "messages": [answer],
            "tools": [WEATHER],
            "history": True,
        }
    )
    events = await client.until_terminal("answer")
    done = terminal_of(events, "answer")
    assert done is not None and done["type"] == "done" and done["finish_reason"] == "stop"
    assert not [e for e in of(events, "answer") if e["type"] == "tool_call"]
    # Upstream got the whole conversation: the question, the call (arguments as an object), the result.
    sent = chat_record(emu, '{"temp_c": 7}').body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": json.loads(call["arguments"])}}
    ]
    assert sent[2] == {"role": "tool", "content": '{"temp_c": 7}', "tool_name": "get_weather"}
    await client.close()


async def test_resume_in_the_middle_of_a_generation_with_calls_replays_exactly(
    servers: Servers, emu: Emulator
) -> None:
    emu.configure(token_rate=300, tokens=400, text_before_calls=300, tool_calls=2)
    first = await Client.connect(servers.main.ws_url)
    await first.send(generate("r", "resume across the calls", tools=[WEATHER, CLOCK]))
    await first.until(lambda ev: len(ev) >= 20)
    assert first.welcome is not None
    session, seen = first.welcome["session"], first.last_seq
    first.kill()
    await asyncio.sleep(0.3)  # the generation goes on with nobody attached

    second = await Client.connect(servers.main.ws_url, hello={"session": session, "last_seq": seen})
    events = await second.until_terminal("r")
    assert second.welcome is not None and second.welcome["resumed"] is True
    combined = [e for e in first.events if e["seq"] <= seen] + events
    assert_contiguous(combined)
    record = chat_record(emu, "resume across the calls")
    assert text_of(combined, "r") == "".join(record.planned)
    calls = [e for e in combined if e["type"] == "tool_call"]
    assert [(c["index"], c["name"]) for c in calls] == [(0, "get_weather"), (1, "now")]
    assert combined[-1]["type"] == "done" and combined[-1]["finish_reason"] == "tool_calls"

    # A second resume from just before the first call replays the same events, byte for byte.
    before_call = calls[0]["seq"] - 1
    await second.close()
    third = await Client.connect(servers.main.ws_url, hello={"session": session, "last_seq": before_call})
    replayed = await third.until_terminal("r")
    assert third.welcome is not None and third.welcome["resumed"] is True
    assert replayed == [e for e in combined if e["seq"] > before_call]
    await third.close()


async def test_format_goes_upstream_and_the_reply_is_an_instance(servers: Servers, emu: Emulator) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "population": {"type": "integer", "minimum": 1},
            "rivers": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        },
        "required": ["city", "population", "rivers"],
    }
    client = await Client.connect(servers.main.ws_url)
    await client.send(generate("f", "a city as JSON", format=schema))
    events = await client.until_terminal("f")
    jsonschema.validate(json.loads(text_of(events, "f")), schema)
    upstream = [r for r in emu.generations() if r.body.get("prompt") == "a city as JSON"]
    assert len(upstream) == 1 and upstream[0].body["format"] == schema
    assert terminal_of(events, "f")["finish_reason"] == "stop"  # type: ignore[index]
    await client.close()


async def test_a_broken_guarantee_ends_with_a_typed_error(servers: Servers, emu: Emulator) -> None:
    client = await Client.connect(servers.main.ws_url)
    emu.configure(reply_fault=ReplyFault.NO_CALL)
    await client.send(generate("req", "call something", tools=[WEATHER], tool_choice="required"))
    end = terminal_of(await client.until_terminal("req"), "req")
    assert end is not None and end["type"] == "error" and end["code"] == "upstream_error"
    assert "tool_choice" in end["message"]
    emu.configure(reply_fault=ReplyFault.NOT_JSON)
    await client.send(generate("js", "json please", format="json"))
    end = terminal_of(await client.until_terminal("js"), "js")
    assert end is not None and end["type"] == "error" and end["code"] == "upstream_error"
    await client.close()


BAD = [
    (generate("b1", "p", format={"type": "object", "properties": {"a": {"type": "strng"}}}), "format"),
    (
        generate("b2", "p", tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
        "tool_choice",
    ),
    (
        generate(
            "b3",
            "p",
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
        ),
        "tools[0].function.parameters",
    ),
    (generate("b4", "p", tools=[WEATHER, WEATHER]), "tools"),
    (generate("b5", "p", tool_choice="required"), "tool_choice"),
    (generate("b6", "p", format="yaml"), "format"),
]


async def test_bad_tools_and_formats_are_refused_and_the_session_goes_on(
    servers: Servers, emu: Emulator
) -> None:
    client = await Client.connect(servers.main.ws_url)
    for message, field in BAD:
        await client.send(message)
        events = await client.until(lambda ev, ref=message["id"]: any(e.get("ref") == ref for e in ev))
        error = events[-1]
        assert error["type"] == "error" and error["code"] == "invalid_message", error
        assert error["ref"] == message["id"] and "id" not in error
        assert field in error["message"], error["message"]
    assert not emu.generations()  # nothing bad went upstream
    await client.send(generate("ok", "still here?", tools=[CLOCK]))
    events = await client.until_terminal("ok")
    assert terminal_of(events, "ok")["finish_reason"] == "tool_calls"  # type: ignore[index]
    assert_contiguous(client.events)
    await client.close()
