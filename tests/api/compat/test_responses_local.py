"""The OpenAI Responses API against the embedded SmolLM2, through the real ``openai`` package: a
server of its own with local generation on and no Ollama. Whole, streamed and background
responses with ``text.format`` json_schema, each reply validated with ``jsonschema``."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.api.compat import test_structured_local as structured
from tests.api.compat.test_structured_local import CITY, LOCAL

pytestmark = [pytest.mark.models, pytest.mark.timeout(300)]

FORMAT: Any = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}


# The embedded model's server and its client, as the structured-output tests start them.
local_server = structured.local_server
client = structured.client


async def test_whole_json_schema_response(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(
        model=LOCAL, input="Describe a city as JSON.", text=FORMAT, max_output_tokens=200, temperature=0.0
    )
    assert response.status == "completed" and response.model == LOCAL
    jsonschema.validate(json.loads(response.output_text), CITY)
    assert response.usage is not None and response.usage.output_tokens > 0


async def test_streamed_json_schema_response(client: openai.AsyncOpenAI) -> None:
    stream = await client.responses.create(
        model=LOCAL, input="A city, as JSON.", text=FORMAT, max_output_tokens=200, stream=True
    )
    events = [event async for event in stream]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    jsonschema.validate(json.loads(text), CITY)
    assert events[-1].response.output_text == text


async def test_background_resumed_on_the_embedded_model(client: openai.AsyncOpenAI) -> None:
    created = await client.responses.create(
        model=LOCAL, input="A city, as JSON.", text=FORMAT, max_output_tokens=200, background=True
    )
    stream = await client.responses.retrieve(created.id, stream=True, starting_after=1)
    events = [event async for event in stream]
    assert events[0].sequence_number == 2 and events[-1].type == "response.completed"
    done = await client.responses.retrieve(created.id)  # settled before its last event
    assert done.status == "completed"
    jsonschema.validate(json.loads(done.output_text), CITY)
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == done.output_text
