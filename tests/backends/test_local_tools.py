"""`server.backends.local_tools`: request checks, the plan, the tool prompt, call parsing. Pure."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.backends.base import GenerationRequest, Tool, ToolCall, ToolChoice, Turn
from server.backends.local_model import DEFAULT_SYSTEM, chat_turns
from server.backends.local_sampling import InvalidOptions
from server.backends.local_tools import parse_calls, plan, render_turn

WEATHER = Tool(
    "get_weather",
    "Weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CLOCK = Tool("get_time")


def request(**fields: Any) -> GenerationRequest:
    return GenerationRequest(model="smollm2:135m", prompt="hi", **fields)


def test_no_format_and_no_tools_is_free_text() -> None:
    output = plan(request())
    assert (output.grammar, output.schemas, output.calls, output.tools_prompt) == (None, (), "never", None)


def test_format_json_is_an_object_and_a_schema_is_checked_as_format() -> None:
    assert plan(request(format="json")).schemas == (("format", {"type": "object"}),)
    schema = {"type": "array", "items": {"type": "integer"}}
    output = plan(request(format=schema))
    assert output.schemas == (("format", schema),)
    assert output.grammar is not None and '"items": {"type": "integer"}' in output.grammar


def test_tool_choice_none_offers_no_tools() -> None:
    output = plan(request(tools=(WEATHER,), tool_choice=ToolChoice("none")))
    assert (output.grammar, output.calls, output.tools_prompt) == (None, "never", None)


def test_required_forces_a_call_of_any_listed_tool_and_checks_each_parameters() -> None:
    output = plan(request(tools=(WEATHER, CLOCK), tool_choice=ToolChoice("required")))
    assert output.calls == "forced"
    assert [where for where, _ in output.schemas] == ["tools[0].parameters", "tools[1].parameters"]
    assert output.schemas[1][1] == {"type": "object"}  # no parameters: any object
    assert output.grammar is not None and output.grammar.startswith("start: call\n")
    assert output.tools_prompt is not None and '"name": "get_time"' in output.tools_prompt


def test_a_named_tool_is_the_only_one_the_grammar_allows() -> None:
    output = plan(request(tools=(WEATHER, CLOCK), tool_choice=ToolChoice("required", "get_time")))
    assert output.calls == "forced"
    assert [where for where, _ in output.schemas] == ["tools[1].parameters"]
    assert output.grammar is not None and "get_time" in output.grammar and "get_weather" not in output.grammar
    assert output.tools_prompt is not None and output.tools_prompt.endswith("Call the tool get_time.")


def test_auto_with_a_format_shapes_the_text_reply() -> None:
    output = plan(request(tools=(WEATHER,), format="json"))
    assert output.calls == "auto"
    assert output.grammar is not None and output.grammar.startswith("start: call | text\n")
    assert [where for where, _ in output.schemas] == ["format", "tools[0].parameters"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format": "yaml"}, 'format must be "json" or a JSON Schema object'),
        ({"tool_choice": ToolChoice("required")}, 'tool_choice "required" needs at least one tool'),
        ({"tools": (WEATHER,), "tool_choice": ToolChoice("required", "nope")}, "'nope'"),
        ({"tools": (WEATHER,), "tool_choice": ToolChoice("none", "get_weather")}, '"none"'),
        ({"tools": (WEATHER, WEATHER)}, "tools[1].name 'get_weather' is listed twice"),
        ({"tools": (Tool(""),)}, "tools[0].name must not be empty"),
        (
            {"tools": (CLOCK, Tool("f", None, {"type": "string"}))},
            "tools[1].parameters must be a JSON Schema",
        ),
        ({"tools": (Tool("f", None, {"properties": {}}),)}, "tools[0].parameters must be a JSON Schema"),
    ],
)
def test_bad_fields_are_refused_naming_them(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidOptions) as caught:
        plan(request(**fields))
    assert message in str(caught.value)


def test_calls_parse_with_their_arguments_as_json_text() -> None:
    reply = '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"é": "ü"}}]</tool_call>'
    assert parse_calls(reply) == [ToolCall("a", '{"x": 1}'), ToolCall("b", '{"é": "ü"}')]
    with pytest.raises(ValueError):
        parse_calls('[{"name": "a", "arguments": {}}]')


def test_assistant_calls_are_rendered_back_in_the_call_syntax() -> None:
    turn = Turn("assistant", "", tool_calls=(ToolCall("get_weather", '{"city": "Oslo"}', "c1"),))
    content = render_turn(turn)["content"]
    assert parse_calls(content) == [ToolCall("get_weather", '{"city": "Oslo"}')]
    broken = render_turn(Turn("assistant", "Let me check.", tool_calls=(ToolCall("f", "{not json", "c2"),)))
    assert broken["content"].startswith("Let me check.\n<tool_call>")
    assert json.loads(broken["content"].split("<tool_call>")[1].removesuffix("</tool_call>"))[0][
        "arguments"
    ] == ("{not json")
    assert render_turn(Turn("tool", '{"t": 18}', tool_call_id="c1")) == {
        "role": "tool",
        "content": '{"t": 18}',
    }


def test_the_tools_prompt_joins_the_system_turn_or_the_default_one() -> None:
    output = plan(request(tools=(WEATHER,)))
    turns = chat_turns(request(tools=(WEATHER,)), output.tools_prompt)
    assert turns[0] == {"role": "system", "content": f"{DEFAULT_SYSTEM}\n\n{output.tools_prompt}"}
    turns = chat_turns(request(system="Be brief."), "TOOLS")
    assert turns[0] == {"role": "system", "content": "Be brief.\n\nTOOLS"}
    assert chat_turns(request()) == [{"role": "user", "content": "hi"}]
