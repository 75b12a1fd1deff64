"""What ``format``, ``tools`` and ``tool_choice`` mean for the local model: a plan, a prompt, calls.

SmolLM2-135M-Instruct's chat template knows nothing of tools (it drops ``tools=``), so this
module renders them itself, in the syntax of SmolLM2's function-calling data: the tools as a
JSON list inside ``<tools>…</tools>`` in the system turn, and a reply that calls them as
``<tool_call>[{"name": …, "arguments": {…}}, …]</tool_call>`` (a JSON array: several calls in
one reply are parallel calls). Earlier assistant calls are rendered back in that syntax and
``tool`` turns keep their role.

`plan` checks a request (`InvalidOptions` naming the field) and returns an `OutputPlan`, whose
``grammar`` (Lark for `local_grammar`) constrains the whole reply:

- ``tool_choice`` ``required`` or a named tool: the reply must be a call of a listed tool (the
  named one) with ``arguments`` valid against its ``parameters``;
- ``auto`` with tools: either a call, as above, or a text reply, which may not begin with
  ``<`` (so the first token decides; a ``format`` then shapes the text reply instead);
- ``none`` or no tools: the tools are not offered and only ``format`` constrains the reply;
- ``format`` ``"json"``: a JSON object; a schema: an instance of it.

Pure: no model, no threads; `parse_calls` turns a finished call reply into `ToolCall` items.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from server.backends.base import GenerationRequest, JsonSchema, Tool, ToolCall, Turn
from server.backends.local_grammar import json_block
from server.backends.local_sampling import InvalidOptions

__all__ = ["CALL_OPEN", "OutputPlan", "parse_calls", "plan", "render_turn"]

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
# ``format: "json"`` asks for a JSON object, as OpenAI's json_object and Ollama's "json" do.
_ANY_OBJECT: JsonSchema = {"type": "object"}
_CALL_SYNTAX = '<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>'
Calls = Literal["never", "auto", "forced"]


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """How one request's reply is constrained; ``grammar`` None means free text."""

    grammar: str | None = None
    # (where, schema): each is checked alone first, so an error names the field it came from.
    schemas: tuple[tuple[str, JsonSchema], ...] = ()
    calls: Calls = "never"
    tools_prompt: str | None = None


def plan(request: GenerationRequest) -> OutputPlan:
    """Check ``format``, ``tools`` and ``tool_choice``; raises `InvalidOptions` naming the field."""
    reply = _format_schema(request.format)
    tools = request.tools
    choice = request.tool_choice
    _check_tools(tools)
    if choice.name is not None and choice.mode == "none":
        raise InvalidOptions('tool_choice: a named tool cannot be combined with "none"')
    if choice.name is not None and choice.name not in {tool.name for tool in tools}:
        raise InvalidOptions(f"tool_choice names {choice.name!r}, which is not among the listed tools")
    if choice.mode == "required" and not tools:
        raise InvalidOptions('tool_choice "required" needs at least one tool')
    schemas: list[tuple[str, JsonSchema]] = [] if reply is None else [("format", reply)]
    if choice.mode == "none" or not tools:
        grammar = None if reply is None else f"start: {json_block(reply)}\n"
        return OutputPlan(grammar=grammar, schemas=tuple(schemas))
    offered = [tool for tool in tools if choice.name in (None, tool.name)]
    schemas += [(f"tools[{tools.index(tool)}].parameters", _parameters(tool)) for tool in offered]
    calls_rule = f'call: "{CALL_OPEN}" calls "{CALL_CLOSE}"\ncalls: {json_block(_calls_schema(offered))}\n'
    if choice.name is not None or choice.mode == "required":
        named = f" Call the tool {choice.name}." if choice.name is not None else ""
        prompt = _tools_prompt(tools, f"Reply with only {_CALL_SYNTAX}.{named}")
        return OutputPlan(f"start: call\n{calls_rule}", tuple(schemas), "forced", prompt)
    text_rule = "TEXT: /[^<](?s:.)*/\n" if reply is None else f"text: {json_block(reply)}\n"
    start = "start: call | TEXT\n" if reply is None else "start: call | text\n"
    # This wording kept the 135M model's text answers as good as without tools; others tried
    # ("To call tools, reply with only …", SmolLM2's own function-calling prompt) made them worse.
    prompt = _tools_prompt(
        tools, f"To call a function reply {_CALL_SYNTAX}. If no function fits, answer the question directly."
    )
    return OutputPlan(start + calls_rule + text_rule, tuple(schemas), "auto", prompt)


def parse_calls(text: str) -> list[ToolCall]:
    """The calls of a complete ``<tool_call>[…]</tool_call>`` reply (raises ValueError otherwise)."""
    body = text.strip()
    if not (body.startswith(CALL_OPEN) and body.endswith(CALL_CLOSE)):
        raise ValueError("not a tool-call reply")
    items = json.loads(body[len(CALL_OPEN) : -len(CALL_CLOSE)])
    return [
        ToolCall(name=item["name"], arguments=json.dumps(item["arguments"], ensure_ascii=False))
        for item in items
    ]


def render_turn(turn: Turn) -> dict[str, str]:
    """One chat-template turn; an assistant turn's calls are written back in the call syntax."""
    if not turn.tool_calls:
        return {"role": turn.role, "content": turn.content}
    calls = [{"name": call.name, "arguments": _arguments(call.arguments)} for call in turn.tool_calls]
    rendered = CALL_OPEN + json.dumps(calls, ensure_ascii=False) + CALL_CLOSE
    return {"role": turn.role, "content": f"{turn.content}\n{rendered}" if turn.content else rendered}


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:  # a client's own history may hold anything; show it to the model as it is
        return text


def _format_schema(output_format: object) -> JsonSchema | None:
    if output_format is None:
        return None
    if output_format == "json":
        return _ANY_OBJECT
    if isinstance(output_format, Mapping):
        return output_format
    raise InvalidOptions('format must be "json" or a JSON Schema object')


def _check_tools(tools: Sequence[Tool]) -> None:
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        if not tool.name:
            raise InvalidOptions(f"tools[{index}].name must not be empty")
        if tool.name in seen:
            raise InvalidOptions(f"tools[{index}].name {tool.name!r} is listed twice")
        seen.add(tool.name)
        _parameters(tool, index)


def _parameters(tool: Tool, index: int | None = None) -> JsonSchema:
    """The tool's arguments schema: a JSON Schema of type object (none given: any object)."""
    parameters = tool.parameters
    if parameters is None or (isinstance(parameters, Mapping) and not parameters):
        return _ANY_OBJECT
    if not isinstance(parameters, Mapping) or parameters.get("type") != "object":
        where = f"tools[{index}]" if index is not None else f"tool {tool.name!r}"
        raise InvalidOptions(f'{where}.parameters must be a JSON Schema with "type": "object"')
    return parameters


def _calls_schema(tools: Sequence[Tool]) -> JsonSchema:
    one_call = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": dict(_parameters(tool))},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    items = one_call[0] if len(one_call) == 1 else {"anyOf": one_call}
    return {"type": "array", "items": items, "minItems": 1}


def _tools_prompt(tools: Sequence[Tool], instruction: str) -> str:
    listed = [
        {
            "name": tool.name,
            **({"description": tool.description} if tool.description else {}),
            "parameters": dict(_parameters(tool)),
        }
        for tool in tools
    ]
    return "Functions:\n<tools>" + json.dumps(listed, ensure_ascii=False) + f"</tools>\n{instruction}"
