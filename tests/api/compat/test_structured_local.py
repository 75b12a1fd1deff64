"""Structured outputs and a forced tool call from the embedded SmolLM2, through the real ``openai``
and ``ollama`` packages: a server of its own with local generation on and no Ollama. Every reply
is validated with ``jsonschema`` against what was asked."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import jsonschema
import ollama
import openai
import pytest

from tests.api.conftest import sluice
from tests.support.server import ServerProcess

pytestmark = [pytest.mark.models, pytest.mark.timeout(300)]

LOCAL = "smollm2:135m"
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "enum": ["France", "Japan", "Peru"]},
        "population": {"type": "integer", "minimum": 0},
        "coastal": {"type": "boolean"},
        "districts": {
            "type": "array",
            "items": {"type": "string", "maxLength": 20},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "country", "population", "coastal", "districts"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def local_server() -> Iterator[ServerProcess]:
    with sluice({"SLUICE_LOAD_LOCAL_GENERATION": "true", "SLUICE_OLLAMA_URLS": ""}) as process:
        yield process


@pytest.fixture
async def client(local_server: ServerProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{local_server.url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


async def test_json_schema_reply_is_an_instance(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=LOCAL,
        messages=[{"role": "user", "content": "Describe a city as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": CITY, "strict": True},
        },
        max_tokens=200,
        temperature=0.0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is not None
    jsonschema.validate(json.loads(choice.message.content), CITY)


async def test_json_schema_streamed(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=LOCAL,
        messages=[{"role": "user", "content": "A city, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
        max_tokens=200,
        stream=True,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    jsonschema.validate(json.loads(text), CITY)


async def test_forced_tool_call_matches_its_parameters(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=LOCAL,
        messages=[{"role": "user", "content": "What is the weather in Lima?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) >= 1 and calls[0].type == "function"
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]


async def test_ollama_show_describes_the_embedded_generator(local_server: ServerProcess) -> None:
    shown = await ollama.AsyncClient(host=local_server.url).show(LOCAL)
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 2048
    running = {entry.model for entry in (await ollama.AsyncClient(host=local_server.url).ps()).models}
    assert {LOCAL, "all-MiniLM-L6-v2"} <= running


@pytest.mark.parametrize("stream", [False, True])
async def test_a_keyword_the_model_cannot_enforce_is_a_400(client: openai.AsyncOpenAI, stream: bool) -> None:
    unique = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model=LOCAL,
            messages=[{"role": "user", "content": "numbers"}],
            response_format={"type": "json_schema", "json_schema": {"name": "numbers", "schema": unique}},
            stream=stream,
        )
    assert refused.value.code == "invalid_request" and "uniqueItems" in refused.value.message
