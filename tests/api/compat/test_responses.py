"""The OpenAI Responses API, driven by the real ``openai`` SDK against a real server whose Ollama
is the emulator (deterministic text, tool calls and ``format`` instances; tests/support): whole and
streamed responses, the event sequence, chaining, the stored responses, tools, structured output,
refusals, and ownership of a stored response by its key (a server of its own, with keys)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from server.api.compat.responses_store import MemoryResponseStore, StoredResponse
from tests.api.compat.conftest import text_response_events, upstream_body
from tests.api.compat.test_openai_tools import CITY, PARAMETERS
from tests.api.conftest import MODEL, TOKENS, sluice
from tests.support.ollama_emulator import Emulator
from tests.support.ollama_replies import ReplyFault
from tests.support.server import ServerProcess

pytestmark = pytest.mark.timeout(120)

WEATHER: Any = {"type": "function", "name": "get_weather", "parameters": PARAMETERS, "strict": True}
KEY_A, KEY_B = "responses-key-a", "responses-key-b"


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def _roles(body: dict[str, Any]) -> list[str]:
    return [message["role"] for message in body["messages"]]


async def test_create_whole(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    response = await client.responses.create(model=MODEL, input="Say hello", instructions="Be brief")
    sent = upstream_body(replies)
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Say hello"},
    ]
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.model == MODEL
    assert response.output_text == replies.expected_text(sent)
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert response.usage is not None and response.usage.output_tokens == TOKENS
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens and usage.input_tokens > 0


async def test_streamed_event_sequence(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    stream = await client.responses.create(model=MODEL, input="Say hello", stream=True)
    events = [event async for event in stream]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")  # pieces may arrive merged
    assert deltas >= 1
    assert kinds == text_response_events(deltas)
    expected = replies.expected_text(upstream_body(replies))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == expected
    final = events[-1]
    assert final.type == "response.completed" and final.response.output_text == expected
    assert final.response.usage is not None and final.response.usage.output_tokens == TOKENS
    # The SDK's own accumulating helper checks every event against the state it builds.
    async with client.responses.stream(model=MODEL, input="Say hello") as helper:
        assert (await helper.get_final_response()).output_text == expected


async def test_cut_by_max_output_tokens_is_incomplete(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    whole = await client.responses.create(model=MODEL, input="Long story", max_output_tokens=5)
    assert whole.status == "incomplete" and whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens"
    assert upstream_body(replies)["options"]["num_predict"] == 5
    stream = await client.responses.create(model=MODEL, input="Long story", max_output_tokens=5, stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == replies.expected_text(upstream_body(replies))


async def test_chained_by_previous_response_id(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    first = await client.responses.create(model=MODEL, input="First question", instructions="Be brief")
    second = await client.responses.create(
        model=MODEL, input="Second question", previous_response_id=first.id, stream=True
    )
    events = [event async for event in second]
    sent = upstream_body(replies)
    # The stored conversation goes first; the first response's instructions do not carry over.
    assert sent["messages"] == [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Second question"},
    ]
    final = events[-1]
    assert final.type == "response.completed" and final.response.previous_response_id == first.id
    third = await client.responses.create(model=MODEL, input="Third", previous_response_id=final.response.id)
    assert _roles(upstream_body(replies)) == ["user", "assistant", "user", "assistant", "user"]
    assert third.output_text == replies.expected_text(upstream_body(replies))


async def test_retrieve_input_items_delete(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    items: Any = [
        {"role": "developer", "content": "Answer in French"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
    ]
    created = await client.responses.create(model=MODEL, input=items, metadata={"topic": "greeting"})
    fetched = await client.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    assert fetched.metadata == {"topic": "greeting"}
    listed = await client.responses.input_items.list(created.id, order="asc")
    assert [(item.type, getattr(item, "role", None)) for item in listed.data] == [
        ("message", "developer"),
        ("message", "user"),
    ]
    assert all(item.id for item in listed.data)
    newest = await client.responses.input_items.list(created.id, limit=1)
    assert [item.id for item in newest.data] == [listed.data[-1].id] and newest.has_more
    with pytest.raises(openai.BadRequestError) as resume:
        await client.responses.retrieve(created.id, stream=True)
    assert resume.value.param == "stream"  # only a background response can be streamed again
    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(created.id)


async def test_retrievable_while_streaming_and_cancelled_when_the_client_leaves(
    base_url: str, client: openai.AsyncOpenAI, paced: Callable[..., None]
) -> None:
    paced(token_rate=50.0, tokens=400)  # eight seconds of text: the client leaves long before
    body = {"model": MODEL, "input": "A long story", "stream": True}
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=30.0) as http,
        http.stream("POST", "/v1/responses", json=body) as answer,
    ):
        lines = answer.aiter_lines()
        created = None
        deltas = 0
        async for line in lines:
            if line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                created = created or event["response"]
                deltas += event["type"] == "response.output_text.delta"
                if deltas == 3:
                    break
        assert created is not None
        during = await client.responses.retrieve(created["id"])
        assert during.status == "in_progress"
    for _ in range(100):  # the server sees the disconnect within a moment
        after = await client.responses.retrieve(created["id"])
        if after.status != "in_progress":
            break
        await asyncio.sleep(0.05)
    assert after.status == "cancelled"
    (item,) = after.output
    assert item.type == "message" and item.status == "incomplete" and after.output_text


async def test_store_false_keeps_nothing(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    response = await client.responses.create(model=MODEL, input="Hello", store=False)
    assert response.output_text == replies.expected_text(upstream_body(replies))
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as chained:
        await client.responses.create(model=MODEL, input="Again", previous_response_id=response.id)
    assert chained.value.status_code == 400 and chained.value.param == "previous_response_id"


async def test_function_tool_round_trip(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    first = await client.responses.create(model=MODEL, input="Weather in Lima?", tools=[WEATHER])
    assert upstream_body(replies)["tools"][0]["function"]["name"] == "get_weather"
    calls = [item for item in first.output if item.type == "function_call"]
    (call,) = calls
    assert call.name == "get_weather" and call.call_id and call.id and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), PARAMETERS)
    result: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 19}'}]
    second = await client.responses.create(
        model=MODEL, input=result, previous_response_id=first.id, tools=[WEATHER]
    )
    sent = upstream_body(replies)
    assert _roles(sent) == ["user", "assistant", "tool"]
    assert sent["messages"][1]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": json.loads(call.arguments)}}
    ]
    assert sent["messages"][2]["content"] == '{"temp_c": 19}'
    assert second.status == "completed" and second.output_text == replies.expected_text(sent)
    assert [item.type for item in second.output] == ["message"]


async def test_function_call_streamed(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    stream = await client.responses.create(
        model=MODEL, input="Weather in Lima?", tools=[WEATHER], stream=True
    )
    events = [event async for event in stream]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    kinds = [event.type for event in events]
    call_at = kinds.index("response.function_call_arguments.delta")
    assert (
        kinds[call_at - 1] == "response.output_item.added"
        and kinds[call_at - 2] == "response.output_item.done"
    )
    assert kinds[call_at + 1 :] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = events[call_at + 1]
    assert done.type == "response.function_call_arguments.done"
    jsonschema.validate(json.loads(done.arguments), PARAMETERS)
    final = events[-1]
    assert final.type == "response.completed"
    assert [item.type for item in final.response.output] == ["message", "function_call"]
    assert final.response.output_text == replies.expected_text(upstream_body(replies))


async def test_a_failure_after_output_is_response_failed(
    client: openai.AsyncOpenAI, replies: Emulator
) -> None:
    replies.configure(reply_fault=ReplyFault.BAD_ARGUMENTS)  # calls that do not match a strict tool
    with pytest.raises(openai.APIStatusError) as whole:
        await client.responses.create(model=MODEL, input="Weather in Lima?", tools=[WEATHER])
    assert whole.value.status_code == 502 and whole.value.code == "upstream_error"
    stream = await client.responses.create(
        model=MODEL, input="Weather in Lima?", tools=[WEATHER], stream=True
    )
    events = [event async for event in stream]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1]
    assert final.type == "response.failed" and final.response.status == "failed"
    assert (
        final.response.error is not None and "does not match its parameters" in final.response.error.message
    )
    assert "response.function_call_arguments.delta" not in [event.type for event in events]
    assert (await client.responses.retrieve(final.response.id)).status == "failed"


async def test_json_schema_text_format(client: openai.AsyncOpenAI, replies: Emulator) -> None:
    text: Any = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}
    whole = await client.responses.create(model=MODEL, input="A city, as JSON", text=text)
    assert upstream_body(replies)["format"] == CITY
    jsonschema.validate(json.loads(whole.output_text), CITY)
    stream = await client.responses.create(model=MODEL, input="A city, as JSON", text=text, stream=True)
    pieces = [event.delta async for event in stream if event.type == "response.output_text.delta"]
    jsonschema.validate(json.loads("".join(pieces)), CITY)
    plain = await client.responses.create(model=MODEL, input="JSON", text={"format": {"type": "json_object"}})
    assert upstream_body(replies)["format"] == "json" and isinstance(json.loads(plain.output_text), dict)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"background": True, "store": False}, "store"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tool_choice": {"type": "file_search"}, "tools": [WEATHER]}, "tool_choice"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}
                ]
            },
            "input[0].content[0]",
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        (
            {"text": {"format": {"type": "json_schema", "name": "c", "schema": {"type": 5}}}},
            "text.format.schema",
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"tools": [{**WEATHER, "parameters": {"type": "string"}}]}, "tools[0].parameters"),
    ],
)
async def test_unsupported_features_are_refused_by_name(
    client: openai.AsyncOpenAI, fields: dict[str, Any], param: str
) -> None:
    body = {"input": "Hello", **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(model=MODEL, extra_body=body)
    assert refused.value.status_code == 400 and refused.value.param == param
    assert refused.value.type == "invalid_request_error"


async def test_wrong_types_are_400_unknown_fields_ignored(base_url: str, replies: Emulator) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:
        for body, param in (
            ({"model": MODEL, "input": 5}, "input"),
            ({"model": MODEL, "input": "x", "temperature": "hot"}, "temperature"),
            ({"model": MODEL, "input": "x", "tools": "all"}, "tools"),
        ):
            answer = await http.post("/v1/responses", json=body)
            error = answer.json()["error"]
            assert answer.status_code == 400 and error["param"] == param, answer.text
            assert set(error) == {"message", "type", "param", "code"}
        ignored = await http.post("/v1/responses", json={"model": MODEL, "input": "x", "not_a_field": [1]})
        assert ignored.status_code == 200 and ignored.json()["status"] == "completed"


@pytest.fixture(scope="module")
def keyed(emulator: Emulator) -> Iterator[ServerProcess]:
    with sluice({"SLUICE_OLLAMA_URLS": emulator.url, "SLUICE_API_KEYS": f"{KEY_A},{KEY_B}"}) as process:
        yield process


async def test_a_stored_response_belongs_to_its_key(keyed: ServerProcess) -> None:
    base = f"{keyed.url}/v1"
    async with (
        openai.AsyncOpenAI(base_url=base, api_key=KEY_A, max_retries=0) as owner,
        openai.AsyncOpenAI(base_url=base, api_key=KEY_B, max_retries=0) as other,
    ):
        created = await owner.responses.create(model=MODEL, input="Mine")
        assert (await owner.responses.retrieve(created.id)).id == created.id
        with pytest.raises(openai.NotFoundError):
            await other.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.input_items.list(created.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.delete(created.id)
        with pytest.raises(openai.BadRequestError):
            await other.responses.create(model=MODEL, input="Yours?", previous_response_id=created.id)
        assert (await owner.responses.retrieve(created.id)).output_text == created.output_text


async def test_store_expires_and_is_bounded() -> None:
    now = [0.0]
    store = MemoryResponseStore(ttl_s=10, max_count=2, clock=lambda: now[0])
    for name in ("a", "b", "c"):
        await store.put(name, StoredResponse(owner="k", response={"id": name}, input_items=[]))
    assert await store.get("a", "k") is None and len(store) == 2  # the oldest went past max_count
    assert await store.get("b", "other") is None and not await store.delete("b", "other")
    now[0] = 9.0
    await store.put("c", StoredResponse(owner="k", response={"id": "c"}, input_items=[]))  # written again
    now[0] = 10.5
    assert await store.get("b", "k") is None and await store.get("c", "k") is not None
    now[0] = 19.5
    assert len(store) == 0
