"""Tools and structured outputs in client messages: tool definitions, the calls an assistant turn
made, ``tool_choice``, and the JSON Schema checks behind ``format`` and tool ``parameters``.

These are shapes and checks only, parsed strictly like every client message (`protocol.messages`
holds the messages that carry them). A schema is checked against its meta-schema here, at the
edge, so that no backend ever receives an invalid one; whether a backend can *enforce* a valid
schema or a ``tool_choice`` is the backend's to say, never this module's.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, StringConstraints, field_validator

__all__ = [
    "MAX_SCHEMA_DEPTH",
    "MAX_TOOLS",
    "CallId",
    "FunctionCall",
    "FunctionName",
    "MessageToolCall",
    "NamedToolChoice",
    "Tool",
    "ToolChoice",
    "ToolFunction",
    "ToolName",
    "check_json_schema",
]

MAX_TOOLS = 128
# Nesting a JSON Schema may have (objects and arrays inside each other); deeper is refused
# before the meta-schema check, which recurses.
MAX_SCHEMA_DEPTH = 64


class _ClientModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


def _depth(node: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted up to ``limit + 1`` at most."""
    deepest, todo = 0, [(node, 1)]
    while todo:
        value, level = todo.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, level)
            if level > limit:
                break
            children = value.values() if isinstance(value, dict) else value
            todo.extend((child, level + 1) for child in children)
    return deepest


# Keywords whose values are data, not schemas: a "$ref" inside them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def _refs(node: Any) -> list[str]:
    """Every ``$ref`` of a schema, outside the keywords that hold data."""
    found: list[str] = []
    todo = [node]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            ref = value.get("$ref")
            if isinstance(ref, str):
                found.append(ref)
            todo.extend(child for key, child in value.items() if key not in _DATA_KEYWORDS)
        elif isinstance(value, list):
            todo.extend(value)
    return found


def _resolves(schema: dict[str, Any], ref: str) -> bool:
    """Whether a local ``$ref`` (``#``, ``#/json/pointer`` or ``#anchor``) names a part of ``schema``."""
    if ref in ("#", ""):
        return True
    if ref.startswith("#/"):
        node: Any = schema
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return False
        return isinstance(node, dict | bool)
    anchor = ref[1:]
    todo: list[Any] = [schema]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            if value.get("$anchor") == anchor or value.get("$dynamicAnchor") == anchor:
                return True
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
    return False


def check_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` if it is a valid JSON Schema (by the meta-schema of its ``$schema``, 2020-12 when
    it names none) whose every ``$ref`` points inside it (nothing is fetched: a remote or dangling
    reference could never be checked); ValueError saying what is wrong otherwise."""
    # jsonschema is pure Python (no I/O); imported here so that loading the protocol stays cheap.
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import Draft202012Validator, validator_for

    if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"JSON Schema nested deeper than {MAX_SCHEMA_DEPTH} levels")
    declared = schema.get("$schema")
    if declared is not None and not isinstance(declared, str):
        raise ValueError("invalid JSON Schema: $schema must be a string")
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path)
        at = f" at {where!r}" if where else ""
        raise ValueError(f"invalid JSON Schema{at}: {exc.message[:120]}") from None
    for ref in _refs(schema):
        if not ref.startswith("#"):
            raise ValueError(
                f"JSON Schema $ref {ref[:60]!r} is not local: only references inside the schema (#...)"
            )
        if not _resolves(schema, ref):
            raise ValueError(f"JSON Schema $ref {ref[:60]!r} points to nothing in the schema")
    return schema


ToolName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
CallId = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class FunctionCall(_ClientModel):
    name: ToolName
    arguments: str  # a JSON text of an object

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            parsed = json.loads(arguments)
        except ValueError:
            raise ValueError("arguments must be a JSON text of an object") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON text of an object")
        return arguments


class MessageToolCall(_ClientModel):
    """A call an assistant turn made, sent back in a later request; id is its call_id."""

    id: CallId
    type: Literal["function"]
    function: FunctionCall


class ToolFunction(_ClientModel):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        if parameters is None:
            return None
        if parameters.get("type") != "object":
            raise ValueError('parameters must be an object schema ("type": "object")')
        return check_json_schema(parameters)


class Tool(_ClientModel):
    type: Literal["function"]
    function: ToolFunction


class FunctionName(_ClientModel):
    name: ToolName


class NamedToolChoice(_ClientModel):
    type: Literal["function"]
    function: FunctionName


# "auto" (the default): text or calls, the model's choice; "none": text only; "required": at
# least one call; a named function: a call of that tool.
ToolChoice: TypeAlias = Literal["auto", "none", "required"] | NamedToolChoice
