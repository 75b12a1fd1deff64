"""The request translation of the OpenAI and Ollama APIs from the inside: bodies in, protocol
`Generate` (or a `FieldError` naming the field) out, and the rules for a reply's tool calls.
No server, no sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from protocol.errors import SluiceError
from protocol.messages import Generate
from protocol.tools import NamedToolChoice
from server.api.compat.ollama_chat import OllamaChatRequest, chat_message, tool_calls_out
from server.api.compat.openai_chat import CallRules, ChatCompletionRequest, to_generate
from server.api.errors import FieldError
from server.backends.base import ToolCall

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}
USER = [{"role": "user", "content": "hi"}]


def _openai(**fields: Any) -> Generate:
    return to_generate(ChatCompletionRequest.model_validate({"messages": USER} | fields))


def test_openai_tools_choice_and_format_become_the_protocols() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    message = _openai(
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "a", "schema": schema, "strict": True},
        },
    )
    assert message.format == schema
    assert message.tools is not None and message.tools[0].function.name == "get_weather"
    assert isinstance(message.tool_choice, NamedToolChoice)
    assert _openai(response_format={"type": "json_object"}).format == "json"
    assert _openai(response_format={"type": "text"}).format is None


def test_openai_history_with_calls_and_results() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    message = _openai(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "weather "}, {"type": "text", "text": "in Oslo"}],
            },
            {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
            {"role": "tool", "tool_call_id": "call_1", "content": "7 C"},
        ],
        tools=[WEATHER],
    )
    assert message.messages is not None
    roles = [(turn.role, turn.content) for turn in message.messages]
    assert roles == [("system", "be brief"), ("user", "weather in Oslo"), ("assistant", ""), ("tool", "7 C")]
    assert message.messages[2].tool_calls is not None and message.messages[2].tool_calls[0].id == "call_1"
    assert message.messages[3].tool_call_id == "call_1"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"presence_penalty": 0.1}, "presence_penalty"),
        ({"foo": 1}, "foo"),
        ({"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]}, "messages[0].audio"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 1}}}},
            "response_format.json_schema.schema",
        ),
        ({"temperature": 0.5, "top_k": 3, "tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_openai_refusals_name_the_parameter(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(FieldError) as refused:
        _openai(**fields)
    assert refused.value.field == param and refused.value.message.startswith(f"{param}: ")


def test_call_rules_keep_the_first_call_without_parallel_calls_and_check_strict_tools() -> None:
    body = ChatCompletionRequest.model_validate(
        {"messages": USER, "tools": [WEATHER], "parallel_tool_calls": False}
    )
    rules = CallRules(body)
    assert rules.keep(ToolCall("get_weather", '{"city": "Oslo"}', "call_a"))
    assert not rules.keep(ToolCall("get_weather", '{"city": "Lima"}', "call_b"))
    strict = CallRules(ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER]}))
    with pytest.raises(SluiceError, match="does not match its parameters"):
        strict.keep(ToolCall("get_weather", '{"town": "Oslo"}', "call_c"))
    with pytest.raises(SluiceError, match="does not match its parameters"):
        strict.keep(ToolCall("get_weather", "not json", "call_d"))


def _ollama(messages: list[dict[str, Any]], **fields: Any) -> Generate:
    return chat_message(OllamaChatRequest.model_validate({"messages": messages} | fields))


def test_ollama_history_gets_call_ids_and_matches_results_by_tool_name() -> None:
    calls = [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"function": {"name": "get_time", "arguments": {}}},
    ]
    message = _ollama(
        [
            {"role": "user", "content": "weather and time?"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": "noon", "tool_name": "get_time"},
            {"role": "tool", "content": "7 C"},
        ]
    )
    assert message.messages is not None
    made = message.messages[1].tool_calls or []
    assert [call.id for call in made] == ["call_1_0", "call_1_1"]
    assert json.loads(made[0].function.arguments) == {"city": "Oslo"}
    assert [turn.tool_call_id for turn in message.messages[2:]] == ["call_1_1", "call_1_0"]


def test_ollama_format_and_refusals() -> None:
    assert _ollama(USER, format="json").format == "json"
    assert _ollama(USER, format="").format is None
    with pytest.raises(FieldError) as refused:
        _ollama(USER, format="xml")
    assert refused.value.field == "format"
    with pytest.raises(FieldError) as thinking:
        _ollama(USER, think="high")
    assert thinking.value.field == "think"


def test_tool_calls_out_in_ollamas_shape() -> None:
    out = tool_calls_out([ToolCall("f", '{"x": 1}', "call_z")], first_index=2)
    assert out == [{"id": "call_z", "function": {"index": 2, "name": "f", "arguments": {"x": 1}}}]
    with pytest.raises(SluiceError, match="no arguments object"):
        tool_calls_out([ToolCall("f", "[1]", "call_y")])
