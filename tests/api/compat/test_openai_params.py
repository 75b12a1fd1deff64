"""The OpenAI-compatible API's parameter audit: what sluice cannot honour is a 400 naming the
parameter in OpenAI's error shape (``param``), never silently ignored; neutral values pass."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from tests.api.conftest import MODEL
from tests.support.ollama_emulator import Emulator

pytestmark = pytest.mark.timeout(120)

USER = [{"role": "user", "content": "hello"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as raw:
        yield raw


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1.0}, "frequency_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"store": True}, "store"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"functions": [WEATHER["function"]]}, "functions"),
        ({"no_such_parameter": 1}, "no_such_parameter"),
        (
            {"stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
        ),
        ({"stream": True, "stream_options": {"include_usage": True, "bogus": 1}}, "stream_options.bogus"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
        ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice"),
    ],
)
async def test_unsupported_parameters_are_400_naming_them(
    client: openai.AsyncOpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model=MODEL, messages=USER, extra_body=extra)  # type: ignore[arg-type]
    assert refused.value.param == param and refused.value.code == "invalid_request"
    body = refused.value.body
    assert isinstance(body, dict) and body["message"].startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # An invalid JSON Schema, in OpenAI's name for the place it came from.
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "response_format.json_schema.schema",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages[0].tool_call_id"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": "hi", "name": "alice"}]}, "messages[0].name"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[1]"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
async def test_bad_tools_and_formats_are_400_naming_the_field(
    http: httpx.AsyncClient, emulator: Emulator, body: dict[str, Any], param: str
) -> None:
    emulator.reset()
    response = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER} | body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request" and param in error["message"]
    assert emulator.generations() == []  # refused before anything went upstream


async def test_neutral_values_and_identifiers_are_accepted(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=False,
        presence_penalty=0,
        frequency_penalty=0.0,
        store=False,
        service_tier="auto",
        user="someone",
        safety_identifier="hashed-id",
        response_format={"type": "text"},
        extra_body={"modalities": ["text"]},
    )
    assert completion.choices[0].finish_reason == "length"


async def test_embeddings_refuse_unknown_parameters(http: httpx.AsyncClient) -> None:
    ok = await http.post("/v1/embeddings", json={"input": "x", "user": "someone"})
    assert ok.status_code == 200
    refused = await http.post("/v1/embeddings", json={"input": "x", "truncate": True})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "truncate"
