"""The public names of every protocol module, pinned: changing them is a contract change."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "protocol": [
        "close",
        "codec",
        "conversation",
        "errors",
        "eventlog",
        "lifecycle",
        "messages",
        "schema",
        "session",
        "sse",
        "tools",
    ],
    "protocol.close": ["CloseCode"],
    "protocol.codec": ["decode", "encode", "encode_delta"],
    "protocol.conversation": ["conversation", "own_turns"],
    "protocol.errors": ["INTERNAL_MESSAGE", "ErrorCode", "SluiceError", "is_retryable"],
    "protocol.eventlog": [
        "EventLog",
        "LogBudget",
        "MemoryEventLog",
        "Sheddable",
        "encoded_size",
        "memory_cost",
    ],
    "protocol.lifecycle": [
        "TERMINAL",
        "TRANSITIONS",
        "Event",
        "Lifecycle",
        "LifecycleError",
        "State",
        "next_state",
    ],
    "protocol.messages": [
        "MAX_INPUTS",
        "MAX_LABELS",
        "PROTOCOL_VERSION",
        "Ack",
        "Cancel",
        "ChatMessage",
        "Classification",
        "Classify",
        "ClientMessage",
        "Delta",
        "Done",
        "Embed",
        "Embedding",
        "Error",
        "FinishReason",
        "Generate",
        "GenerateOptions",
        "Goaway",
        "Hello",
        "LabelScore",
        "Limits",
        "LoggedMessage",
        "Models",
        "Ping",
        "Pong",
        "Request",
        "RequestId",
        "RequestKind",
        "ServerInfo",
        "ServerMessage",
        "Timings",
        "ToolCall",
        "Usage",
        "Welcome",
    ],
    "protocol.schema": [
        "ASYNCAPI_FILE",
        "DEFAULT_DIRECTORY",
        "SCHEMA_FILE",
        "asyncapi",
        "json_schema",
        "render",
        "write",
    ],
    "protocol.session": [
        "Accepted",
        "CancelRequested",
        "Ignored",
        "InflightRequest",
        "Outcome",
        "Refused",
        "Reply",
        "Session",
        "SessionLimits",
    ],
    "protocol.sse": ["encode_comment", "encode_event", "encode_message"],
    "protocol.tools": [
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
    ],
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_names_are_pinned_and_exist(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__ == PUBLIC[name]
    for attribute in module.__all__:
        if name == "protocol":
            importlib.import_module(f"protocol.{attribute}")
        else:
            assert hasattr(module, attribute), f"{name}.{attribute}"
    assert module.__doc__, f"{name} has no module docstring"
