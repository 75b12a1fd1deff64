"""What the Ollama emulator answers to ``tools`` and ``format``, as OLLAMA.md describes Ollama.

- Tools offered on ``/api/chat`` (and the last turn is not a ``tool`` result): a little text
  (the emulator's ``text_before_calls`` pieces), then the calls, each complete in its own chunk, ``message.tool_calls`` with
  ``arguments`` a JSON **object** (`plan_calls`). After a tool result the model answers in text.
- ``format``: the text is JSON, streamed in ordinary content chunks: for a schema, an instance
  of it (`instance_of`); for ``"json"``, an object.

Everything is deterministic (a tool's arguments come from its ``parameters``), so tests can say
exactly what a request gets. `ReplyFault` makes the model break a promise on purpose (ignore a
required tool, call an unknown one, send arguments that do not fit, answer a schema with
non-JSON), to test what sluice does when Ollama does not keep its word. Test support only.
"""

from __future__ import annotations

import enum
from typing import Any

import orjson

__all__ = ["ReplyFault", "format_pieces", "instance_of", "plan_calls"]

_WORD = "sluice"


class ReplyFault(enum.Enum):
    NONE = "none"
    NO_CALL = "no_call"  # tools offered, the model answers in text only
    UNKNOWN_TOOL = "unknown_tool"  # it calls a tool nobody offered
    BAD_ARGUMENTS = "bad_arguments"  # its arguments miss every property
    NOT_JSON = "not_json"  # under format, plain words


def instance_of(schema: Any) -> Any:
    """A deterministic value valid against ``schema`` (the keywords tests use)."""
    if not isinstance(schema, dict):
        return "text"
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return instance_of(schema[key][0])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        return {name: instance_of(sub) for name, sub in properties.items()}
    if kind == "array":
        count = max(int(schema.get("minItems", 1)), 1)
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        return [instance_of(schema.get("items", {})) for _ in range(count)]
    if kind == "string":
        text = _WORD * (1 + int(schema.get("minLength", 0)) // len(_WORD))
        return text[: schema["maxLength"]] if "maxLength" in schema else text
    if kind in ("integer", "number"):
        value: float = 1 if kind == "integer" else 1.5
        if "minimum" in schema:
            value = max(value, schema["minimum"])
        if "exclusiveMinimum" in schema:
            value = max(value, schema["exclusiveMinimum"] + 1)
        if "maximum" in schema:
            value = min(value, schema["maximum"])
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "text"


def plan_calls(body: dict[str, Any], count: int, fault: ReplyFault) -> list[dict[str, Any]]:
    """The ``tool_calls`` entries a chat body gets: the first ``count`` offered tools, called."""
    tools = [
        t for t in body.get("tools") or () if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    messages = body.get("messages") or []
    answered = bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool"
    if not tools or answered or fault is ReplyFault.NO_CALL:
        return []
    calls = []
    for index, tool in enumerate(tools[: max(count, 1)]):
        function = tool["function"]
        name = "not_offered" if fault is ReplyFault.UNKNOWN_TOOL else function.get("name")
        arguments = {} if fault is ReplyFault.BAD_ARGUMENTS else instance_of(function.get("parameters"))
        calls.append({"function": {"index": index, "name": name, "arguments": arguments}})
    return calls


def format_pieces(body: dict[str, Any], fault: ReplyFault) -> list[str] | None:
    """The text pieces of a reply under ``format`` (None without one): JSON, cut in small pieces."""
    schema = body.get("format")
    if schema is None:
        return None
    if fault is ReplyFault.NOT_JSON:
        return ["not", " json"]
    value = instance_of(schema) if isinstance(schema, dict) else {"answer": _WORD}
    text = orjson.dumps(value).decode()
    return [text[i : i + 5] for i in range(0, len(text), 5)]
