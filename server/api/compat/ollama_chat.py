"""Ollama chat and generate requests: the bodies, and the `Generate` each becomes; tool calls out in
Ollama's shape.

``format`` is ``"json"`` or a JSON Schema (enforced: PROTOCOL.md's guarantee); ``tools`` are
Ollama's (OpenAI's function shape) on ``/api/chat`` and, as a sluice extension, ``/api/generate``.
History may carry an assistant turn's ``tool_calls`` (``arguments`` an object, as Ollama sends
them) and ``tool`` results. Ollama's history names no call ids, so an assistant call without an
``id`` gets one made from its position, and a tool result without ``tool_call_id`` answers the
first unanswered call of the latest assistant turn with its ``tool_name`` (or the first one
unanswered when it names none). A call out is ``{"id", "function": {"index", "name",
"arguments": {...}}}``.

What sluice cannot honour is refused with a 400 naming it: images, ``suffix``, ``think``,
``raw``, ``template``, ``context``, ``logprobs``. Unknown fields and unknown ``options`` are
ignored, as Ollama ignores them; an assistant turn's ``thinking`` is dropped from the history,
as Ollama's templates drop it; ``keep_alive`` asks nothing of a reply (sluice keeps its models
loaded). This module shapes requests only: it never runs anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import MAX_STOP, Generate
from server.api import calls
from server.api.errors import FieldError
from server.backends.base import ToolCall

__all__ = [
    "KeepAlive",
    "OllamaChatRequest",
    "OllamaGenerateRequest",
    "OllamaOptions",
    "chat_message",
    "generate_message",
    "refuse",
    "tool_calls_out",
]

Text = Annotated[str, StringConstraints(max_length=1_000_000)]
KeepAlive = str | int | float | None
_NO_IMAGES = "images are not supported by sluice's models"


def refuse(field: str, message: str) -> FieldError:
    return FieldError(field, ErrorCode.INVALID_REQUEST, f"{field}: {message}")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OllamaOptions(_Body):
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    # -1: until the model stops, -2: until the context is full; sluice has no such cap for either.
    num_predict: int | None = Field(default=None, ge=-2, le=32768)
    stop: list[str] | None = Field(default=None, max_length=MAX_STOP)


class OllamaFunctionCall(_Body):
    index: int | None = None
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(_Body):
    id: str | None = Field(default=None, min_length=1, max_length=256)
    function: OllamaFunctionCall


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)
    thinking: str | None = None


class _Generation(_Body):
    model: str | None = Field(default=None, min_length=1, max_length=256)
    stream: bool = True
    format: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class OllamaChatRequest(_Generation):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=4096)


class OllamaGenerateRequest(_Generation):
    prompt: Text = ""
    system: Text | None = None
    suffix: str | None = None
    images: list[str] | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None


def _refuse_unsupported(body: _Generation) -> None:
    if body.think:
        raise refuse("think", "sluice's models do not support thinking")
    if body.logprobs or body.top_logprobs:
        raise refuse("logprobs" if body.logprobs else "top_logprobs", "log probabilities are not supported")
    if isinstance(body, OllamaGenerateRequest):
        if body.images:
            raise FieldError("images", ErrorCode.INVALID_REQUEST, _NO_IMAGES)
        if body.suffix:
            raise refuse("suffix", "fill-in-the-middle is not supported")
        if body.raw:
            raise refuse("raw", "raw prompts are not supported; sluice applies each model's chat template")
        if body.template:
            raise refuse("template", "custom templates are not supported")
        if body.context:
            raise refuse("context", "token contexts are not supported; send the conversation to /api/chat")


def _format(value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if value is None or value == "":
        return None
    if isinstance(value, dict) or value == "json":
        return value
    raise refuse("format", 'must be "json" or a JSON Schema')


def _sampling(options: OllamaOptions | None) -> dict[str, Any]:
    if options is None:
        return {}
    limit = options.num_predict
    return {
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k,
        "seed": options.seed,
        "max_tokens": limit if limit is not None and limit > 0 else None,
        "stop": options.stop,
    }


def _turns(messages: Sequence[OllamaMessage]) -> list[dict[str, Any]]:
    """The protocol turns of an Ollama history, call ids made and matched (module docstring)."""
    turns: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (call id, tool name) of the latest assistant turn
    for index, message in enumerate(messages):
        if message.images:
            raise FieldError(f"messages[{index}].images", ErrorCode.INVALID_REQUEST, _NO_IMAGES)
        turn: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            made = [call.id or f"call_{index}_{n}" for n, call in enumerate(message.tool_calls)]
            turn["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": orjson.dumps(call.function.arguments).decode(),
                    },
                }
                for call_id, call in zip(made, message.tool_calls, strict=True)
            ]
            unanswered = [
                (call_id, call.function.name) for call_id, call in zip(made, message.tool_calls, strict=True)
            ]
        if message.role == "tool":
            answered = message.tool_call_id or _answered(unanswered, message.tool_name)
            if answered is not None:
                turn["tool_call_id"] = answered
                unanswered = [pending for pending in unanswered if pending[0] != answered]
        turns.append(turn)
    return turns


def _answered(unanswered: list[tuple[str, str]], tool_name: str | None) -> str | None:
    for call_id, name in unanswered:
        if tool_name is None or name == tool_name:
            return call_id
    return unanswered[0][0] if unanswered else None


def _rename(path: str) -> str:
    if path.startswith("options."):
        return "options." + {"max_tokens": "num_predict"}.get(path.removeprefix("options."), path[8:])
    return path


def chat_message(body: OllamaChatRequest) -> Generate:
    """The protocol message for a ``/api/chat`` body with messages; raises `FieldError` (400)."""
    _refuse_unsupported(body)
    return calls.generate_message(
        model=body.model,
        messages=_turns(body.messages),
        format=_format(body.format),
        tools=body.tools or None,
        rename=_rename,
        **_sampling(body.options),
    )


def generate_message(body: OllamaGenerateRequest) -> Generate:
    """The protocol message for a ``/api/generate`` body with a prompt; raises `FieldError` (400)."""
    _refuse_unsupported(body)
    return calls.generate_message(
        model=body.model,
        prompt=body.prompt,
        system=body.system,
        format=_format(body.format),
        tools=body.tools or None,
        rename=_rename,
        **_sampling(body.options),
    )


def _arguments(call: ToolCall) -> dict[str, Any]:
    try:
        arguments = orjson.loads(call.arguments)
    except orjson.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise SluiceError(
            ErrorCode.UPSTREAM_ERROR, f"the model's call of {call.name} has no arguments object"
        )
    return arguments


def tool_calls_out(calls_made: Sequence[ToolCall], first_index: int = 0) -> list[dict[str, Any]]:
    """Calls in Ollama's shape: ``arguments`` an object, ``index`` counting within the reply."""
    return [
        {
            "id": call.id,
            "function": {"index": first_index + offset, "name": call.name, "arguments": _arguments(call)},
        }
        for offset, call in enumerate(calls_made)
    ]
