"""Every message of PROTOCOL.md §1 as a pydantic v2 model, in closed discriminated unions.

Client messages are parsed strictly (a wrong type for a known field is an error, nothing is
coerced) and ignore unknown fields for forward compatibility. Server messages are built by the
server and never parsed from untrusted input. This module describes shapes only: it never
numbers, routes or sends anything (that is `protocol.session` and the server).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from protocol.errors import ErrorCode
from protocol.tools import (
    MAX_TOOLS,
    CallId,
    MessageToolCall,
    NamedToolChoice,
    Tool,
    ToolChoice,
    check_json_schema,
)

__all__ = [
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
]

PROTOCOL_VERSION = 1
MAX_INPUTS = 2048
MAX_LABELS = 64
MAX_STOP = 16

RequestId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]
# What a request asks for; each kind has its one terminal result message.
RequestKind = Literal["generate", "embed", "classify"]
Nonce = str | int


class _ClientModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class _ServerModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# Client → server


class ChatMessage(_ClientModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[MessageToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: CallId | None = None

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls are only allowed on assistant messages")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id is only allowed on tool messages")
        return self


class GenerateOptions(_ClientModel):
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    stop: list[str] | None = Field(default=None, max_length=MAX_STOP)
    seed: int | None = None


class Hello(_ClientModel):
    type: Literal["hello"]
    protocol: int = PROTOCOL_VERSION
    session: str | None = Field(default=None, min_length=1, max_length=128)
    last_seq: int | None = Field(default=None, ge=0)
    token: str | None = None
    client: str | None = Field(default=None, max_length=256)


class Generate(_ClientModel):
    type: Literal["generate"]
    id: RequestId
    model: str | None = Field(default=None, min_length=1, max_length=256)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    system: str | None = None
    options: GenerateOptions = GenerateOptions()
    format: Literal["json"] | dict[str, Any] | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    history: bool = False

    @field_validator("format", mode="before")
    @classmethod
    def _format_schema(cls, format: object) -> object:
        if isinstance(format, dict):
            return check_json_schema(format)
        if format is not None and format != "json":
            raise ValueError('format must be "json" or a JSON Schema (an object)')
        return format

    @field_validator("tools")
    @classmethod
    def _distinct_tools(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in tools or ()]
        if len(set(names)) != len(names):
            duplicate = next(name for name in names if names.count(name) > 1)
            raise ValueError(f"tool names must be distinct ({duplicate!r} is listed twice)")
        return tools

    @model_validator(mode="after")
    def _exactly_one_input(self) -> Generate:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt or messages is required")
        if self.tool_choice is not None:
            if self.tools is None:
                raise ValueError("tool_choice is only allowed with tools")
            if isinstance(self.tool_choice, NamedToolChoice):
                name = self.tool_choice.function.name
                if all(tool.function.name != name for tool in self.tools):
                    raise ValueError(f"tool_choice names {name!r}, which is not one of the tools")
        return self


Inputs = Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]


class Embed(_ClientModel):
    type: Literal["embed"]
    id: RequestId
    input: str | Inputs
    model: str | None = Field(default=None, min_length=1, max_length=256)
    normalize: bool = True
    encoding: Literal["float", "base64"] = "float"

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Classify(_ClientModel):
    type: Literal["classify"]
    id: RequestId
    input: str | Inputs
    labels: Annotated[
        list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=2, max_length=MAX_LABELS)
    ]
    multi_label: bool = False
    model: str | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _distinct_labels(self) -> Classify:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Cancel(_ClientModel):
    type: Literal["cancel"]
    id: RequestId


class Ping(_ClientModel):
    type: Literal["ping"]
    nonce: Nonce | None = None


class Ack(_ClientModel):
    type: Literal["ack"]
    seq: int = Field(ge=0)


ClientMessage: TypeAlias = Annotated[
    Hello | Generate | Embed | Classify | Cancel | Ping | Ack, Field(discriminator="type")
]
Request: TypeAlias = Generate | Embed | Classify


# ---------------------------------------------------------------------------------------------
# Server → client


class ServerInfo(_ServerModel):
    name: str = "sluice"
    version: str


class Limits(_ServerModel):
    max_message_bytes: int
    max_inflight: int
    replay_events: int
    # PROTOCOL.md §2; this server always sends it (absent only from peers that predate it).
    replay_bytes: int | None = None
    session_ttl_s: int
    # Optional extras (PROTOCOL.md §4 says every limit is announced here); absent when unlimited.
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    sessions_per_key: int | None = None
    max_buffered_bytes: int | None = None


class Models(_ServerModel):
    generate: list[str]
    embed: list[str]
    classify: list[str]


class Usage(_ServerModel):
    prompt_tokens: int
    completion_tokens: int


class Timings(_ServerModel):
    queue_ms: float
    ttft_ms: float | None
    total_ms: float


class LabelScore(_ServerModel):
    label: str
    score: float


class Welcome(_ServerModel):
    type: Literal["welcome"] = "welcome"
    session: str
    resumed: bool
    last_seq: int
    protocol: int = PROTOCOL_VERSION
    server: ServerInfo
    limits: Limits
    models: Models


class Delta(_ServerModel):
    type: Literal["delta"] = "delta"
    id: str
    seq: int
    text: str


class Done(_ServerModel):
    type: Literal["done"] = "done"
    id: str
    seq: int
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    model: str


class ToolCall(_ServerModel):
    type: Literal["tool_call"] = "tool_call"
    id: str
    seq: int
    index: int  # from 0 within the request
    call_id: str  # unique, made by the server: what a later tool message names
    name: str
    arguments: str  # a JSON text of an object


class Embedding(_ServerModel):
    type: Literal["embedding"] = "embedding"
    id: str
    seq: int
    model: str
    dimensions: int
    embeddings: list[list[float]] | list[str]


class Classification(_ServerModel):
    type: Literal["classification"] = "classification"
    id: str
    seq: int
    model: str
    results: list[list[LabelScore]]


class Error(_ServerModel):
    type: Literal["error"] = "error"
    id: str | None = None
    ref: str | None = None
    seq: int
    code: ErrorCode
    message: str
    retryable: bool
    retry_after_ms: int | None = None


class Pong(_ServerModel):
    type: Literal["pong"] = "pong"
    nonce: Nonce | None = None


class Goaway(_ServerModel):
    type: Literal["goaway"] = "goaway"
    seq: int
    reason: str
    retry_after_ms: int


LoggedMessage: TypeAlias = Delta | ToolCall | Done | Embedding | Classification | Error | Goaway
"""Server messages that carry `seq` and form the session's event log."""

ServerMessage: TypeAlias = Annotated[
    Welcome | Delta | ToolCall | Done | Embedding | Classification | Error | Pong | Goaway,
    Field(discriminator="type"),
]
