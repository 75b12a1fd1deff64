"""What sluice guarantees of an Ollama reply that Ollama itself does not: checked as it streams.

Ollama takes ``format`` and ``tools`` but promises neither: its schema-to-grammar conversion
skips keywords it does not know, and a model may answer a ``tool_choice: "required"`` request
with plain text or call a tool with arguments that do not fit. PROTOCOL.md makes ``format`` and
a required or named ``tool_choice`` guarantees, so `ReplyCheck` holds the reply to them:

- every call must name a tool the request offered (`wire.offered_tools`); under ``required`` or
  a named choice its arguments must also be valid against that tool's ``parameters``;
- under ``required`` or a named choice the reply must make at least one call;
- under ``format`` a text reply (one without calls) must parse as JSON and, for a schema, be an
  instance of it, unless it was cut short (``finish_reason: "length"``, which says so).

A broken guarantee raises ``SluiceError(upstream_error)`` naming it, so the generation ends with
a typed error instead of ``done``. Text already streamed stays streamed: the terminal message is
what tells the client the reply is good. This module never talks to Ollama and never changes
the text or the calls (only ``finish_reason``, which is ``tool_calls`` once a call was made).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from jsonschema.validators import validator_for

from protocol.errors import ErrorCode, SluiceError
from server.backends.base import GenerationRequest, GenerationResult, ToolCall
from server.backends.ollama.wire import offered_tools

__all__ = ["ReplyCheck"]

# How much of a failing value an error message quotes.
_QUOTE = 80


def _broken(what: str) -> SluiceError:
    return SluiceError(ErrorCode.UPSTREAM_ERROR, f"the Ollama model's reply broke its guarantee: {what}")


def _first_error(schema: Any, instance: Any) -> str | None:
    validator = validator_for(schema)(schema)
    error = next(iter(validator.iter_errors(instance)), None)
    if error is None:
        return None
    where = "/".join(str(part) for part in error.absolute_path)
    return f"{error.message[:_QUOTE]}{f' at {where!r}' if where else ''}"


class ReplyCheck:
    """The guarantees of one request, fed its text and calls as they stream; see the module."""

    __slots__ = ("_calls", "_forced", "_format", "_parameters", "_text")

    def __init__(self, request: GenerationRequest) -> None:
        self._format = request.format
        self._forced = request.tool_choice.mode == "required" or request.tool_choice.name is not None
        self._parameters = {tool.name: tool.parameters for tool in offered_tools(request)}
        # Text is kept only when it has to be checked at the end.
        self._text: list[str] | None = [] if request.format is not None else None
        self._calls = 0

    @property
    def checks_text(self) -> bool:
        """Whether `text` must see every piece (else it can be skipped: it only returns it)."""
        return self._text is not None

    def text(self, piece: str) -> str:
        if self._text is not None:
            self._text.append(piece)
        return piece

    def call(self, call: ToolCall) -> ToolCall:
        """``call`` if it keeps the guarantees; raises `SluiceError` otherwise."""
        if call.name not in self._parameters:
            offered = ", ".join(repr(name) for name in self._parameters) or "none"
            raise _broken(f"it called {call.name[:_QUOTE]!r}, which is not an offered tool ({offered})")
        parameters = self._parameters[call.name]
        if self._forced and parameters is not None:
            problem = _first_error(parameters, json.loads(call.arguments))
            if problem is not None:
                raise _broken(
                    f"the arguments of its {call.name!r} call do not match its parameters: {problem}"
                )
        self._calls += 1
        return call

    def finish(self, result: GenerationResult) -> GenerationResult:
        """The result, ``tool_calls`` when calls were made; raises `SluiceError` when the reply as a
        whole broke a guarantee."""
        if self._calls:
            if result.finish_reason == "stop":
                result = replace(result, finish_reason="tool_calls")
            return result
        if self._forced:
            raise _broken("tool_choice asked for a tool call and it answered without one")
        if self._text is not None and result.finish_reason != "length":
            self._check_format("".join(self._text))
        return result

    def _check_format(self, text: str) -> None:
        try:
            value = json.loads(text)
        except ValueError:
            raise _broken(f"format asked for JSON and the reply is not JSON: {text[:_QUOTE]!r}") from None
        if not isinstance(self._format, str):
            problem = _first_error(self._format, value)
            if problem is not None:
                raise _broken(f"the reply does not match the format schema: {problem}")
