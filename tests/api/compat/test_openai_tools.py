"""Tools and structured outputs over the OpenAI-compatible API, driven by the real ``openai`` SDK
against a real server whose Ollama is the emulator (which calls the offered tools and answers a
``format`` with an instance of it: tests/support/ollama_replies.py). Every structured reply is
validated with ``jsonschema``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.api.compat.conftest import upstream_body
from tests.api.conftest import MODEL
from tests.support.ollama_emulator import Emulator
from tests.support.ollama_replies import ReplyFault

pytestmark = pytest.mark.timeout(120)

PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
WEATHER: Any = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS},
}
CLOCK: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2},
        "population": {"type": "integer", "minimum": 1000},
        "coastal": {"type": "boolean"},
        "area_km2": {"type": "number"},
        "districts": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4},
        "mayor": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    },
    "required": ["name", "population", "coastal", "area_km2", "districts", "mayor"],
}
USER: list[Any] = [{"role": "user", "content": "What is the weather in Lima?"}]


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


async def test_tool_call_whole(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    completion = await client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    sent = upstream_body(replies)
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert choice.message.content == replies.expected_text(sent)  # the text before the call
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)


async def test_tool_call_streamed_as_openai_deltas(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    replies.configure(tool_calls=2)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=[WEATHER, CLOCK],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    pieces = [delta.tool_calls for delta in deltas if delta.tool_calls]
    assert len(pieces) == 4 and all(len(piece) == 1 for piece in pieces)
    opened, filled = [piece[0] for piece in pieces[0::2]], [piece[0] for piece in pieces[1::2]]
    assert [item.index for item in opened] == [0, 1] and [item.index for item in filled] == [0, 1]
    for item in opened:
        assert item.id is not None and item.id.startswith("call_") and item.type == "function"
        assert item.function is not None and item.function.arguments == ""
    assert [item.function.name for item in opened if item.function] == ["get_weather", "get_time"]
    assert all(item.id is None and item.function and item.function.name is None for item in filled)
    arguments = [json.loads(item.function.arguments or "") for item in filled if item.function]
    jsonschema.validate(arguments[0], PARAMETERS)
    jsonschema.validate(arguments[1], CLOCK["function"]["parameters"])
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"] and chunks[-1].usage is not None
    text = "".join(delta.content or "" for delta in deltas)
    assert text == replies.expected_text(upstream_body(replies))


async def test_tool_result_round_trip(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    messages: list[Any] = list(USER)
    first = await client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assistant = first.choices[0].message
    (call,) = assistant.tool_calls or []
    # The SDK's own message object goes back as it came, then the tool's result naming the call.
    messages += [assistant, {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 19}'}]
    second = await client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.tool_calls is None
    sent = upstream_body(replies)
    assert second.choices[0].message.content == replies.expected_text(sent)
    history = sent["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    assert history[1]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": json.loads(call.function.arguments)}}
    ]
    assert history[2]["content"] == '{"temp_c": 19}' and history[2]["tool_name"] == "get_weather"


async def test_parallel_tool_calls_false_keeps_the_first(
    client: openai.AsyncOpenAI, replies: Emulator
) -> None:
    replies.configure(tool_calls=2)
    whole = await client.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER, CLOCK], parallel_tool_calls=False
    )
    assert [call.function.name for call in whole.choices[0].message.tool_calls or []] == ["get_weather"]
    stream = await client.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER, CLOCK], parallel_tool_calls=False, stream=True
    )
    named = [
        item.function.name
        async for chunk in stream
        if chunk.choices
        for item in chunk.choices[0].delta.tool_calls or []
        if item.function and item.function.name
    ]
    assert named == ["get_weather"]


async def test_tool_choice_none_offers_no_tools(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    completion = await client.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER], tool_choice="none", max_tokens=5
    )
    assert (
        completion.choices[0].finish_reason == "length" and completion.choices[0].message.tool_calls is None
    )
    assert "tools" not in upstream_body(replies)


async def test_strict_tool_with_arguments_that_do_not_match_fails(
    client: openai.AsyncOpenAI, replies: Emulator
) -> None:
    replies.configure(reply_fault=ReplyFault.BAD_ARGUMENTS)
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    with pytest.raises(openai.APIStatusError) as failed:
        await client.chat.completions.create(model=MODEL, messages=USER, tools=[strict])
    assert failed.value.status_code == 502 and failed.value.code == "upstream_error"
    assert "get_weather" in failed.value.message
    stream = await client.chat.completions.create(model=MODEL, messages=USER, tools=[strict], stream=True)
    with pytest.raises(openai.APIError) as midstream:
        async for chunk in stream:
            assert not (chunk.choices and chunk.choices[0].delta.tool_calls)  # the bad call never shows
    assert "does not match its parameters" in midstream.value.message


async def test_json_schema_whole_and_streamed(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": CITY, "strict": True},
    }
    messages: list[Any] = [{"role": "user", "content": "A city, as JSON"}]
    whole = await client.chat.completions.create(
        model=MODEL, messages=messages, response_format=response_format
    )
    assert upstream_body(replies)["format"] == CITY
    jsonschema.validate(json.loads(whole.choices[0].message.content or ""), CITY)
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, response_format=response_format, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    jsonschema.validate(json.loads(text), CITY)


async def test_json_object(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"},
    )
    assert upstream_body(replies)["format"] == "json"
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


@pytest.mark.parametrize(
    ("fault", "fields"),
    [
        (ReplyFault.NO_CALL, {"tools": [WEATHER], "tool_choice": "required"}),
        (
            ReplyFault.NOT_JSON,
            {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}},
        ),
    ],
)
async def test_an_upstream_reply_that_breaks_the_guarantee_fails_typed(
    client: openai.AsyncOpenAI, replies: Emulator, fault: ReplyFault, fields: dict[str, Any]
) -> None:
    replies.configure(reply_fault=fault)
    with pytest.raises(openai.APIStatusError) as failed:
        await client.chat.completions.create(model=MODEL, messages=USER, **fields)
    assert failed.value.status_code == 502 and failed.value.code == "upstream_error"
