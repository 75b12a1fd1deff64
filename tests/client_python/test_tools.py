"""Tools and structured output through the client, against the fake server on loopback: the
request on the wire, tool calls on the stream and the result, a tool-result round trip, resume
in the middle of a generation that calls tools, and bad arguments refused before sending."""

from __future__ import annotations

import asyncio
import json

import pytest
from sluice_client import AsyncClient, Client, ErrorCode, SluiceError, ToolCall

from protocol.messages import ChatMessage, Generate
from protocol.tools import NamedToolChoice
from tests.client_python.fake_server import FakeServer, expected_arguments, expected_json, expected_text
from tests.client_python.knobs import FAST

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "clock"}}


async def test_tool_calls_stream_in_order_and_end_the_result(fake: FakeServer) -> None:
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        stream = s.generate("weather in Oslo?", tools=[WEATHER, CLOCK], tool_choice="auto")
        items = [item async for item in stream.events()]
        words = expected_text("weather in Oslo?", 12).split(" ")
        assert items[:2] == [words[0] + " ", words[1] + " "]
        calls = items[2:]
        assert calls == [
            ToolCall(
                0, f"call-{stream.id}-0", "get_weather", expected_arguments("weather in Oslo?", "get_weather")
            ),
            ToolCall(1, f"call-{stream.id}-1", "clock", expected_arguments("weather in Oslo?", "clock")),
        ]
        assert stream.tool_calls == calls
        result = stream.result
        assert result is not None and result.finish_reason == "tool_calls"
        assert result.tool_calls == tuple(calls) and result.text == "".join(items[:2])
        assert calls[0].parsed == {"tool": "get_weather", "about": "weather in Oslo?"}
        assert "tool_calls=[get_weather, clock]" in repr(result)
        assert repr(stream).endswith("2 tool call(s)>")
        sent = fake.received_of(Generate)[-1]
        assert [tool.function.name for tool in sent.tools or []] == ["get_weather", "clock"]
        assert (
            sent.tools is not None and sent.tools[0].function.parameters == WEATHER["function"]["parameters"]
        )
        assert sent.tool_choice == "auto"


async def test_plain_iteration_yields_text_only_and_collect_keeps_the_calls(fake: FakeServer) -> None:
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        choice = {"type": "function", "function": {"name": "clock"}}
        stream = s.generate("what time", tools=[WEATHER, CLOCK], tool_choice=choice)
        pieces = [piece async for piece in stream]
        assert all(isinstance(piece, str) for piece in pieces) and len(pieces) == 2
        assert stream.result is not None and [c.name for c in stream.result.tool_calls] == ["clock"]
        assert fake.received_of(Generate)[-1].tool_choice == NamedToolChoice.model_validate(choice)
        none = await s.generate("no calls", tools=[CLOCK], tool_choice="none")
        assert (
            none.finish_reason == "stop"
            and none.tool_calls == ()
            and none.text == expected_text("no calls", 12)
        )


async def test_tool_result_round_trip(fake: FakeServer) -> None:
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        turns: list[ChatMessage | dict[str, str]] = [{"role": "user", "content": "weather in Oslo?"}]
        first = await s.generate(messages=turns, tools=[WEATHER])
        assert first.finish_reason == "tool_calls" and len(first.tool_calls) == 1
        call = first.tool_calls[0]
        turns.append(first.message)
        turns.append(call.reply(json.dumps({"city": call.parsed["about"], "sky": "clear"})))
        second = await s.generate(messages=turns, tools=[WEATHER])
        material = "|".join(
            ["weather in Oslo?", first.text, json.dumps({"city": "weather in Oslo?", "sky": "clear"})]
        )
        assert second.finish_reason == "stop" and second.text == expected_text(material, 12)
        sent = fake.received_of(Generate)[-1].messages
        assert sent is not None and [m.role for m in sent] == ["user", "assistant", "tool"]
        assistant, tool = sent[1], sent[2]
        assert assistant.content == first.text and assistant.tool_calls is not None
        assert (assistant.tool_calls[0].id, assistant.tool_calls[0].function.name) == (
            call.call_id,
            "get_weather",
        )
        assert assistant.tool_calls[0].function.arguments == call.arguments
        assert tool.tool_call_id == call.call_id
        # The same turns as plain dicts in the wire shape work too.
        plain = [m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else m for m in turns]
        assert plain[1]["tool_calls"][0]["function"]["name"] == "get_weather"
        again = await s.generate(messages=plain, tools=[WEATHER])
        assert again.text == second.text


async def test_format_json_and_schema_go_on_the_wire(fake: FakeServer) -> None:
    schema = {
        "type": "object",
        "properties": {"echo": {"type": "string"}, "words": {"type": "integer", "minimum": 0}},
        "required": ["echo", "words"],
    }
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        as_json = await s.generate("give json", format="json")
        assert json.loads(as_json.text) == json.loads(expected_json("give json"))
        shaped = await s.chat("shaped", format=schema, history=False)
        assert json.loads(shaped.text) == {"echo": "shaped", "words": 1}
        sent = fake.received_of(Generate)
        assert sent[-2].format == "json" and sent[-1].format == schema


async def test_resume_in_the_middle_of_a_generation_with_calls_replays_exactly(fake: FakeServer) -> None:
    fake.kill_after_deltas = 1
    fake.piece_delay_s = 0.02
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        results = await asyncio.gather(
            s.generate("cut me", tools=[WEATHER, CLOCK]).collect(),
            s.generate("and me", tools=[CLOCK]).collect(),
        )
        assert s.reconnects == 1 and fake.ws_connections == 2
        assert [[(c.index, c.name) for c in r.tool_calls] for r in results] == [
            [(0, "get_weather"), (1, "clock")],
            [(0, "clock")],
        ]
        assert results[0].text == "".join(expected_text("cut me", 12).split(" ")[i] + " " for i in range(2))
        assert len(fake.received_of(Generate)) == 2


async def test_bad_tools_and_formats_are_refused_before_sending(fake: FakeServer) -> None:
    async with AsyncClient(fake.url, backoff=FAST) as client:
        s = await client.session()
        cases = [
            ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
            ({"tool_choice": "required"}, "tool_choice"),
            (
                {"tools": [WEATHER], "tool_choice": "get_weather"},
                "{'type': 'function', 'function': {'name': 'get_weather'}}",
            ),
            ({"tools": [WEATHER], "tool_choice": {"name": "get_weather"}}, "tool_choice.type"),
            (
                {
                    "tools": [
                        {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
                    ]
                },
                "parameters",
            ),
            ({"tools": [CLOCK, CLOCK]}, "clock"),
            ({"format": {"type": 12}}, "format"),
            ({"format": "yaml"}, "format"),
        ]
        for arguments, named in cases:
            with pytest.raises(SluiceError) as refused:
                s.generate("x", **arguments)  # type: ignore[arg-type]
            assert refused.value.code is ErrorCode.INVALID_MESSAGE and named in refused.value.message, (
                arguments
            )
        with pytest.raises(TypeError, match="list of tools"):
            s.generate("x", tools=WEATHER)  # type: ignore[arg-type]
        with pytest.raises(SluiceError, match="tool_calls"):
            s.generate(messages=[{"role": "user", "content": "x", "tool_calls": []}])
        assert fake.received_of(Generate) == []
        # The session goes on.
        assert (await s.generate("still here")).text == expected_text("still here", 12)


def test_sync_tool_calls_and_events(fake: FakeServer) -> None:
    with Client(fake.url, backoff=FAST) as client:
        s = client.session()
        stream = s.generate("sync tools", tools=(WEATHER,), tool_choice="required")
        items = list(stream.events())
        assert [type(item) for item in items] == [str, str, ToolCall]
        assert stream.tool_calls == items[2:]
        result = stream.result
        assert result is not None and result.finish_reason == "tool_calls"
        answer = s.chat("ok", history=False, tools=[WEATHER]).collect()
        assert answer.tool_calls[0].name == "get_weather"
        assert s.generate(
            "plain", options={"max_tokens": 2}, tools=[WEATHER], tool_choice="none"
        ).collect().text == (expected_text("plain", 2))
