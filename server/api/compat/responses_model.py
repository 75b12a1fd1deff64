"""OpenAI Responses requests and the objects answered for them: the request body, the audit of
its parameters, the `Generate` it becomes (`plan`), and the Response object and its output items.

Supported: ``model``, ``input`` (a string, or items: messages with text content, ``function_call``
and ``function_call_output``), ``instructions``, ``max_output_tokens``, ``temperature``,
``top_p``, ``tools`` (function tools; ``strict`` unless false has every call's arguments checked
against ``parameters``), ``tool_choice``, ``parallel_tool_calls``, ``text.format`` (``text``,
``json_object``, ``json_schema``), ``store``, ``stream``, ``metadata`` and
``previous_response_id`` (the stored conversation goes first; its instructions do not carry
over), and ``background`` (`server.api.compat.responses_run` runs it). A feature sluice does not
have (``reasoning``, ``include``, built-in tools, images, files, audio, ``truncation: auto``,
``conversation``, ``prompt``) is refused with a 400 naming it; a field this API does not know is ignored, as OpenAI ignores it. This module shapes
requests and bodies only: it never runs a generation and never stores anything.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from protocol.errors import ErrorCode
from protocol.messages import Generate
from server.api import calls
from server.api.compat.openai_chat import (
    CallRules,
    ChatCompletionRequest,
    FunctionDefinition,
    OpenAITool,
    refuse,
)
from server.api.errors import FieldError
from server.backends.base import ToolCall
from server.dispatcher import Finished

__all__ = ["Plan", "ResponsesRequest", "call_item", "message_item", "new_item_id", "plan", "usage"]

Text = Annotated[str, StringConstraints(max_length=1_000_000)]
# Content part types that carry text, by the role of the message that holds them.
_TEXT_PARTS: Final = frozenset({"input_text", "output_text"})
_NEUTRAL_TIERS: Final = (None, "auto", "default")


class _Body(BaseModel):
    # Fields this API does not know are ignored (OpenAI's behaviour for Responses).
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ContentPart(_Body):
    type: str
    text: Text | None = None


class InputItem(_Body):
    type: str | None = None  # "message" when absent
    id: str | None = Field(default=None, max_length=256)
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: Text | list[ContentPart] | None = None
    call_id: str | None = Field(default=None, min_length=1, max_length=256)
    name: str | None = None
    arguments: str | None = None
    output: Text | list[ContentPart] | None = None


class FunctionTool(_Body):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: str | None = None


class StreamOptions(_Body):
    include_obfuscation: bool | None = None


class ResponsesRequest(_Body):
    model: str | None = Field(default=None, min_length=1, max_length=256)
    input: Text | list[InputItem] | None = None
    instructions: Text | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    store: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    metadata: dict[str, Annotated[str, StringConstraints(max_length=512)]] | None = Field(
        default=None, max_length=16
    )
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=128)
    background: bool | None = None
    # Features sluice does not have: accepted only with the value that asks for nothing.
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    service_tier: str | None = None
    # Identifiers and cache hints: they ask nothing of the reply (OpenAI's too have no effect here).
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None


def new_item_id(prefix: str) -> str:
    """An output or input item id in OpenAI's style (``msg_…``, ``fc_…``)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def _audit(body: ResponsesRequest) -> None:
    refusals: list[tuple[str, bool, str]] = [
        ("reasoning", body.reasoning is not None, "reasoning options are not supported"),
        ("include", bool(body.include), "no extra output data can be included"),
        ("truncation", body.truncation == "auto", "only truncation 'disabled' is supported"),
        ("conversation", body.conversation is not None, "conversations are not supported"),
        ("prompt", body.prompt is not None, "prompt templates are not supported"),
        ("max_tool_calls", body.max_tool_calls is not None, "max_tool_calls is not supported"),
        ("top_logprobs", bool(body.top_logprobs), "logprobs are not supported"),
        ("service_tier", body.service_tier not in _NEUTRAL_TIERS, "only the default tier exists"),
    ]
    options = body.stream_options
    if options is not None:
        refusals.append(
            ("stream_options.include_obfuscation", bool(options.include_obfuscation), "never padded")
        )
    if body.text is not None:
        refusals.append(("text.verbosity", body.text.verbosity not in (None, "medium"), "not supported"))
    for param, refused, reason in refusals:
        if refused:
            raise refuse(param, reason)


def _text_of(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for position, part in enumerate(content):
        if part.type not in _TEXT_PARTS or part.text is None:
            raise refuse(f"{where}[{position}]", f"{part.type} content is not supported; send text")
    return "".join(part.text or "" for part in content)


def _parts(text: str, role: str) -> list[dict[str, Any]]:
    if role == "assistant":
        return [{"type": "output_text", "text": text, "annotations": []}]
    return [{"type": "input_text", "text": text}]


def _read_input(body: ResponsesRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The protocol turns of ``body.input`` and its items as stored (each with an id)."""
    raw = body.input
    if raw is None:
        raise refuse("input", "is required")
    if isinstance(raw, str):
        item = {"id": new_item_id("msg"), "type": "message", "role": "user", "status": "completed"}
        return [{"role": "user", "content": raw}], [{**item, "content": _parts(raw, "user")}]
    turns: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for index, entry in enumerate(raw):
        kind = entry.type or "message"
        if kind == "message":
            if entry.role is None:
                raise refuse(f"input[{index}].role", "a message needs a role")
            text = _text_of(entry.content, f"input[{index}].content")
            turns.append({"role": "system" if entry.role == "developer" else entry.role, "content": text})
            item = {"id": entry.id or new_item_id("msg"), "type": "message", "role": entry.role}
            items.append({**item, "status": "completed", "content": _parts(text, entry.role)})
        elif kind == "function_call":
            if entry.call_id is None or entry.name is None or entry.arguments is None:
                raise refuse(f"input[{index}]", "a function_call needs call_id, name and arguments")
            call = {
                "id": entry.call_id,
                "type": "function",
                "function": {"name": entry.name, "arguments": entry.arguments},
            }
            last = turns[-1] if turns else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                turns.append({"role": "assistant", "content": "", "tool_calls": [call]})
            fields = {"call_id": entry.call_id, "name": entry.name, "arguments": entry.arguments}
            items.append(
                {
                    "id": entry.id or new_item_id("fc"),
                    "type": "function_call",
                    "status": "completed",
                    **fields,
                }
            )
        elif kind == "function_call_output":
            if entry.call_id is None or entry.output is None:
                raise refuse(f"input[{index}]", "a function_call_output needs call_id and output")
            output = _text_of(entry.output, f"input[{index}].output")
            turns.append({"role": "tool", "content": output, "tool_call_id": entry.call_id})
            fields = {"call_id": entry.call_id, "output": output}
            items.append(
                {
                    "id": entry.id or new_item_id("fco"),
                    "type": "function_call_output",
                    "status": "completed",
                    **fields,
                }
            )
        else:
            raise refuse(f"input[{index}].type", f"{kind} items are not supported")
    if not turns:
        raise refuse("input", "at least one input item is required")
    return turns, items


def _tools(body: ResponsesRequest) -> list[OpenAITool]:
    tools: list[OpenAITool] = []
    for index, tool in enumerate(body.tools or ()):
        if tool.type != "function":
            raise refuse(f"tools[{index}].type", f"{tool.type} tools are not supported; only function tools")
        if tool.name is None:
            raise refuse(f"tools[{index}].name", "a function tool needs a name")
        # Responses' function tools are strict unless they say otherwise.
        strict = tool.strict is not False and tool.parameters is not None
        definition = FunctionDefinition(
            name=tool.name, description=tool.description, parameters=tool.parameters, strict=strict
        )
        tools.append(OpenAITool(type="function", function=definition))
    return tools


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise refuse("tool_choice", f"{choice.get('type')!r} is not supported; name one function or use a mode")


def _format(text: TextConfig | None) -> str | dict[str, Any] | None:
    spec = text.format if text is not None else None
    if spec is None or spec.type == "text":
        return None
    if spec.type == "json_object":
        return "json"
    if spec.name is None:
        raise refuse("text.format.name", "is required with type json_schema")
    return spec.schema_ if spec.schema_ is not None else "json"


def _rename(path: str) -> str:
    """A protocol field path as this API names it."""
    if path == "format" or path.startswith("format."):
        return "text.format.schema" + path.removeprefix("format")
    if path.startswith("options."):
        return {"options.max_tokens": "max_output_tokens"}.get(path, path.removeprefix("options."))
    if path.startswith("messages"):
        return "input"
    if path.startswith("tools["):  # Responses' function tools are flat: no "function" level
        return path.replace("].function.", "].", 1)
    return path


@dataclass(slots=True)
class Plan:
    """What a request runs: the message, the rules its calls keep, and what will be stored."""

    message: Generate
    rules: CallRules
    input_items: list[dict[str, Any]]
    turns: list[dict[str, Any]]  # the conversation so far: stored turns, then this input's
    tools: list[dict[str, Any]]  # as the Response object echoes them


def plan(body: ResponsesRequest, previous_turns: list[dict[str, Any]]) -> Plan:
    """The plan for ``body`` after ``previous_turns``; raises `FieldError` (400) for what sluice
    cannot honour."""
    _audit(body)
    turns, items = _read_input(body)
    conversation = [*previous_turns, *turns]
    prompt = conversation
    if body.instructions:
        prompt = [{"role": "system", "content": body.instructions}, *conversation]
    tools = _tools(body)
    message = calls.generate_message(
        model=body.model,
        messages=prompt,
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_output_tokens,
        format=_format(body.text),
        tools=[_protocol_tool(tool) for tool in tools] or None,
        tool_choice=_tool_choice(body.tool_choice),
        rename=_rename,
    )
    shape = ChatCompletionRequest.model_construct(
        messages=[], parallel_tool_calls=body.parallel_tool_calls, tools=tools
    )
    echoed = [tool.model_dump(exclude_none=True) for tool in body.tools or ()]
    return Plan(message=message, rules=CallRules(shape), input_items=items, turns=conversation, tools=echoed)


def _protocol_tool(tool: OpenAITool) -> dict[str, Any]:
    if tool.function is None:  # _tools builds every one with its function
        raise FieldError("tools", ErrorCode.INTERNAL, "tools: a function tool lost its definition")
    return {"type": "function", "function": tool.function.model_dump(exclude_none=True, exclude={"strict"})}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """An output ``message`` item holding one ``output_text`` part."""
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def call_item(item_id: str, call: ToolCall, status: str, arguments: str | None = None) -> dict[str, Any]:
    """An output ``function_call`` item (``arguments`` overrides the call's, for the opening event)."""
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.id or new_item_id("call"),
        "name": call.name,
        "arguments": call.arguments if arguments is None else arguments,
    }


def usage(finished: Finished) -> dict[str, Any]:
    """The Response object's ``usage`` for a finished generation."""
    counted = finished.usage
    return {
        "input_tokens": counted.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": counted.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": counted.prompt_tokens + counted.completion_tokens,
    }
