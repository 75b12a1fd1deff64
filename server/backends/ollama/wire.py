"""Ollama's wire format, sans I/O: request bodies out, NDJSON bytes in, results out.

`encode_generation` builds the ``/api/chat`` or ``/api/generate`` body for a `GenerationRequest`
(``format`` and ``tools`` passed through, tool calls and results mapped into Ollama's chat
history); `StreamDecoder` takes the response body in whatever pieces the network delivers (lines
split across reads, several lines in one read, a UTF-8 character cut in two) and returns the text
of each complete line, raising on an ``{"error": ...}`` line, and collects the complete tool calls
of ``message.tool_calls`` as `ToolCall` items; `result_from_final` maps the final chunk to a
`GenerationResult`. This module must never do I/O or know about httpx: the backend
feeds it bytes and the tests feed it byte strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson

from server.backends.base import GenerationRequest, GenerationResult, Tool, ToolCall, Turn
from server.backends.ollama.errors import MalformedResponse, StreamEnded, UpstreamErrorLine

__all__ = [
    "CHAT_PATH",
    "GENERATE_PATH",
    "StreamDecoder",
    "decode_embed",
    "decode_tags",
    "encode_embed",
    "encode_generation",
    "offered_tools",
    "result_from_final",
]

CHAT_PATH = "/api/chat"
GENERATE_PATH = "/api/generate"


def _options(request: GenerationRequest) -> dict[str, Any]:
    sampling = request.options
    options: dict[str, Any] = {}
    if sampling.max_tokens is not None:
        options["num_predict"] = sampling.max_tokens
    if sampling.stop:
        options["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        options["seed"] = sampling.seed
    if sampling.temperature is not None:
        options["temperature"] = sampling.temperature
    if sampling.top_p is not None:
        options["top_p"] = sampling.top_p
    if sampling.top_k is not None:
        options["top_k"] = sampling.top_k
    return options


def _tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    # Ollama's function type has no optional parameters: no parameters means none.
    function["parameters"] = tool.parameters if tool.parameters is not None else _NO_PARAMETERS
    return {"type": "function", "function": function}


_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def offered_tools(request: GenerationRequest) -> tuple[Tool, ...]:
    """The tools Ollama is shown: none for ``tool_choice: none`` (it cannot call what it does not
    see), only the named one for a named choice, otherwise every listed tool."""
    choice = request.tool_choice
    if choice.mode == "none":
        return ()
    if choice.name is not None:
        return tuple(tool for tool in request.tools if tool.name == choice.name)
    return request.tools


def _chat_messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """Turns as Ollama's chat history: an assistant turn's calls with object arguments, a tool
    turn with the ``tool_name`` of the call it answers (found by its ``tool_call_id``)."""
    names = {call.id: call.name for turn in turns for call in turn.tool_calls if call.id is not None}
    messages: list[dict[str, Any]] = []
    for turn in turns:
        message: dict[str, Any] = {"role": turn.role, "content": turn.content}
        if turn.tool_calls:
            message["tool_calls"] = [
                {"function": {"name": call.name, "arguments": orjson.loads(call.arguments)}}
                for call in turn.tool_calls
            ]
        if turn.role == "tool" and turn.tool_call_id in names:
            message["tool_name"] = names[turn.tool_call_id]
        messages.append(message)
    return messages


def encode_generation(request: GenerationRequest) -> tuple[str, bytes]:
    """The path and JSON body that stream `request` from Ollama. ``/api/generate`` has no tools:
    a prompt offered tools goes through ``/api/chat`` as one user turn."""
    body: dict[str, Any] = {"model": request.model, "stream": True}
    tools = offered_tools(request)
    if request.messages is not None or tools:
        path = CHAT_PATH
        turns = request.messages if request.messages is not None else (Turn("user", request.prompt or ""),)
        messages = _chat_messages(turns)
        if request.system is not None:
            messages.insert(0, {"role": "system", "content": request.system})
        body["messages"] = messages
        if tools:
            body["tools"] = [_tool(tool) for tool in tools]
    else:
        path = GENERATE_PATH
        body["prompt"] = request.prompt or ""
        if request.system is not None:
            body["system"] = request.system
    options = _options(request)
    if options:
        body["options"] = options
    if request.format is not None:
        body["format"] = request.format
    return path, orjson.dumps(body)


class StreamDecoder:
    """Turns the bytes of one streamed response into text, one `feed` per network read.

    Call `feed` with each read; it returns the text of the lines the read completed ("" when it
    completed none) and raises on an error or malformed line. When such a line follows text in the
    same read, `feed` returns the text and leaves the exception in `failure`: pass the text on,
    then raise it. After the last read call `finish`, which returns the final chunk (the line
    with ``"done": true``) or raises `StreamEnded` when there was none. `pieces` counts the lines
    that carried text, the token count to fall back on when Ollama leaves ``eval_count`` out.
    """

    __slots__ = ("_buffer", "_key", "calls", "calls_made", "failure", "final", "pieces")

    def __init__(self, *, chat: bool) -> None:
        self._key = "message" if chat else "response"
        self._buffer = b""
        self.pieces = 0
        self.final: dict[str, Any] | None = None
        self.failure: Exception | None = None
        # Tool calls decoded and not yet taken by the caller (`take_calls`), and all made so far.
        self.calls: list[ToolCall] = []
        self.calls_made = 0

    def take_calls(self) -> list[ToolCall]:
        """The tool calls the reads so far completed, each once, in order."""
        calls, self.calls = self.calls, []
        return calls

    def feed(self, data: bytes) -> str:
        if self._buffer:
            data = self._buffer + data
        elif data.find(b"\n") == len(data) - 1:
            # One whole line (how Ollama writes a token): no split (orjson allows its newline).
            return self._line(data)
        lines = data.split(b"\n")
        # The last element is the start of a line still on its way ("" when data ended a line).
        self._buffer = lines.pop()
        if len(lines) == 1:
            return self._line(lines[0])
        parts: list[str] = []
        for line in lines:
            try:
                parts.append(self._line(line))
            except (UpstreamErrorLine, MalformedResponse, orjson.JSONDecodeError) as exc:
                if not any(parts):
                    raise
                # Deliver the text that came before the bad line first; the caller raises
                # `failure` once it has passed that text on.
                self.failure = exc
                self._buffer = b""
                break
        return "".join(parts)

    def finish(self) -> dict[str, Any]:
        if self.failure is not None:
            raise self.failure
        if self._buffer.strip():
            # A final line without its newline is still a line.
            self._line(self._buffer)
            self._buffer = b""
        if self.final is None:
            raise StreamEnded()
        return self.final

    def _line(self, line: bytes) -> str:
        if not line or line.isspace():
            return ""
        chunk = orjson.loads(line)
        if type(chunk) is not dict:
            raise MalformedResponse()
        if "error" in chunk:
            error = chunk["error"]
            raise UpstreamErrorLine(error if isinstance(error, str) else "upstream failed mid-stream")
        value = chunk.get(self._key)
        if self._key == "message":
            if type(value) is dict:
                if value.get("tool_calls"):
                    self._tool_calls(value["tool_calls"])
                value = value.get("content")
            else:
                value = None
        if chunk.get("done"):
            self.final = chunk
        if not value:
            return ""
        if type(value) is not str:
            raise MalformedResponse()
        self.pieces += 1
        return value

    def _tool_calls(self, calls: Any) -> None:
        """``message.tool_calls``: complete calls, ``arguments`` a JSON object (OLLAMA.md)."""
        if type(calls) is not list:
            raise MalformedResponse()
        for entry in calls:
            function = entry.get("function") if type(entry) is dict else None
            name = function.get("name") if type(function) is dict else None
            arguments = function.get("arguments", {}) if type(function) is dict else None
            if type(name) is not str or not name or type(arguments) is not dict:
                raise MalformedResponse()
            self.calls.append(ToolCall(name=name, arguments=orjson.dumps(arguments).decode()))
            self.calls_made += 1


def _ms(chunk: dict[str, Any], key: str) -> float | None:
    value = chunk.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value / 1_000_000
    return None


def _count(chunk: dict[str, Any], key: str, fallback: int) -> int:
    value = chunk.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return fallback


def result_from_final(final: dict[str, Any], pieces: int, *, called: bool = False) -> GenerationResult:
    """The result for a final chunk; `pieces` stands in for ``eval_count`` when it is absent.
    ``called``: the reply made tool calls, so it ends ``tool_calls`` (Ollama still says "stop")."""
    # "load" and "unload" end a request that generated nothing; only "length" means cut short.
    finish: Literal["stop", "length", "tool_calls"] = (
        "length" if final.get("done_reason") == "length" else "stop"
    )
    if called and finish == "stop":
        finish = "tool_calls"
    return GenerationResult(
        finish_reason=finish,
        prompt_tokens=_count(final, "prompt_eval_count", 0),
        completion_tokens=_count(final, "eval_count", pieces),
        load_ms=_ms(final, "load_duration"),
        prompt_eval_ms=_ms(final, "prompt_eval_duration"),
        eval_ms=_ms(final, "eval_duration"),
        total_ms=_ms(final, "total_duration"),
    )


def encode_embed(model: str, texts: Sequence[str]) -> bytes:
    return orjson.dumps({"model": model, "input": list(texts)})


def decode_embed(raw: bytes, count: int) -> npt.NDArray[np.float32]:
    """The ``(count, d)`` float32 matrix of an ``/api/embed`` answer."""
    body = orjson.loads(raw)
    embeddings = body.get("embeddings") if isinstance(body, dict) else None
    if not isinstance(embeddings, list) or len(embeddings) != count:
        raise MalformedResponse()
    try:
        matrix = np.asarray(embeddings, dtype=np.float32)
    except (TypeError, ValueError):
        raise MalformedResponse() from None
    if matrix.ndim != 2:
        raise MalformedResponse()
    return matrix


def decode_tags(raw: bytes) -> list[str]:
    """Model names from a ``/api/tags`` answer."""
    body = orjson.loads(raw)
    models = body.get("models") if isinstance(body, dict) else None
    if not isinstance(models, list):
        raise MalformedResponse()
    names: list[str] = []
    for entry in models:
        name = entry.get("name") or entry.get("model") if isinstance(entry, dict) else None
        if isinstance(name, str) and name:
            names.append(name)
    return names
