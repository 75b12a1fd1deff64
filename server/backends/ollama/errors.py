"""Everything that can go wrong talking to Ollama, and the one function that turns it into a `SluiceError`.

The Ollama client raises foreign exceptions (httpx, orjson) and the small local ones defined here
(a bad status, an ``{"error": ...}`` line, a stalled stream); `translate` is the only place any of
them becomes a protocol error code. It must never copy foreign exception text into a message: only
Ollama's own ``error`` string may pass through (truncated), and only as an ``upstream_error`` or
``invalid_request`` message.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Literal

import httpx
import orjson

from protocol.errors import ErrorCode, SluiceError

__all__ = [
    "MalformedResponse",
    "NoUpstream",
    "StreamEnded",
    "StreamStalled",
    "UpstreamErrorLine",
    "UpstreamStatus",
    "error_text",
    "retry_after_ms",
    "translate",
]

# Ollama's own error strings are short; this keeps a runaway upstream from filling client frames.
_MAX_UPSTREAM_TEXT = 200


class UpstreamStatus(Exception):
    """Ollama answered with a non-200 status before streaming began."""

    def __init__(self, status: int, error: str | None, retry_after_ms: int | None) -> None:
        super().__init__(status)
        self.status = status
        self.error = error
        self.retry_after_ms = retry_after_ms


class UpstreamErrorLine(Exception):
    """An ``{"error": ...}`` line in a stream that had already begun (status 200)."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class MalformedResponse(Exception):
    """A line or body that is not the JSON shape OLLAMA.md describes."""


class StreamStalled(Exception):
    """Upstream sent nothing for too long: before the first piece, or between pieces."""

    def __init__(self, phase: Literal["first_token", "idle"], seconds: float) -> None:
        super().__init__(phase)
        self.phase = phase
        self.seconds = seconds


class StreamEnded(Exception):
    """The response ended cleanly but without its final ``done`` line."""


class NoUpstream(Exception):
    """No Ollama base URL is configured."""


def error_text(raw: bytes) -> str | None:
    """Ollama's ``error`` string from an error body, or None when the body is not that shape."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, str):
            return error
    return None


def retry_after_ms(value: str | None) -> int | None:
    """Milliseconds from a Retry-After header (delta seconds or an HTTP date), None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) * 1000
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0, int((when.timestamp() - time.time()) * 1000))


def _clip(text: str | None, fallback: str) -> str:
    if not text:
        return fallback
    return text if len(text) <= _MAX_UPSTREAM_TEXT else text[: _MAX_UPSTREAM_TEXT - 1] + "…"


def _from_status(exc: UpstreamStatus, model: str | None) -> SluiceError:
    status = exc.status
    if status == 404:
        return SluiceError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} is not available upstream")
    if status == 503:
        return SluiceError(
            ErrorCode.OVERLOADED, "upstream is busy, try again later", retry_after_ms=exc.retry_after_ms
        )
    if status == 429:
        return SluiceError(
            ErrorCode.RATE_LIMITED, "upstream rate limit reached", retry_after_ms=exc.retry_after_ms
        )
    if status in (400, 422):
        return SluiceError(ErrorCode.INVALID_REQUEST, _clip(exc.error, "upstream rejected the request"))
    if status in (502, 504):
        # A proxy in front of Ollama answering for a backend it cannot reach.
        return SluiceError(ErrorCode.UPSTREAM_UNAVAILABLE, f"upstream gateway answered {status}")
    return SluiceError(ErrorCode.UPSTREAM_ERROR, _clip(exc.error, f"upstream answered {status}"))


def translate(exc: BaseException, *, model: str | None = None) -> SluiceError:
    """The `SluiceError` a client sees for anything raised while talking to Ollama."""
    match exc:
        case SluiceError():
            return exc
        case UpstreamStatus():
            return _from_status(exc, model)
        case UpstreamErrorLine():
            return SluiceError(ErrorCode.UPSTREAM_ERROR, _clip(exc.error, "upstream failed mid-stream"))
        case StreamStalled(phase="first_token"):
            return SluiceError(ErrorCode.TIMEOUT, f"no output from upstream within {exc.seconds:g} s")
        case StreamStalled():
            return SluiceError(ErrorCode.TIMEOUT, f"upstream went silent for {exc.seconds:g} s mid-stream")
        case MalformedResponse() | orjson.JSONDecodeError():
            return SluiceError(ErrorCode.UPSTREAM_ERROR, "upstream sent a malformed response")
        case StreamEnded():
            return SluiceError(ErrorCode.UPSTREAM_UNAVAILABLE, "upstream ended the stream before it finished")
        case NoUpstream():
            return SluiceError(ErrorCode.UPSTREAM_UNAVAILABLE, "no Ollama server is configured")
        case httpx.ConnectTimeout():
            return SluiceError(ErrorCode.TIMEOUT, "connecting to upstream timed out")
        case httpx.PoolTimeout():
            # Every pooled connection is busy: this server has more streams open than it allows.
            return SluiceError(ErrorCode.OVERLOADED, "too many upstream requests in flight")
        case httpx.TimeoutException():
            return SluiceError(ErrorCode.TIMEOUT, "upstream timed out")
        case httpx.ConnectError():
            return SluiceError(ErrorCode.UPSTREAM_UNAVAILABLE, "cannot connect to upstream")
        case httpx.TransportError():
            # Read/write errors, a connection dropped mid-body, a protocol violation.
            return SluiceError(ErrorCode.UPSTREAM_UNAVAILABLE, "connection to upstream was lost")
        case _:
            return SluiceError.internal()
