"""Text ↔ message at the edge: `decode` client frames into models, `encode` server models to JSON.

`decode` is the one place untrusted bytes become a `ClientMessage`; every failure leaves it as a
`SluiceError` with a protocol code (``message_too_large``, ``invalid_message``, ``unknown_type``,
``unsupported_protocol``) whose message names the offending field but never echoes large input
back. `encode` writes compact JSON with orjson, dropping optional fields that are ``None``; a
`Delta` (one per streamed token) takes a hand-written fast path. Nothing here routes, numbers or
sends: that is `protocol.session` and the transports.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from pydantic import BaseModel, ValidationError

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    Classify,
    ClientMessage,
    Delta,
    Embed,
    Generate,
    Hello,
    LoggedMessage,
    Ping,
    ServerMessage,
)

__all__ = ["decode", "encode", "encode_delta"]

_CLIENT_MODELS: Final[dict[str, type[BaseModel]]] = {
    "hello": Hello,
    "generate": Generate,
    "embed": Embed,
    "classify": Classify,
    "cancel": Cancel,
    "ping": Ping,
    "ack": Ack,
}

# What of the client's own input may appear in an error message: enough to recognise, never a
# megabyte reflected back.
_MAX_ECHO = 64
# Ids up to this length are echoed whole in `ref`; longer ones are cut but stay longer than any
# valid id (64), so a cut ref can never be mistaken for a request that is really in flight.
_MAX_REF = 128
# Union members appear in pydantic's error locations ("input" → "str"); they are not fields.
_TYPE_TAGS: Final = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})


def _echo(text: str, limit: int = _MAX_ECHO) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _utf8_size_exceeds(data: str | bytes, max_bytes: int) -> bool:
    if isinstance(data, bytes | bytearray | memoryview):
        return len(data) > max_bytes
    # A character is 1 to 4 bytes in UTF-8: most frames are decided without encoding them.
    if len(data) > max_bytes:
        return True
    if len(data) * 4 <= max_bytes:
        return False
    return len(data.encode("utf-8", "surrogatepass")) > max_bytes


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path


def _invalid_field(kind: str, exc: ValidationError, ref: str | None) -> SluiceError:
    first = exc.errors(include_url=False, include_input=False, include_context=False)[0]
    message = _echo(str(first["msg"]).removeprefix("Value error, "), 200)
    field = _field_path(tuple(first["loc"]))
    where = f"field {field!r}" if field else f"{kind} message"
    return SluiceError(ErrorCode.INVALID_MESSAGE, f"invalid {where}: {message}", ref=ref)


def decode(data: str | bytes, *, max_bytes: int) -> ClientMessage:
    """Parse one client frame. Raises `SluiceError`; its ``ref`` holds the frame's string ``id``."""
    if _utf8_size_exceeds(data, max_bytes):
        raise SluiceError(ErrorCode.MESSAGE_TOO_LARGE, f"message exceeds {max_bytes} bytes")
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise SluiceError(ErrorCode.INVALID_MESSAGE, "message is not valid JSON") from None
    if not isinstance(raw, dict):
        raise SluiceError(ErrorCode.INVALID_MESSAGE, "message must be a JSON object")
    raw_id = raw.get("id")
    ref = _echo(raw_id, _MAX_REF) if isinstance(raw_id, str) else None
    kind = raw.get("type")
    if not isinstance(kind, str):
        what = "missing" if kind is None else "not a string"
        raise SluiceError(ErrorCode.INVALID_MESSAGE, f"invalid field 'type': {what}", ref=ref)
    model = _CLIENT_MODELS.get(kind)
    if model is None:
        raise SluiceError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {_echo(kind)!r}", ref=ref)
    try:
        message = model.model_validate(raw)
    except ValidationError as exc:
        raise _invalid_field(kind, exc, ref) from None
    if isinstance(message, Hello) and message.protocol != PROTOCOL_VERSION:
        raise SluiceError(
            ErrorCode.UNSUPPORTED_PROTOCOL,
            f"protocol {message.protocol} is not supported (this server speaks {PROTOCOL_VERSION})",
        )
    return message  # type: ignore[return-value]  # one of the ClientMessage models, by the table


def _optional_fields(cls: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for name, field in cls.model_fields.items() if not field.is_required())


_optional_cache: dict[type[BaseModel], frozenset[str]] = {}


def _plain(model: BaseModel) -> dict[str, Any]:
    """The model as a dict orjson can write: optional ``None`` fields left out, required ones kept."""
    cls = type(model)
    optional = _optional_cache.get(cls)
    if optional is None:
        optional = _optional_cache[cls] = _optional_fields(cls)
    out: dict[str, Any] = {}
    for name, value in model.__dict__.items():
        if value is None:
            if name in optional:
                continue
        elif isinstance(value, BaseModel):
            value = _plain(value)
        elif isinstance(value, list) and value and isinstance(value[0], list | BaseModel):
            value = [_plain_item(item) for item in value]
        out[name] = value
    return out


def _plain_item(item: Any) -> Any:
    if isinstance(item, BaseModel):
        return _plain(item)
    if isinstance(item, list) and item and isinstance(item[0], BaseModel):
        return [_plain(inner) for inner in item]
    return item


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def encode(message: ServerMessage | LoggedMessage) -> str:
    """Compact JSON for one server message."""
    if type(message) is Delta:
        return encode_delta(message.id, message.seq, message.text)
    return _dumps(_plain(message))


def encode_delta(request_id: str, seq: int, text: str) -> str:
    """`encode` of ``Delta(id=request_id, seq=seq, text=text)``, from its fields (the hot path,
    once per token: one orjson call, no model)."""
    return orjson.dumps({"type": "delta", "id": request_id, "seq": seq, "text": text}).decode()
