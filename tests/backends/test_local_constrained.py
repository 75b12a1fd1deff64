"""Constrained decoding on the real SmolLM2-135M-Instruct: ``format`` schemas and tool calls.

Every reply under a schema is validated with `jsonschema`; tool calls against their tool's
``parameters``. Replies are short (bounded schemas, max_tokens <= 160): this CPU decodes ~5-20
tokens/s under load.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest
import torch

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
from server.backends.local import LocalGenerator
from server.backends.local_model import DEFAULT_SYSTEM
from server.settings import Settings

pytestmark = [pytest.mark.models, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def local() -> Iterator[LocalGenerator]:
    threads = torch.get_num_threads()  # load() sets it process-wide; other test modules keep theirs
    generator = LocalGenerator.load(Settings(ollama_urls=[]))
    yield generator
    generator.close()
    torch.set_num_threads(threads)


def ask(
    prompt: str | None = None, *, messages: tuple[Turn, ...] | None = None, **fields: Any
) -> GenerationRequest:
    options = {"temperature": 0.0, "max_tokens": 96, **fields.pop("options", {})}
    return GenerationRequest(
        model="smollm2:135m", prompt=prompt, messages=messages, options=SamplingOptions(**options), **fields
    )


async def run(
    gen: LocalGenerator, request: GenerationRequest
) -> tuple[str, list[ToolCall], GenerationResult]:
    items: list[GenerationItem] = [item async for item in gen.generate(request)]
    result = items[-1]
    assert isinstance(result, GenerationResult)
    assert all(not isinstance(item, GenerationResult) for item in items[:-1])
    text = "".join(item for item in items if isinstance(item, str))
    return text, [item for item in items if isinstance(item, ToolCall)], result


async def eventually(condition: Callable[[], bool], timeout_s: float = 120.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


NAME = {"type": "string", "minLength": 1, "maxLength": 20}
SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "nested object": (
        "Describe a person who lives in Paris as JSON.",
        {
            "type": "object",
            "properties": {
                "name": NAME,
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "address": {
                    "type": "object",
                    "properties": {"city": NAME, "country": NAME},
                    "required": ["city", "country"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "age", "address"],
            "additionalProperties": False,
        },
    ),
    "enum and boolean": (
        "Is the sky blue? Answer with a color and whether it is true.",
        {
            "type": "object",
            "properties": {"color": {"enum": ["red", "green", "blue"]}, "true": {"type": "boolean"}},
            "required": ["color", "true"],
        },
    ),
    "bounded array of integers": (
        "List some prime numbers.",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 1000},
            "minItems": 2,
            "maxItems": 4,
        },
    ),
    "numbers": (
        "Give the latitude and longitude of Paris.",
        {
            "type": "object",
            "properties": {
                "latitude": {"type": "number", "minimum": -90, "maximum": 90},
                "longitude": {"type": "number", "minimum": -180, "maximum": 180},
            },
            "required": ["latitude", "longitude"],
            "additionalProperties": False,
        },
    ),
    "array of objects": (
        "List two fruits with their colors.",
        {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"fruit": NAME, "color": {"enum": ["red", "yellow", "green", "orange"]}},
                "required": ["fruit", "color"],
                "additionalProperties": False,
            },
        },
    ),
}


@pytest.mark.parametrize("case", list(SCHEMAS))
async def test_every_reply_is_an_instance_of_the_schema(local: LocalGenerator, case: str) -> None:
    prompt, schema = SCHEMAS[case]
    # Room for the longest instance these bounded schemas allow, so every reply can complete.
    requests = [ask(prompt, format=schema, options={"max_tokens": 160})] + [
        ask(prompt, format=schema, options={"temperature": 0.8, "seed": seed, "max_tokens": 160})
        for seed in (1, 2)
    ]
    for text, calls, result in await asyncio.gather(*(run(local, r) for r in requests)):
        print(case, repr(text))
        assert result.finish_reason == "stop" and not calls
        jsonschema.validate(json.loads(text), schema)


async def test_format_json_is_a_json_object(local: LocalGenerator) -> None:
    text, _, result = await run(
        local, ask('Reply in JSON with the keys "name" and "age": Alice is 30.', format="json")
    )
    print(repr(text))
    assert result.finish_reason == "stop"
    assert isinstance(json.loads(text), dict)


WEATHER = Tool(
    "get_weather",
    "Get the current weather in a city",
    {
        "type": "object",
        "properties": {"city": NAME, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
)
TIME = Tool(
    "get_time",
    "Get the current time in a time zone",
    {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}}, "required": ["zone"]},
)


@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("required", "get_time")])
async def test_a_forced_call_is_valid_against_its_parameters(
    local: LocalGenerator, choice: ToolChoice
) -> None:
    tools = {tool.name: tool for tool in (WEATHER, TIME)}
    text, calls, result = await run(
        local, ask("What's the weather in Oslo?", tools=(WEATHER, TIME), tool_choice=choice)
    )
    print(calls)
    assert (text, result.finish_reason) == ("", "tool_calls")
    assert calls and all(call.id is None for call in calls)
    for call in calls:
        assert call.name == (choice.name or call.name) and call.name in tools
        jsonschema.validate(json.loads(call.arguments), tools[call.name].parameters or {})


# One earlier exchange shows the model the call syntax (the 135M model rarely calls zero-shot).
SHOT = (
    Turn("user", "What's the weather in Paris?"),
    Turn(
        "assistant", "", tool_calls=(ToolCall("get_weather", '{"city": "Paris", "unit": "celsius"}', "c1"),)
    ),
    Turn("tool", '{"temperature": 18, "sky": "clear"}', tool_call_id="c1"),
    Turn("assistant", "It is 18 °C and clear in Paris."),
)


async def test_auto_lets_the_model_call_or_answer_in_text(local: LocalGenerator) -> None:
    (call_text, calls, called), (answer, none, answered) = await asyncio.gather(
        run(local, ask(messages=(*SHOT, Turn("user", "What's the weather in Oslo?")), tools=(WEATHER,))),
        run(local, ask(messages=(*SHOT, Turn("user", "What is the capital of France?")), tools=(WEATHER,))),
    )
    print(calls, repr(answer))
    assert (call_text, called.finish_reason) == ("", "tool_calls")
    assert [call.name for call in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER.parameters or {})
    assert "Oslo" in calls[0].arguments
    assert not none and answered.finish_reason == "stop" and "Paris" in answer


async def test_a_tool_result_round_trip_answers_from_the_result(local: LocalGenerator) -> None:
    messages = (
        Turn("user", "What's the weather in Oslo?"),
        Turn(
            "assistant",
            "",
            tool_calls=(ToolCall("get_weather", '{"city": "Oslo", "unit": "celsius"}', "c9"),),
        ),
        Turn("tool", '{"temperature": -3, "sky": "snow"}', tool_call_id="c9"),
    )
    text, calls, result = await run(local, ask(messages=messages, tools=(WEATHER,)))
    print(repr(text))
    assert not calls and result.finish_reason in ("stop", "length")
    assert "-3" in text or "snow" in text.lower()


async def test_tool_choice_none_is_plain_text(local: LocalGenerator) -> None:
    question = "What is the capital of France?"
    plain, offered_none = await asyncio.gather(
        run(local, ask(question)), run(local, ask(question, tools=(WEATHER,), tool_choice=ToolChoice("none")))
    )
    assert offered_none[:2] == plain[:2] and "Paris" in plain[0]


async def test_an_unconstrained_row_in_a_batch_is_unaffected(local: LocalGenerator) -> None:
    prompt, schema = SCHEMAS["nested object"]
    free = ask("Write a haiku about the sea.", options={"max_tokens": 32})
    forced = ask("What's the weather in Oslo?", tools=(WEATHER,), tool_choice=ToolChoice("required"))
    solo = [await run(local, r) for r in (free, ask(prompt, format=schema), forced)]
    together = await asyncio.gather(
        run(local, free), run(local, ask(prompt, format=schema)), run(local, forced)
    )
    assert [(t, c, r.finish_reason) for t, c, r in together] == [(t, c, r.finish_reason) for t, c, r in solo]
    assert together[0][0] and together[0][2].completion_tokens == solo[0][2].completion_tokens


async def test_cancel_stops_a_constrained_generation_within_one_token(local: LocalGenerator) -> None:
    schema = {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 30}
    stream = local.generate(
        ask("List every country in the world.", format=schema, options={"max_tokens": 300})
    )
    for _ in range(3):
        assert isinstance(await anext(stream), str)
    await stream.aclose()
    after_cancel = local.decoded_tokens
    await eventually(lambda: local.active == 0)
    assert local.decoded_tokens - after_cancel <= 1


async def first_error(gen: LocalGenerator, request: GenerationRequest) -> SluiceError:
    stream = gen.generate(request)
    with pytest.raises(SluiceError) as caught:
        await anext(stream)  # raised before any output
    await stream.aclose()
    return caught.value


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format": {"type": "array", "uniqueItems": True}}, "format: the embedded model cannot enforce"),
        ({"format": {"type": "object", "minProperties": 1, "patternProperties": {"^x": {"not": {}}}}}, "not"),
        ({"format": {"type": "nonsense"}}, "format: invalid or unsupported JSON Schema"),
        (
            {
                "tools": (
                    Tool(
                        "f",
                        None,
                        {"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}},
                    ),
                )
            },
            "tools[0].parameters: invalid or unsupported JSON Schema",
        ),
        ({"tools": (Tool("f", None, {"type": "array"}),)}, "tools[0].parameters must be a JSON Schema"),
        ({"tools": (WEATHER,), "tool_choice": ToolChoice("required", "nope")}, "'nope'"),
    ],
)
async def test_what_cannot_be_enforced_is_invalid_request(
    local: LocalGenerator, fields: dict[str, Any], message: str
) -> None:
    error = await first_error(local, ask("hi", **fields))
    assert error.code is ErrorCode.INVALID_REQUEST
    assert message in error.message
    # The model goes on serving.
    assert (await run(local, ask("What is the capital of France?", options={"max_tokens": 12})))[0]


def test_the_default_system_prompt_is_the_templates(local: LocalGenerator) -> None:
    tokenizer = local.model.tokenizer
    user = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(user, tokenize=False) == tokenizer.apply_chat_template(
        [{"role": "system", "content": DEFAULT_SYSTEM}, *user], tokenize=False
    )
