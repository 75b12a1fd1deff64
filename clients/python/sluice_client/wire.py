"""The client's edge of the wire: its messages to JSON, the server's JSON to protocol models.

The models are the ``protocol`` package's own (`protocol.messages`), never copies. Server models
there forbid unknown fields (the server builds them), while a client must ignore fields a newer
server adds (PROTOCOL.md §1), so `decode` drops unknown keys, at every level, before validating.
A message type this client does not know becomes `Unknown`, which still carries its ``seq`` so
resuming never asks for it again. Nothing here does I/O or keeps state.
"""

from __future__ import annotations

import base64
import binascii
import types
import typing
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, Union

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import BaseModel, ValidationError

from protocol.errors import ErrorCode
from protocol.messages import (
    Ack,
    Cancel,
    Classification,
    Classify,
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
    ToolCall,
    Welcome,
)

__all__ = [
    "ClientMessage",
    "Logged",
    "ServerEvent",
    "Unknown",
    "WireError",
    "decode",
    "decode_object",
    "encode",
    "to_plain",
    "vectors",
]

ClientMessage: TypeAlias = Hello | Generate | Embed | Classify | Cancel | Ping | Ack


@dataclass(frozen=True, slots=True)
class Unknown:
    """A server message of a type this client does not know (a newer server); only its seq matters."""

    type: str
    seq: int | None


Logged: TypeAlias = Delta | ToolCall | Done | Embedding | Classification | Error | Goaway
ServerEvent: TypeAlias = Welcome | Pong | Logged | Unknown


class WireError(Exception):
    """The server sent something that is not a valid message (a server bug, or not a sluice server)."""


_SERVER_MODELS: Final[dict[str, type[BaseModel]]] = {
    "welcome": Welcome,
    "delta": Delta,
    "tool_call": ToolCall,
    "done": Done,
    "embedding": Embedding,
    "classification": Classification,
    "error": Error,
    "pong": Pong,
    "goaway": Goaway,
}
_ERROR_CODES: Final = frozenset(code.value for code in ErrorCode)


def to_plain(message: ClientMessage) -> dict[str, Any]:
    """The message as a JSON-ready dict, optional fields left out when unset."""
    return message.model_dump(mode="json", exclude_none=True)


def encode(message: ClientMessage) -> str:
    """Compact JSON for one client message."""
    return orjson.dumps(to_plain(message)).decode()


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold, looking through ``X | None`` and ``list[...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (list, Union, types.UnionType):
        return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]
    return []


_nested_cache: dict[type[BaseModel], dict[str, list[type[BaseModel]]]] = {}


def _nested(cls: type[BaseModel]) -> dict[str, list[type[BaseModel]]]:
    found = _nested_cache.get(cls)
    if found is None:
        found = {name: _models_in(field.annotation) for name, field in cls.model_fields.items()}
        found = _nested_cache[cls] = {name: models for name, models in found.items() if models}
    return found


def _prune(cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    fields = cls.model_fields
    nested = _nested(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            continue
        models = nested.get(key)
        if models is not None and len(models) == 1:
            value = _prune_value(models[0], value)
        out[key] = value
    return out


def _prune_value(cls: type[BaseModel], value: Any) -> Any:
    if isinstance(value, dict):
        return _prune(cls, value)
    if isinstance(value, list):
        return [_prune_value(cls, item) for item in value]
    return value


def decode_object(raw: Any) -> ServerEvent:
    """One parsed JSON value as a server message. Raises `WireError` when it is not one."""
    if not isinstance(raw, dict):
        raise WireError("server message is not a JSON object")
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise WireError("server message has no type")
    if (
        kind == "delta"
        and type(raw.get("seq")) is int
        and type(raw.get("text")) is str
        and type(raw.get("id")) is str
    ):
        # The hot path (once per token): the three fields are checked above.
        return Delta.model_construct(id=raw["id"], seq=raw["seq"], text=raw["text"])
    model = _SERVER_MODELS.get(kind)
    if model is None:
        seq = raw.get("seq")
        return Unknown(kind, seq if type(seq) is int else None)
    data = _prune(model, raw)
    if kind == "error" and data.get("code") not in _ERROR_CODES:
        # A code newer than this client: keep the message, treat the failure as unclassified.
        data["code"] = ErrorCode.INTERNAL.value
    try:
        return model.model_validate(data)  # type: ignore[return-value]  # a ServerEvent, by the table
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise WireError(f"invalid {kind} message from the server: {where}: {first['msg']}") from None


def decode(data: str | bytes) -> ServerEvent:
    """One server frame (JSON text) as a message. Raises `WireError`."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise WireError("server message is not valid JSON") from None
    return decode_object(raw)


def vectors(event: Embedding) -> npt.NDArray[np.float32]:
    """The embeddings of an ``embedding`` message as a float32 array of shape (n, dimensions).

    Handles both encodings: lists of floats, and base64 strings of little-endian float32.
    """
    rows = event.embeddings
    if not rows:
        return np.zeros((0, event.dimensions), dtype=np.float32)
    if isinstance(rows[0], str):
        try:
            raw = b"".join(base64.b64decode(row, validate=True) for row in rows)
        except (binascii.Error, TypeError):
            raise WireError("embedding is not valid base64") from None
        # A bytearray, so the array the caller gets is writable like any other.
        flat = np.frombuffer(bytearray(raw), dtype="<f4").astype(np.float32, copy=False)
    else:
        flat = np.asarray(rows, dtype=np.float32).reshape(-1)
    if flat.size != len(rows) * event.dimensions:
        raise WireError(f"embedding holds {flat.size} numbers, not {len(rows)} rows of {event.dimensions}")
    return flat.reshape(len(rows), event.dimensions)
