"""Tools and structured outputs in the protocol: decoding `format`, `tools`, `tool_choice` and tool
turns (valid and refused, with the field named), the `tool_call` event, its numbering, replay and
the history that keeps a reply's calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from protocol.codec import decode, encode
from protocol.errors import ErrorCode, SluiceError
from protocol.messages import ChatMessage, Generate, Timings, ToolCall, Usage
from protocol.session import Accepted, Session, SessionLimits
from protocol.tools import MAX_SCHEMA_DEPTH, MessageToolCall, NamedToolChoice, check_json_schema

MAX = 1 << 20
GEN = {"type": "generate", "id": "g", "prompt": "weather in Paris?"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now"}}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
}
USAGE = Usage(prompt_tokens=1, completion_tokens=2)
TIMINGS = Timings(queue_ms=0.0, ttft_ms=None, total_ms=1.0)


def dec(obj: Any) -> Any:
    return decode(json.dumps(obj), max_bytes=MAX)


def refused(obj: Any) -> SluiceError:
    with pytest.raises(SluiceError) as info:
        dec(obj)
    assert info.value.code is ErrorCode.INVALID_MESSAGE, info.value
    assert info.value.retryable is False
    return info.value


# ---------------------------------------------------------------------------------------------
# decoding


def test_tools_and_choices_decode() -> None:
    message = dec({**GEN, "tools": [WEATHER, CLOCK]})
    assert [tool.function.name for tool in message.tools] == ["get_weather", "now"]
    assert message.tools[0].function.parameters == WEATHER["function"]["parameters"]
    assert message.tools[1].function.parameters is None
    assert message.tool_choice is None
    for choice in ("auto", "none", "required"):
        assert dec({**GEN, "tools": [WEATHER], "tool_choice": choice}).tool_choice == choice
    named = dec(
        {**GEN, "tools": [WEATHER, CLOCK], "tool_choice": {"type": "function", "function": {"name": "now"}}}
    )
    assert isinstance(named.tool_choice, NamedToolChoice) and named.tool_choice.function.name == "now"


@pytest.mark.parametrize(
    "schema",
    [
        {},
        {"type": "object"},
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0}, "tags": {"type": "array", "maxItems": 3}},
        },
        {"type": "array", "items": {"enum": [1, "a", None]}, "minItems": 1},
    ],
)
def test_format_schema_decodes_as_given(schema: dict[str, Any]) -> None:
    assert dec({**GEN, "format": schema}).format == schema
    assert dec({**GEN, "format": "json"}).format == "json"


def test_tool_turns_decode_and_keep_their_calls() -> None:
    message = dec(
        {
            "type": "generate",
            "id": "g",
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"},
                {"role": "tool", "content": "no id: Ollama-style tool results name no call"},
            ],
        }
    )
    assistant, tool = message.messages[1], message.messages[2]
    assert assistant.tool_calls == [
        MessageToolCall.model_validate(CALL),
    ]
    assert assistant.tool_calls[0].function.arguments == '{"city":"Paris"}'
    assert tool.tool_call_id == "call_1"
    assert message.messages[3].tool_call_id is None


@pytest.mark.parametrize(
    ("obj", "field", "words"),
    [
        ({**GEN, "tool_choice": "auto"}, "generate message", "tool_choice is only allowed with tools"),
        (
            {**GEN, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "now"}}},
            "generate message",
            "tool_choice names 'now', which is not one of the tools",
        ),
        ({**GEN, "tools": [WEATHER], "tool_choice": "always"}, "tool_choice", ""),
        ({**GEN, "tools": [WEATHER, CLOCK, WEATHER]}, "tools", "'get_weather' is listed twice"),
        ({**GEN, "tools": []}, "tools", ""),
        ({**GEN, "tools": WEATHER}, "tools", ""),
        ({**GEN, "tools": [{"function": {"name": "f"}}]}, "tools[0].type", ""),
        (
            {**GEN, "tools": [{"type": "function", "function": {"name": "no spaces"}}]},
            "tools[0].function.name",
            "",
        ),
        (
            {**GEN, "tools": [{"type": "function", "function": {"name": "f" * 65}}]},
            "tools[0].function.name",
            "",
        ),
        (
            {
                **GEN,
                "tools": [
                    CLOCK,
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}},
                ],
            },
            "tools[1].function.parameters",
            "object schema",
        ),
        (
            {
                **GEN,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {}}}}],
            },
            "tools[0].function.parameters",
            "object schema",
        ),
        (
            {**GEN, "tools": [{"type": "function", "function": {"name": "f", "parameters": ["object"]}}]},
            "tools[0].function.parameters",
            "",
        ),
        (
            {
                **GEN,
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}},
                        },
                    }
                ],
            },
            "tools[0].function.parameters",
            "invalid JSON Schema at 'properties/a/type'",
        ),
        ({**GEN, "format": "yaml"}, "format", 'format must be "json" or a JSON Schema'),
        ({**GEN, "format": ["json"]}, "format", 'format must be "json" or a JSON Schema'),
        ({**GEN, "format": True}, "format", 'format must be "json" or a JSON Schema'),
        (
            {**GEN, "format": {"type": "object", "required": "a"}},
            "format",
            "invalid JSON Schema at 'required'",
        ),
        ({**GEN, "format": {"minimum": "zero"}}, "format", "invalid JSON Schema at 'minimum'"),
        ({**GEN, "format": {"pattern": "(unclosed"}}, "format", "invalid JSON Schema at 'pattern'"),
        ({**GEN, "format": {"type": "object", "$schema": 7}}, "format", "$schema must be a string"),
        (
            {
                "type": "generate",
                "id": "g",
                "messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}],
            },
            "messages[0]",
            "tool_calls are only allowed on assistant messages",
        ),
        (
            {
                "type": "generate",
                "id": "g",
                "messages": [{"role": "user", "content": "x", "tool_call_id": "c"}],
            },
            "messages[0]",
            "tool_call_id is only allowed on tool messages",
        ),
        (
            {
                "type": "generate",
                "id": "g",
                "messages": [
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "[1, 2]"}}],
                    }
                ],
            },
            "messages[0].tool_calls[0].function.arguments",
            "arguments must be a JSON text of an object",
        ),
        (
            {
                "type": "generate",
                "id": "g",
                "messages": [
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {}}}],
                    }
                ],
            },
            "messages[0].tool_calls[0].function.arguments",
            "",
        ),
        (
            {
                "type": "generate",
                "id": "g",
                "messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c"}]}],
            },
            "messages[0].tool_calls[0].type",
            "",
        ),
        (
            {
                "type": "generate",
                "id": "g",
                "messages": [{"role": "tool", "content": "x", "tool_call_id": ""}],
            },
            "messages[0].tool_call_id",
            "",
        ),
    ],
)
def test_bad_tools_and_formats_are_refused_naming_the_field(
    obj: dict[str, Any], field: str, words: str
) -> None:
    error = refused(obj)
    where = "invalid generate message" if field == "generate message" else f"invalid field '{field}'"
    assert error.message.startswith(where), error.message
    assert words in error.message
    assert error.ref == "g"
    assert len(error.message) < 300


def test_deep_or_huge_schemas_are_refused_without_recursing_away() -> None:
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(MAX_SCHEMA_DEPTH):
        deep = {"type": "object", "properties": {"a": deep}}
    assert "nested deeper than" in refused({**GEN, "format": deep}).message
    nested: Any = 1
    for _ in range(500):
        nested = [nested]
    assert "nested deeper than" in refused({**GEN, "format": {"enum": nested}}).message
    shallow: dict[str, Any] = {"type": "object"}
    for _ in range(MAX_SCHEMA_DEPTH // 2 - 1):
        shallow = {"type": "object", "properties": {"a": shallow}}
    assert dec({**GEN, "format": shallow}).format == shallow


def test_check_json_schema_is_the_one_check_and_says_why() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert check_json_schema(schema) is schema
    with pytest.raises(ValueError, match="'integr' is not valid"):
        check_json_schema({"type": "integr"})


def test_python_construction_checks_the_same_rules() -> None:
    # The plain HTTP APIs build `Generate` in Python: the same refusals reach them (as 422s).
    with pytest.raises(ValueError, match="tool_choice names 'x'"):
        Generate(
            type="generate",
            id="h",
            prompt="p",
            tools=[WEATHER],  # type: ignore[list-item]  # pydantic validates the dict
            tool_choice={"type": "function", "function": {"name": "x"}},  # type: ignore[arg-type]
        )


# ---------------------------------------------------------------------------------------------
# the tool_call event


def test_tool_call_encodes_as_the_contract_says() -> None:
    event = ToolCall(id="g", seq=4, index=1, call_id="call_x", name="now", arguments="{}")
    assert encode(event) == (
        '{"type":"tool_call","id":"g","seq":4,"index":1,"call_id":"call_x","name":"now","arguments":"{}"}'
    )
    assert ToolCall.model_validate_json(encode(event)) == event


def start(s: Session, **fields: Any) -> Generate:
    request = dec({**GEN, "tools": [WEATHER, CLOCK], **fields})
    assert s.receive(request) == Accepted(request)
    return request  # type: ignore[no-any-return]


def test_calls_are_numbered_logged_and_indexed_per_request() -> None:
    s = Session("s", SessionLimits())
    start(s)
    start(s, id="h")
    events = [
        s.delta("g", "Let me look."),
        s.tool_call("g", call_id="call_a", name="get_weather", arguments='{"city":"Paris"}'),
        s.tool_call("h", call_id="call_b", name="now", arguments="{}"),
        s.tool_call("g", call_id="call_c", name="now", arguments="{}"),
        s.done("g", finish_reason="tool_calls", usage=USAGE, timings=TIMINGS, model="m"),
        s.tool_call("g", call_id="call_late", name="now", arguments="{}"),  # after its terminal: nothing
    ]
    assert events[-1] is None
    sent = [e for e in events if e is not None]
    assert [e.seq for e in sent] == [1, 2, 3, 4, 5]
    calls = [e for e in sent if isinstance(e, ToolCall)]
    assert [(c.id, c.index, c.call_id) for c in calls] == [
        ("g", 0, "call_a"),
        ("h", 0, "call_b"),
        ("g", 1, "call_c"),
    ]
    assert s.inflight["h"].call_count == 1
    # Resume replays the calls exactly, in order, among the other events.
    assert s.replay(1) == sent[1:]
    assert [json.loads(encode(e))["type"] for e in s.replay(0) or []] == [
        "delta",
        "tool_call",
        "tool_call",
        "tool_call",
        "done",
    ]


def test_history_keeps_the_calls_on_the_assistant_turn() -> None:
    s = Session("s", SessionLimits())
    start(s, history=True)
    s.delta("g", "Checking. ")
    s.tool_call("g", call_id="call_a", name="get_weather", arguments='{"city":"Paris"}')
    s.done("g", finish_reason="tool_calls", usage=USAGE, timings=TIMINGS, model="m")
    user, assistant = s.history
    assert (user.role, user.content) == ("user", "weather in Paris?")
    assert (assistant.role, assistant.content) == ("assistant", "Checking. ")
    assert assistant.tool_calls is not None
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in assistant.tool_calls] == [
        ("call_a", "function", "get_weather", '{"city":"Paris"}')
    ]
    answer = dec(
        {
            "type": "generate",
            "id": "g2",
            "history": True,
            "messages": [{"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_a"}],
        }
    )
    turns = s.conversation(answer)
    assert [t.role for t in turns] == ["user", "assistant", "tool"]
    assert turns[2].tool_call_id == "call_a"


def test_history_without_calls_has_none_and_a_plain_reply_stays_plain() -> None:
    s = Session("s", SessionLimits())
    start(s, history=True)
    s.delta("g", "Sunny.")
    s.done("g", finish_reason="stop", usage=USAGE, timings=TIMINGS, model="m")
    assert s.history[1] == ChatMessage(role="assistant", content="Sunny.")


def test_trimmed_history_never_starts_with_an_orphan_tool_turn() -> None:
    s = Session("s", SessionLimits(history_messages=3))
    start(s, history=True)
    s.tool_call("g", call_id="call_a", name="now", arguments="{}")
    s.done("g", finish_reason="tool_calls", usage=USAGE, timings=TIMINGS, model="m")
    follow = dec(
        {
            "type": "generate",
            "id": "g2",
            "history": True,
            "messages": [{"role": "tool", "content": "12:00", "tool_call_id": "call_a"}],
        }
    )
    assert isinstance(s.receive(follow), Accepted)
    s.delta("g2", "It is noon.")
    s.done("g2", finish_reason="stop", usage=USAGE, timings=TIMINGS, model="m")
    # user, assistant(call), tool, assistant: 4 > 3, the oldest goes; the head is no tool turn.
    assert [t.role for t in s.history] == ["assistant", "tool", "assistant"]
    s2 = Session("s2", SessionLimits(history_messages=2))
    start(s2, history=True)
    s2.tool_call("g", call_id="call_a", name="now", arguments="{}")
    s2.done("g", finish_reason="tool_calls", usage=USAGE, timings=TIMINGS, model="m")
    assert isinstance(s2.receive(follow), Accepted)
    s2.delta("g2", "Noon.")
    s2.done("g2", finish_reason="stop", usage=USAGE, timings=TIMINGS, model="m")
    # user, assistant(call), tool, assistant trimmed to 2 would start with the tool turn: dropped.
    assert [t.role for t in s2.history] == ["assistant"]


def test_tool_call_on_a_non_generation_is_a_caller_bug() -> None:
    s = Session("s", SessionLimits())
    s.receive(dec({"type": "embed", "id": "e", "input": "x"}))
    with pytest.raises(ValueError, match="not generate"):
        s.tool_call("e", call_id="c", name="f", arguments="{}")


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"$ref": "https://example.com/schema.json"}, "is not local"),
        ({"properties": {"a": {"$ref": "other.json#/x"}}}, "is not local"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}, "$defs": {}}, "points to nothing"),
        ({"items": {"$ref": "#nowhere"}}, "points to nothing"),
    ],
)
def test_references_must_stay_inside_the_schema(schema: dict[str, Any], words: str) -> None:
    error = refused({**GEN, "format": schema})
    assert error.message.startswith("invalid field 'format'") and words in error.message


def test_local_references_and_data_that_looks_like_one_are_fine() -> None:
    schema = {
        "$defs": {
            "point": {"type": "object", "properties": {"x": {"type": "number"}}},
            "a/b": {"type": "string"},
        },
        "type": "object",
        "properties": {
            "p": {"$ref": "#/$defs/point"},
            "q": {"$ref": "#/$defs/a~1b"},
            "r": {"$ref": "#tagged"},
            "s": {"$ref": "#"},
            "t": {"const": {"$ref": "not a reference, a value"}},
        },
        "$comment": "r points at an anchor",
        "additionalProperties": {"$anchor": "tagged", "type": "boolean"},
    }
    assert dec({**GEN, "format": schema}).format == schema
