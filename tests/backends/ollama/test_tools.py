"""The Ollama backend with tools and format, end to end: real httpx against the emulator.

What is sent (the emulator records each body), what comes back (text, then one `ToolCall` per
call Ollama streams, then ``finish_reason: "tool_calls"``), and the guarantees sluice keeps when
Ollama does not (a required call missing, an unknown tool, arguments that do not fit, text that
is not the JSON the format asked for): each ends with a typed ``upstream_error``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import jsonschema
import pytest

from protocol.errors import ErrorCode, SluiceError
from server.backends.base import (
    GenerationItem,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    Tool,
    ToolCall,
    ToolChoice,
    Turn,
)
from server.backends.ollama.backend import OllamaBackend
from server.backends.ollama.checks import ReplyCheck
from server.settings import Settings
from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.ollama_replies import ReplyFault, instance_of

pytestmark = pytest.mark.timeout(60)

MODEL = "llama3.2:1b"
WEATHER = Tool(
    "get_weather",
    "weather of a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "minLength": 2}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
    },
)
CLOCK = Tool("now")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 18},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
}


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with start_emulator(token_rate=0, tokens=8) as emulator:
        yield emulator


@pytest.fixture
async def backend(emu: Emulator) -> AsyncIterator[OllamaBackend]:
    settings = Settings(
        ollama_urls=[emu.url], ollama_connect_timeout_s=2.0, ollama_first_token_timeout_s=10.0
    )
    ollama = OllamaBackend(settings)
    yield ollama
    await ollama.aclose()


async def items(ollama: OllamaBackend, request: GenerationRequest) -> list[GenerationItem]:
    return [item async for item in ollama.generate(request)]


async def broken(
    ollama: OllamaBackend, request: GenerationRequest
) -> tuple[list[GenerationItem], SluiceError]:
    got: list[GenerationItem] = []
    with pytest.raises(SluiceError) as caught:
        async for item in ollama.generate(request):
            got.append(item)
    assert caught.value.code is ErrorCode.UPSTREAM_ERROR
    assert not any(isinstance(item, GenerationResult) for item in got)
    return got, caught.value


async def test_a_prompt_with_tools_streams_text_then_each_call_then_tool_calls(
    emu: Emulator, backend: OllamaBackend
) -> None:
    emu.configure(tool_calls=2)
    got = await items(backend, GenerationRequest(MODEL, prompt="weather and time?", tools=(WEATHER, CLOCK)))
    texts = [item for item in got if isinstance(item, str)]
    calls = [item for item in got if isinstance(item, ToolCall)]
    assert texts and all(isinstance(item, str) for item in got[: len(texts)])  # text comes first
    assert got[len(texts) : len(texts) + 2] == calls
    assert [(c.name, json.loads(c.arguments), c.id) for c in calls] == [
        ("get_weather", instance_of(WEATHER.parameters), None),
        ("now", {}, None),
    ]
    result = got[-1]
    assert isinstance(result, GenerationResult) and result.finish_reason == "tool_calls"
    (record,) = emu.generations()
    assert record.path == "/api/chat"
    assert [t["function"]["name"] for t in record.body["tools"]] == ["get_weather", "now"]
    assert record.body["messages"] == [{"role": "user", "content": "weather and time?"}]


async def test_a_tool_round_trip_sends_the_calls_and_results_back(
    emu: Emulator, backend: OllamaBackend
) -> None:
    turns = (
        Turn("user", "weather?"),
        Turn(
            "assistant", "", tool_calls=(ToolCall("get_weather", '{"city":"Oslo","unit":"C"}', id="call_9"),)
        ),
        Turn("tool", '{"temp": 7}', tool_call_id="call_9"),
    )
    got = await items(backend, GenerationRequest(MODEL, messages=turns, tools=(WEATHER,)))
    assert not any(isinstance(item, ToolCall) for item in got)  # after a result, the model talks
    result = got[-1]
    assert isinstance(result, GenerationResult) and result.finish_reason == "stop"
    sent = emu.generations()[0].body["messages"]
    assert sent[1]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}}
    ]
    assert sent[2] == {"role": "tool", "content": '{"temp": 7}', "tool_name": "get_weather"}


@pytest.mark.parametrize("chat", [False, True])
async def test_format_schema_is_passed_and_the_reply_is_an_instance(
    emu: Emulator, backend: OllamaBackend, chat: bool
) -> None:
    request = (
        GenerationRequest(MODEL, messages=(Turn("user", "a person"),), format=SCHEMA)
        if chat
        else GenerationRequest(MODEL, prompt="a person", format=SCHEMA)
    )
    got = await items(backend, request)
    text = "".join(item for item in got if isinstance(item, str))
    jsonschema.validate(json.loads(text), SCHEMA)
    (record,) = emu.generations()
    assert len(record.planned) > 1 and "".join(record.planned) == text  # streamed in pieces
    assert record.body["format"] == SCHEMA
    assert record.path == ("/api/chat" if chat else "/api/generate")


async def test_format_json_is_passed_as_the_string(emu: Emulator, backend: OllamaBackend) -> None:
    got = await items(backend, GenerationRequest(MODEL, prompt="p", format="json"))
    assert isinstance(json.loads("".join(item for item in got if isinstance(item, str))), dict)
    assert emu.generations()[0].body["format"] == "json"


async def test_a_named_choice_shows_only_that_tool_and_gets_its_call(
    emu: Emulator, backend: OllamaBackend
) -> None:
    request = GenerationRequest(
        MODEL, prompt="p", tools=(WEATHER, CLOCK), tool_choice=ToolChoice("required", "now")
    )
    got = await items(backend, request)
    assert [item.name for item in got if isinstance(item, ToolCall)] == ["now"]
    assert [t["function"]["name"] for t in emu.generations()[0].body["tools"]] == ["now"]


async def test_required_arguments_are_checked_against_the_parameters(
    emu: Emulator, backend: OllamaBackend
) -> None:
    request = GenerationRequest(MODEL, prompt="p", tools=(WEATHER,), tool_choice=ToolChoice("required"))
    got = await items(backend, request)
    (call,) = [item for item in got if isinstance(item, ToolCall)]
    jsonschema.validate(json.loads(call.arguments), WEATHER.parameters)
    emu.configure(reply_fault=ReplyFault.BAD_ARGUMENTS)
    _, error = await broken(backend, request)
    assert "do not match its parameters" in error.message and "'city' is a required property" in error.message
    # Under "auto" the model's arguments are its own business: passed on as they came.
    auto = await items(backend, GenerationRequest(MODEL, prompt="p", tools=(WEATHER,)))
    assert [json.loads(item.arguments) for item in auto if isinstance(item, ToolCall)] == [{}]


async def test_a_required_call_that_never_comes_is_an_error(emu: Emulator, backend: OllamaBackend) -> None:
    emu.configure(reply_fault=ReplyFault.NO_CALL)
    request = GenerationRequest(MODEL, prompt="p", tools=(WEATHER,), tool_choice=ToolChoice("required"))
    got, error = await broken(backend, request)
    assert got and all(isinstance(item, str) for item in got)  # the text came, the done did not
    assert "answered without one" in error.message
    # "auto" lets the model answer in text.
    auto = await items(backend, GenerationRequest(MODEL, prompt="p", tools=(WEATHER,)))
    assert isinstance(auto[-1], GenerationResult) and auto[-1].finish_reason == "stop"


async def test_a_call_of_a_tool_nobody_offered_is_an_error(emu: Emulator, backend: OllamaBackend) -> None:
    emu.configure(reply_fault=ReplyFault.UNKNOWN_TOOL)
    _, error = await broken(backend, GenerationRequest(MODEL, prompt="p", tools=(WEATHER,)))
    assert "'not_offered', which is not an offered tool ('get_weather')" in error.message


async def test_a_reply_that_is_not_the_json_asked_for_is_an_error(
    emu: Emulator, backend: OllamaBackend
) -> None:
    emu.configure(reply_fault=ReplyFault.NOT_JSON)
    _, error = await broken(backend, GenerationRequest(MODEL, prompt="p", format="json"))
    assert "not JSON" in error.message
    emu.configure(reply_fault=ReplyFault.NONE)
    # Valid JSON that is not an instance of the schema: the emulator answers {} for this one.
    strict = {"type": "object", "properties": {}, "required": ["x"]}
    _, error = await broken(backend, GenerationRequest(MODEL, prompt="p", format=strict))
    assert (
        "does not match the format schema" in error.message and "'x' is a required property" in error.message
    )


async def test_a_reply_cut_by_max_tokens_ends_length_unchecked(emu: Emulator, backend: OllamaBackend) -> None:
    request = GenerationRequest(MODEL, prompt="p", format=SCHEMA, options=SamplingOptions(max_tokens=2))
    got = await items(backend, request)
    (record,) = emu.generations()
    assert len(record.planned) == 2
    assert "".join(item for item in got if isinstance(item, str)) == "".join(record.planned)  # not JSON yet
    assert isinstance(got[-1], GenerationResult) and got[-1].finish_reason == "length"


async def test_tool_choice_none_sends_no_tools_and_gets_text(emu: Emulator, backend: OllamaBackend) -> None:
    got = await items(
        backend, GenerationRequest(MODEL, prompt="p", tools=(WEATHER,), tool_choice=ToolChoice("none"))
    )
    assert not any(isinstance(item, ToolCall) for item in got)
    (record,) = emu.generations()
    assert record.path == "/api/generate" and "tools" not in record.body


def test_reply_check_follows_local_references() -> None:
    schema = {
        "$defs": {"item": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
        "type": "array",
        "items": {"$ref": "#/$defs/item"},
    }
    done = GenerationResult(finish_reason="stop", prompt_tokens=1, completion_tokens=1)
    good = ReplyCheck(GenerationRequest(MODEL, prompt="p", format=schema))
    good.text('[{"n": 1}, ')
    good.text('{"n": 2}]')
    assert good.finish(done) == done
    bad = ReplyCheck(GenerationRequest(MODEL, prompt="p", format=schema))
    bad.text('[{"n": "one"}]')
    with pytest.raises(SluiceError, match="'one' is not of type 'integer' at '0/n'"):
        bad.finish(done)
