"""The contract files, generated from the message models: a JSON Schema and an AsyncAPI 3.0 document.

`json_schema()` describes every message (``$defs`` holds each model and the ``ClientMessage``,
``ServerMessage`` and ``LoggedMessage`` unions); `asyncapi()` describes the WebSocket channel and
the SSE channels with the same schemas. Server messages are described as `protocol.codec.encode`
writes them: optional fields are absent rather than ``null``, every other field is present.
`write` puts both, stable and sorted, into ``protocol/schema/`` where the repository commits them
(``python -m protocol.schema``; a test fails when they drift from the code). This module only
reads the models: it never changes what is accepted or sent.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, TypeAdapter

from protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    Classification,
    Classify,
    ClientMessage,
    Delta,
    Done,
    Embed,
    Embedding,
    Error,
    Generate,
    Goaway,
    Hello,
    Ping,
    Pong,
    ServerMessage,
    ToolCall,
    Welcome,
)

__all__ = ["ASYNCAPI_FILE", "DEFAULT_DIRECTORY", "SCHEMA_FILE", "asyncapi", "json_schema", "render", "write"]

SCHEMA_FILE: Final = "messages.schema.json"
ASYNCAPI_FILE: Final = "asyncapi.json"
DEFAULT_DIRECTORY: Final = Path(__file__).parent / "schema"

_CLIENT: Final[tuple[type[BaseModel], ...]] = (Hello, Generate, Embed, Classify, Cancel, Ping, Ack)
_LOGGED: Final[tuple[type[BaseModel], ...]] = (
    Delta,
    ToolCall,
    Done,
    Embedding,
    Classification,
    Error,
    Goaway,
)
_SERVER: Final[tuple[type[BaseModel], ...]] = (
    Welcome,
    Delta,
    ToolCall,
    Done,
    Embedding,
    Classification,
    Error,
    Pong,
    Goaway,
)

# One line per message for the AsyncAPI document (PROTOCOL.md §1 says it at length).
_SUMMARIES: Final[dict[str, str]] = {
    "hello": "Optional handshake: resume a session (session, last_seq) and authenticate.",
    "generate": "Stream generated text (and tool calls) for a prompt or a list of chat messages.",
    "embed": "Vectors, one per input text.",
    "classify": "Zero-shot scores per label, one result list per input.",
    "cancel": "Cancel the request with that id (idempotent).",
    "ping": "Answered by pong with the same nonce.",
    "ack": "The client has every event up to seq; the server may drop them from the replay log.",
    "welcome": "First message of every connection: the session, whether it resumed, limits, models.",
    "delta": "The next piece of generated text of request id.",
    "tool_call": "One complete tool call of generate id (index from 0 within it; call_id made by the server).",
    "done": "Terminal message of a generate.",
    "embedding": "Terminal message of an embed.",
    "classification": "Terminal message of a classify, results sorted by score, descending.",
    "error": "With id: the terminal message of that request. Without id: a refused message (ref = its id).",
    "pong": "Answer to ping.",
    "goaway": "The server is draining: finish reading, then reconnect and resume.",
}


def _message_type(model: type[BaseModel]) -> str:
    annotation = model.model_fields["type"].annotation
    return str(annotation.__args__[0])  # type: ignore[union-attr]  # Literal["..."]


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _nested_models(models: tuple[type[BaseModel], ...]) -> set[type[BaseModel]]:
    """The models and every model their fields hold (Usage inside Done, and so on)."""
    found: set[type[BaseModel]] = set()
    todo = list(models)
    while todo:
        model = todo.pop()
        if model in found:
            continue
        found.add(model)
        for field in model.model_fields.values():
            todo.extend(_models_in(field.annotation))
    return found


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in getattr(annotation, "__args__", ()):
        yield from _models_in(arg)


def _as_sent(definition: dict[str, Any], model: type[BaseModel]) -> None:
    """Rewrite a server model's schema to what `encode` writes: optional-None fields become
    absent-or-non-null, every other field (defaults included) is required."""
    required: list[str] = []
    for name, field in model.model_fields.items():
        prop = definition["properties"][name]
        if not field.is_required() and field.default is None:
            prop.pop("default", None)
            variants = [v for v in prop.pop("anyOf") if v != {"type": "null"}]
            if len(variants) == 1:
                prop.update(variants[0])
            else:
                prop["anyOf"] = variants
        else:
            prop.pop("default", None)
            required.append(name)
    definition["required"] = required


def _tighten_client(defs: dict[str, Any]) -> None:
    """What the model validators check, said in JSON Schema where it can be said."""
    defs["Generate"]["oneOf"] = [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
    ]
    labels = defs["Classify"]["properties"]["labels"]
    labels["uniqueItems"] = True
    # Tool parameters are an object schema (the meta-schema check itself is not said here).
    parameters = defs["ToolFunction"]["properties"]["parameters"]["anyOf"][0]
    parameters.update({"properties": {"type": {"const": "object"}}, "required": ["type"]})


def _union(models: tuple[type[BaseModel], ...], ref: str) -> dict[str, Any]:
    return {
        "oneOf": [{"$ref": ref.format(model=model.__name__)} for model in models],
        "discriminator": {
            "propertyName": "type",
            "mapping": {_message_type(m): ref.format(model=m.__name__) for m in models},
        },
    }


def _definitions(ref: str) -> dict[str, Any]:
    client = TypeAdapter(ClientMessage).json_schema(ref_template=ref, mode="validation")
    server = TypeAdapter(ServerMessage).json_schema(ref_template=ref, mode="serialization")
    defs: dict[str, Any] = dict(client.pop("$defs"))
    for name, definition in server.pop("$defs").items():
        if name in defs and defs[name] != definition:
            raise RuntimeError(f"two different schemas named {name}")
        defs[name] = definition
    for model in _nested_models(_SERVER):
        _as_sent(defs[model.__name__], model)
    _tighten_client(defs)
    for node in _walk(defs):
        # Property titles ("Retry After Ms") add nothing, and type generators turn each into a
        # needless named type; model titles stay.
        for prop in node.get("properties", {}).values():
            prop.pop("title", None)
    defs["ClientMessage"] = _union(_CLIENT, ref)
    defs["ServerMessage"] = _union(_SERVER, ref)
    defs["LoggedMessage"] = _union(_LOGGED, ref)
    return defs


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of every message; the document validates any one client or server message."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:sluice:protocol:{PROTOCOL_VERSION}:messages",
        "title": f"sluice protocol v{PROTOCOL_VERSION} messages",
        "description": "Every message of the sluice protocol: $defs/ClientMessage (client to server), "
        "$defs/ServerMessage (server to client), $defs/LoggedMessage (server messages that carry seq).",
        "oneOf": [{"$ref": "#/$defs/ClientMessage"}, {"$ref": "#/$defs/ServerMessage"}],
        "$defs": _definitions("#/$defs/{model}"),
    }


def _asyncapi_schemas() -> dict[str, Any]:
    schemas = _definitions("#/components/schemas/{model}")
    for node in _walk(schemas):
        # AsyncAPI's schema dialect (JSON Schema draft-07 plus extras) takes the discriminator
        # as the property name alone.
        if isinstance(node.get("discriminator"), dict):
            node["discriminator"] = node["discriminator"]["propertyName"]
    return schemas


def _message_refs(models: tuple[type[BaseModel], ...], channel: str) -> list[dict[str, str]]:
    return [{"$ref": f"#/channels/{channel}/messages/{_message_type(m)}"} for m in models]


def _channel_messages(models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    return {_message_type(m): {"$ref": f"#/components/messages/{_message_type(m)}"} for m in models}


def asyncapi() -> dict[str, Any]:
    """AsyncAPI 3.0 document of the WebSocket and SSE channels, seen from the server's side:
    ``receive`` operations are what the server reads, ``send`` operations what it writes."""
    every = (*_CLIENT, *_SERVER)
    posted = _CLIENT[1:]  # every client message but hello, which opens the session instead
    session_param = {"session": {"description": "The session id from welcome.session."}}
    http = "0.3.0"
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "sluice",
            "version": str(PROTOCOL_VERSION),
            "description": "Realtime AI inference over one session: streamed tokens, embeddings and "
            "classifications. The same messages and seq numbers travel over the WebSocket and the "
            "SSE + POST fallback; a session may move between them and resume after last_seq. "
            "Operations are described from the server's side.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "websocket": {"host": "localhost:8000", "protocol": "ws", "description": "WebSocket transport."},
            "http": {"host": "localhost:8000", "protocol": "http", "description": "SSE + POST transport."},
        },
        "channels": {
            "websocket": {
                "address": "/v1/ws",
                "title": "WebSocket session",
                "description": "One JSON message per text frame; subprotocol sluice.v1.",
                "servers": [{"$ref": "#/servers/websocket"}],
                "messages": _channel_messages(every),
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "query": {
                            "type": "object",
                            "properties": {
                                "ticket": {"type": "string", "description": "Short-lived ticket."}
                            },
                        },
                        "bindingVersion": "0.1.0",
                    }
                },
            },
            "sessions": {
                "address": "/v1/sessions",
                "title": "Open an SSE session",
                "description": "POST a hello; the 201 response body is the welcome.",
                "servers": [{"$ref": "#/servers/http"}],
                "messages": _channel_messages((Hello, Welcome)),
            },
            "sessionEvents": {
                "address": "/v1/sessions/{session}/events",
                "title": "SSE events of a session",
                "description": "text/event-stream; each event is id: <seq>, event: <type>, data: <json>. "
                "Honours Last-Event-ID and ?last_event_id=.",
                "servers": [{"$ref": "#/servers/http"}],
                "parameters": session_param,
                "messages": _channel_messages(_LOGGED),
            },
            "sessionMessages": {
                "address": "/v1/sessions/{session}/messages",
                "title": "Client messages of a session",
                "description": "POST one client message or a JSON array of them; 202 {accepted: [ids]}.",
                "servers": [{"$ref": "#/servers/http"}],
                "parameters": session_param,
                "messages": _channel_messages(posted),
            },
        },
        "operations": {
            "receiveWebSocket": {
                "action": "receive",
                "channel": {"$ref": "#/channels/websocket"},
                "summary": "Client messages on the WebSocket.",
                "messages": _message_refs(_CLIENT, "websocket"),
            },
            "sendWebSocket": {
                "action": "send",
                "channel": {"$ref": "#/channels/websocket"},
                "summary": "Server messages on the WebSocket: welcome first, then numbered events and pongs.",
                "messages": _message_refs(_SERVER, "websocket"),
            },
            "openSession": {
                "action": "receive",
                "channel": {"$ref": "#/channels/sessions"},
                "summary": "Open or resume a session for SSE.",
                "messages": _message_refs((Hello,), "sessions"),
                "reply": {
                    "channel": {"$ref": "#/channels/sessions"},
                    "messages": _message_refs((Welcome,), "sessions"),
                },
                "bindings": {"http": {"method": "POST", "bindingVersion": http}},
            },
            "sendSessionEvents": {
                "action": "send",
                "channel": {"$ref": "#/channels/sessionEvents"},
                "summary": "The session's numbered events, replayed after Last-Event-ID, then live.",
                "messages": _message_refs(_LOGGED, "sessionEvents"),
                "bindings": {"http": {"method": "GET", "bindingVersion": http}},
            },
            "receiveSessionMessages": {
                "action": "receive",
                "channel": {"$ref": "#/channels/sessionMessages"},
                "summary": "Client messages posted to a session.",
                "messages": _message_refs(posted, "sessionMessages"),
                "bindings": {"http": {"method": "POST", "bindingVersion": http}},
            },
        },
        "components": {
            "schemas": _asyncapi_schemas(),
            "messages": {
                _message_type(m): {
                    "name": _message_type(m),
                    "title": m.__name__,
                    "summary": _SUMMARIES[_message_type(m)],
                    "contentType": "application/json",
                    "payload": {"$ref": f"#/components/schemas/{m.__name__}"},
                }
                for m in every
            },
        },
    }


def _dump(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render() -> dict[str, str]:
    """File name → exact text of each contract file."""
    return {SCHEMA_FILE: _dump(json_schema()), ASYNCAPI_FILE: _dump(asyncapi())}


def write(directory: Path | str = DEFAULT_DIRECTORY) -> list[Path]:
    """Write the contract files into `directory` (created if needed); returns their paths."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = target / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIRECTORY):
        print(path)
