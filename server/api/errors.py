"""Failures as HTTP answers: one place mapping a `SluiceError` to a status and a body per API family.

Every HTTP route of sluice belongs to one family, and each family has the error body its clients
already parse:

- ``sluice`` (the session transport over SSE and the seed-compatible ``/api/v1``):
  ``{"error": {"code", "message", "retryable", "retry_after_ms"?, "field"?, "ref"?, "seq"?}}``,
  the typed error of PROTOCOL.md (the same shape ``POST /v1/tickets`` answers with);
- ``openai``: ``{"error": {"message", "type", "param", "code"}}``, which the ``openai`` SDK turns
  into its typed exceptions;
- ``ollama``: ``{"error": "<message>"}``, which the ``ollama`` client raises as ``ResponseError``.

The status depends on the code only (`status_for`), except that a body that fails validation is
always 422 with the offending field named (`invalid_body`). ``Retry-After`` is set whenever the
error says when to retry. Nothing here logs, and nothing here ever puts exception text from a
foreign library into a body: only `SluiceError` messages, which are safe by contract.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Final

import orjson
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from protocol.errors import ErrorCode, SluiceError

__all__ = [
    "ErrorBody",
    "ErrorDetail",
    "Family",
    "FieldError",
    "OllamaErrorBody",
    "OpenAIErrorBody",
    "OpenAIErrorDetail",
    "StatusError",
    "error_body",
    "error_response",
    "field_of",
    "invalid_body",
    "json_response",
    "openai_error_type",
    "status_for",
    "validation_errors",
]


class Family(StrEnum):
    SLUICE = "sluice"
    OPENAI = "openai"
    OLLAMA = "ollama"


_STATUS: Final[dict[ErrorCode, int]] = {
    ErrorCode.INVALID_MESSAGE: 422,
    ErrorCode.UNKNOWN_TYPE: 422,
    ErrorCode.UNSUPPORTED_PROTOCOL: 400,
    ErrorCode.DUPLICATE_ID: 409,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.TOO_MANY_INFLIGHT: 429,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.UPSTREAM_UNAVAILABLE: 503,
    ErrorCode.UPSTREAM_ERROR: 502,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.TIMEOUT: 504,
    # What Ollama and nginx answer when the client went away first; nobody is left to read it.
    ErrorCode.CANCELLED: 499,
    ErrorCode.SLOW_CONSUMER: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.INTERNAL: 500,
}

_OPENAI_TYPES: Final[dict[int, str]] = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


class StatusError(SluiceError):
    """A `SluiceError` answered with a status of its own (404 for an unknown session or task,
    410 for a session whose missing events are gone), where the code alone does not say it."""

    def __init__(self, status: int, code: ErrorCode, message: str, **kwargs: Any) -> None:
        super().__init__(code, message, **kwargs)
        self.status = status


class FieldError(SluiceError):
    """A `SluiceError` about one request field, which the body names (``field``, OpenAI's ``param``)."""

    def __init__(self, field: str, code: ErrorCode, message: str, **kwargs: Any) -> None:
        super().__init__(code, message, **kwargs)
        self.field = field


def status_for(error: SluiceError | ErrorCode) -> int:
    """The HTTP status for an error (every code has one; a `StatusError` brings its own)."""
    if isinstance(error, StatusError):
        return error.status
    return _STATUS[error.code if isinstance(error, SluiceError) else error]


def openai_error_type(status: int) -> str:
    """OpenAI's ``error.type`` for a status, as its SDK and tools expect."""
    if status >= 500:
        return "server_error"
    return _OPENAI_TYPES.get(status, "invalid_request_error")


# ---------------------------------------------------------------------------------------------
# Bodies, as models for the OpenAPI document.


class ErrorDetail(BaseModel):
    code: ErrorCode
    message: str
    retryable: bool
    retry_after_ms: int | None = None
    field: str | None = None
    ref: str | None = None
    seq: int | None = None


class ErrorBody(BaseModel):
    """The typed error of PROTOCOL.md."""

    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


class OllamaErrorBody(BaseModel):
    error: str


def error_body(
    family: Family,
    error: SluiceError,
    *,
    status: int,
    field: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of ``error`` in ``family``'s shape (also used for errors inside streams)."""
    match family:
        case Family.SLUICE:
            detail: dict[str, Any] = {
                "code": error.code.value,
                "message": error.message,
                "retryable": error.retryable,
            }
            if error.retry_after_ms is not None:
                detail["retry_after_ms"] = error.retry_after_ms
            if field is not None:
                detail["field"] = field
            if error.ref is not None:
                detail["ref"] = error.ref
            if extra:
                detail.update(extra)
            return {"error": detail}
        case Family.OPENAI:
            return {
                "error": {
                    "message": error.message,
                    "type": openai_error_type(status),
                    "param": field,
                    "code": error.code.value,
                }
            }
        case Family.OLLAMA:
            return {"error": error.message}


def json_response(body: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response written with orjson (numpy-free, compact)."""
    return Response(
        content=orjson.dumps(body), status_code=status, headers=headers, media_type="application/json"
    )


def error_response(
    family: Family,
    error: SluiceError,
    *,
    status: int | None = None,
    field: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    """``error`` as a complete HTTP response of ``family``, with ``Retry-After`` when known."""
    status = status_for(error) if status is None else status
    if field is None and isinstance(error, FieldError):
        field = error.field
    headers: dict[str, str] = {}
    if error.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, -(-error.retry_after_ms // 1000)))
    if error.code is ErrorCode.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    body = error_body(family, error, status=status, field=field, extra=extra)
    return json_response(body, status, headers)


# ---------------------------------------------------------------------------------------------
# Validation failures: 422, naming the field.


def field_of(loc: Sequence[int | str]) -> str:
    """A pydantic/FastAPI error location as a dotted field path (``messages[0].content``), without
    the ``body`` prefix and without union member tags; a query, header or path parameter by its
    name."""
    path = ""
    parts = list(loc)
    if len(parts) > 1 and parts[0] in ("query", "header", "path", "cookie"):
        return str(parts[1])  # a parameter: its name as the client wrote it
    if parts and parts[0] == "body":
        parts = parts[1:]
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and not _is_type_tag(part):
            path += f".{part}" if path else part
    return path or "body"


def _is_type_tag(part: str) -> bool:
    # Union members appear in error locations ("input" → "str", "list[str]"); they are not fields.
    return part in {"str", "int", "float", "bool", "list", "dict", "none", "bytes"} or part.startswith(
        ("function-", "tagged-union", "json-or-python")
    )


def invalid_body(family: Family, errors: Sequence[Mapping[str, Any]]) -> Response:
    """The 422 answer for a body that failed validation, naming the first offending field."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid body"}
    field = field_of(tuple(first.get("loc", ("body",))))
    reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        field, reason = "body", "the body is not valid JSON"
    if len(reason) > 200:
        reason = reason[:199] + "…"
    error = SluiceError(ErrorCode.INVALID_REQUEST, f"invalid field {field!r}: {reason}")
    return error_response(family, error, status=422, field=field)


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """A pydantic `ValidationError` as plain error dicts, without the offending input echoed."""
    return [dict(item) for item in exc.errors(include_url=False, include_input=False, include_context=False)]
