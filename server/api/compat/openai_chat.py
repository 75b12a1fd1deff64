"""OpenAI chat completion requests: the body, the audit of every parameter, and the `Generate` it
becomes; and the rules a reply's tool calls must keep (`CallRules`).

Every parameter of OpenAI's ``POST /v1/chat/completions`` is either supported, or accepted only
with the value that asks for nothing (``logprobs: false``, ``presence_penalty: 0``; `_NEUTRAL`),
or refused with a 400 naming it. A parameter OpenAI does not have is refused too, as OpenAI
refuses it ("unrecognized request argument"). The identifiers that ask nothing of the output
(``user``, ``safety_identifier``, ``prompt_cache_key``, ``prompt_cache_retention``) are accepted
and have no effect. Message fields follow the same rule.

Supported: ``messages`` (text content; assistant ``tool_calls``; ``tool`` results with
``tool_call_id``), ``response_format`` (``text``, ``json_object``, ``json_schema``: the schema is
enforced whether ``strict`` is set or not), ``tools`` (function tools), ``tool_choice``,
``parallel_tool_calls`` (false: only the first call of a reply is kept), and the sampling options.
A function tool with ``strict: true`` has every call's ``arguments`` checked against its
``parameters``; a call that does not match fails the request (``upstream_error``), never reaches
the client. This module shapes requests only: it never runs anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

import orjson
from jsonschema.validators import Draft202012Validator
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import MAX_STOP, Generate
from server.api import calls
from server.api.errors import FieldError
from server.backends.base import ToolCall

__all__ = ["CallRules", "ChatCompletionRequest", "refuse", "to_generate"]

Text = Annotated[str, StringConstraints(max_length=1_000_000)]

# Parameters sluice does not implement, with the values that ask for nothing (OpenAI's defaults):
# those are accepted; any other value is refused, naming the parameter.
_NEUTRAL: Final[dict[str, tuple[object, ...]]] = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "store": (None, False),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "moderation": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
}
# Identifiers and cache hints: they ask nothing of the reply, so any value is accepted.
_NO_EFFECT: Final = frozenset({"user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention"})
# Message fields beyond the supported ones, with their neutral values (a reply sent back as it came).
_MESSAGE_NEUTRAL: Final[dict[str, tuple[object, ...]]] = {
    "name": (None,),
    "refusal": (None, ""),
    "audio": (None,),
    "function_call": (None,),
    "annotations": (None, []),
}
_REASONS: Final[dict[str, str]] = {
    "functions": "the legacy functions are not supported; use tools",
    "function_call": "the legacy function_call is not supported; use tool_choice",
    "name": "participant names are not supported",
}


def refuse(param: str, message: str) -> FieldError:
    """The 400 for a parameter sluice cannot honour (OpenAI's body names it in ``param``)."""
    return FieldError(param, ErrorCode.INVALID_REQUEST, f"{param}: {message}")


class _Open(BaseModel):
    # Extra keys are kept so that the audit can name them (nothing extra is ever ignored); the
    # OpenAPI document says what the audit does: no other property is accepted.
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Text | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class OpenAIChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Open):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OpenAITool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    function: FunctionDefinition | None = None


class ChatCompletionRequest(_Open):
    model: str | None = Field(default=None, min_length=1, max_length=256)
    messages: list[OpenAIChatMessage] = Field(min_length=1, max_length=4096)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = Field(default=None)
    n: int = Field(default=1, ge=1, le=128)
    response_format: ResponseFormat | None = None
    tools: list[OpenAITool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True


def _audit(extra: Mapping[str, Any] | None, neutral: Mapping[str, tuple[object, ...]], where: str) -> None:
    for name, value in (extra or {}).items():
        param = f"{where}{name}"
        if where == "" and name in _NO_EFFECT:
            continue
        if name not in neutral:
            raise refuse(param, "unrecognized request argument")
        if value not in neutral[name]:
            raise refuse(param, _REASONS.get(name, "not supported by sluice"))


def _text(message: OpenAIChatMessage, index: int) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    for position, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise refuse(f"messages[{index}].content[{position}]", "only text parts are supported")
    return "".join(part.text or "" for part in content)


def _turn(message: OpenAIChatMessage, index: int) -> dict[str, Any]:
    _audit(message.model_extra, _MESSAGE_NEUTRAL, f"messages[{index}].")
    # OpenAI's "developer" messages are its newer name for system instructions.
    turn: dict[str, Any] = {
        "role": "system" if message.role == "developer" else message.role,
        "content": _text(message, index),
    }
    if message.tool_calls:
        turn["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    elif message.role == "tool":
        raise refuse(f"messages[{index}].tool_call_id", "a tool message must name the call it answers")
    return turn


def _format(response_format: ResponseFormat | None) -> str | dict[str, Any] | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return "json"
    spec = response_format.json_schema
    if spec is None:
        raise refuse("response_format.json_schema", "is required with type json_schema")
    return spec.schema_ if spec.schema_ is not None else "json"


def _tool(tool: OpenAITool, index: int) -> dict[str, Any]:
    if tool.type != "function" or tool.function is None:
        raise refuse(f"tools[{index}].type", "only function tools are supported")
    function = tool.function.model_dump(exclude_none=True, exclude={"strict"})
    return {"type": "function", "function": function}


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict) and choice.get("type") in ("allowed_tools", "custom"):
        raise refuse("tool_choice", f"{choice['type']} is not supported; name one function or use a mode")
    return choice


def _rename(path: str) -> str:
    """A protocol field path as this API names it."""
    if path == "format" or path.startswith("format."):
        return "response_format.json_schema.schema" + path.removeprefix("format")
    if path.startswith("options."):
        return path.removeprefix("options.")
    return path


def to_generate(body: ChatCompletionRequest) -> Generate:
    """The protocol message for ``body``; raises `FieldError` (400) for what sluice cannot honour."""
    _audit(body.model_extra, _NEUTRAL, "")
    if body.n != 1:
        raise refuse("n", "only n=1 is supported")
    options = body.stream_options
    if options is not None:
        _audit(options.model_extra, {}, "stream_options.")
        if options.include_obfuscation:
            raise refuse("stream_options.include_obfuscation", "sluice never pads its stream")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None and len(stop) > MAX_STOP:
        raise refuse("stop", f"at most {MAX_STOP} stop sequences")
    return calls.generate_message(
        model=body.model,
        messages=[_turn(message, index) for index, message in enumerate(body.messages)],
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=stop,
        seed=body.seed,
        format=_format(body.response_format),
        tools=[_tool(tool, index) for index, tool in enumerate(body.tools)] if body.tools else None,
        tool_choice=_tool_choice(body.tool_choice),
        rename=_rename,
    )


class CallRules:
    """What a reply's tool calls must keep: ``parallel_tool_calls: false`` keeps the first call
    only, and a ``strict`` tool's calls must match its ``parameters``."""

    def __init__(self, body: ChatCompletionRequest) -> None:
        self.parallel = body.parallel_tool_calls
        self.kept = 0
        self._strict: dict[str, Draft202012Validator] = {}
        for tool in body.tools or ():
            function = tool.function
            if function is not None and function.strict and function.parameters is not None:
                self._strict[function.name] = Draft202012Validator(function.parameters)

    def keep(self, call: ToolCall) -> bool:
        """Whether ``call`` goes to the client; raises when a strict tool's call does not match."""
        if not self.parallel and self.kept:
            return False
        validator = self._strict.get(call.name)
        if validator is not None:
            try:
                arguments = orjson.loads(call.arguments)
            except orjson.JSONDecodeError:
                arguments = None
            if arguments is None or not validator.is_valid(arguments):
                raise SluiceError(
                    ErrorCode.UPSTREAM_ERROR,
                    f"the model's call of {call.name} does not match its parameters (strict)",
                )
        self.kept += 1
        return True
