"""Tools and ``format`` over the Ollama-compatible API, driven by the official ``ollama`` package
against a real server whose Ollama is the emulator; every structured reply validated with
``jsonschema``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import ollama
import pytest

from tests.api.compat.conftest import upstream_body
from tests.api.conftest import MODEL
from tests.support.ollama_emulator import Emulator

pytestmark = pytest.mark.timeout(120)

PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
WEATHER: Any = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS},
}
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "population": {"type": "integer", "minimum": 1},
        "districts": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "coastal": {"type": "boolean"},
    },
    "required": ["name", "population", "districts", "coastal"],
}
ASK: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[ollama.AsyncClient]:
    yield ollama.AsyncClient(host=base_url)


async def test_chat_tool_call(client: ollama.AsyncClient, replies: Emulator) -> None:
    reply = await client.chat(model=MODEL, messages=ASK, tools=[WEATHER])
    assert reply.done_reason == "stop"  # Ollama says stop after calls too
    (call,) = reply.message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(dict(call.function.arguments), PARAMETERS)
    assert reply.message.content == replies.expected_text(upstream_body(replies))


async def test_chat_tool_calls_streamed_one_chunk_each(client: ollama.AsyncClient, replies: Emulator) -> None:
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    replies.configure(tool_calls=2)
    parts = [
        part
        async for part in await client.chat(model=MODEL, messages=ASK, tools=[WEATHER, clock], stream=True)
    ]
    with_calls = [part.message.tool_calls for part in parts if part.message.tool_calls]
    assert [[call.function.name for call in calls] for calls in with_calls] == [["get_weather"], ["get_time"]]
    assert parts[-1].done and parts[-1].done_reason == "stop"
    async with httpx.AsyncClient(base_url=str(client._client.base_url)) as http:
        raw = await http.post(
            "/api/chat", json={"model": MODEL, "messages": ASK, "tools": [WEATHER], "stream": False}
        )
    made = raw.json()["message"]["tool_calls"]
    assert made[0]["id"].startswith("call_") and made[0]["function"]["index"] == 0
    assert isinstance(made[0]["function"]["arguments"], dict)


async def test_tool_result_round_trip(client: ollama.AsyncClient, replies: Emulator) -> None:
    first = await client.chat(model=MODEL, messages=ASK, tools=[WEATHER])
    (call,) = first.message.tool_calls or []
    messages = [*ASK, first.message, {"role": "tool", "content": "7 degrees", "tool_name": "get_weather"}]
    second = await client.chat(model=MODEL, messages=messages, tools=[WEATHER])
    assert not second.message.tool_calls and second.message.content
    history = upstream_body(replies)["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    assert history[1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": dict(call.function.arguments),
    }
    assert history[2] == {"role": "tool", "content": "7 degrees", "tool_name": "get_weather"}


async def test_format_schema_and_json(client: ollama.AsyncClient, replies: Emulator) -> None:
    chat = await client.chat(model=MODEL, messages=[{"role": "user", "content": "a city"}], format=CITY)
    assert upstream_body(replies)["format"] == CITY
    jsonschema.validate(json.loads(chat.message.content or ""), CITY)
    parts = [p async for p in await client.generate(model=MODEL, prompt="a city", format=CITY, stream=True)]
    jsonschema.validate(json.loads("".join(p.response for p in parts)), CITY)
    anything = await client.generate(model=MODEL, prompt="some json", format="json")
    assert upstream_body(replies)["format"] == "json"
    assert isinstance(json.loads(anything.response), dict)


async def test_generate_with_tools_answers_top_level_calls(base_url: str, replies: Emulator) -> None:
    async with httpx.AsyncClient(base_url=base_url) as http:
        body = {"model": MODEL, "prompt": "Weather in Oslo?", "tools": [WEATHER], "stream": False}
        reply = (await http.post("/api/generate", json=body)).json()
    assert replies.generations()[-1].path == "/api/chat"  # Ollama's generate has no tools
    (call,) = reply["tool_calls"]
    assert call["function"]["name"] == "get_weather" and reply["done_reason"] == "stop"
    jsonschema.validate(call["function"]["arguments"], PARAMETERS)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/chat", {"messages": ASK, "format": "yaml"}, "format"),
        ("/api/chat", {"messages": ASK, "think": True}, "think"),
        ("/api/generate", {"prompt": "x", "raw": True}, "raw"),
        ("/api/generate", {"prompt": "x", "context": [1, 2]}, "context"),
        ("/api/generate", {"prompt": "x", "template": "{{ .Prompt }}"}, "template"),
        ("/api/chat", {"messages": ASK, "logprobs": True}, "logprobs"),
        ("/api/chat", {"messages": ASK, "format": {"type": "nonsense"}}, "format"),
        (
            "/api/chat",
            {
                "messages": ASK,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            },
            "tools[0].function.parameters",
        ),
    ],
)
async def test_refusals_are_400_naming_the_field(
    base_url: str, replies: Emulator, path: str, body: dict[str, Any], field: str
) -> None:
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.post(path, json={"model": MODEL} | body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(field)
    assert replies.generations() == []
