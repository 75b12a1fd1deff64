"""The client's one error type, and the failures that do not come from the server as messages.

Every failure a caller sees is a `SluiceError` — the very class of ``protocol.errors``, so
``except SluiceError`` catches the same thing on both sides — with ``code``, ``message``,
``retryable`` and ``retry_after_ms``. Server ``error`` messages become one in `from_wire`; the
failures of the client's own making (a session the server no longer has, a server that cannot be
reached, an HTTP refusal) are built here, so their codes and wording live in one place.

`TransportClosed` is internal: a transport raises it when it can no longer carry messages, and
the connection decides from it whether to reconnect, fall back to SSE, or give up. Nothing here
does I/O.
"""

from __future__ import annotations

from typing import Any

from protocol.errors import ErrorCode, SluiceError, is_retryable
from protocol.messages import Error

__all__ = [
    "ErrorCode",
    "SluiceError",
    "TransportClosed",
    "closed_with",
    "connection_failed",
    "from_body",
    "from_status",
    "from_wire",
    "invalid_argument",
    "session_lost",
    "taken_over",
]


class TransportClosed(Exception):
    """A transport stopped carrying messages (or could not start).

    ``error`` says why, as the caller would see it. ``fatal``: reconnecting cannot help (bad
    credentials, refused origin), so the session stops. ``fallback``: the server answered but would
    not upgrade to a WebSocket, so the SSE transport may work where this one did not.
    """

    def __init__(self, error: SluiceError, *, fatal: bool = False, fallback: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.fatal = fatal
        self.fallback = fallback


def from_wire(event: Error) -> SluiceError:
    """The exception for a server ``error`` message, keeping its code, retry hints and ``ref``."""
    return SluiceError(
        event.code,
        event.message,
        retryable=event.retryable,
        retry_after_ms=event.retry_after_ms,
        ref=event.ref if event.ref is not None else event.id,
    )


def session_lost() -> SluiceError:
    # Retryable: the request itself was fine; the server forgot the session (restart, expiry, or a
    # replay log that no longer reached back far enough), so sending it again can succeed.
    return SluiceError(
        ErrorCode.UPSTREAM_UNAVAILABLE,
        "the session was lost while this request was in flight (server restarted or the session "
        "expired); its output is incomplete — send the request again",
        retryable=True,
    )


def connection_failed(detail: str) -> SluiceError:
    return SluiceError(
        ErrorCode.UPSTREAM_UNAVAILABLE, f"cannot reach the sluice server: {detail}", retryable=True
    )


def taken_over() -> SluiceError:
    return SluiceError(
        ErrorCode.CANCELLED,
        "another connection took over this session (WebSocket close 4009); this client stopped using it",
        retryable=False,
    )


def invalid_argument(message: str) -> SluiceError:
    """A request the client will not send because the server would refuse it."""
    return SluiceError(ErrorCode.INVALID_MESSAGE, message, retryable=False)


_STATUS_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.INVALID_REQUEST,
    413: ErrorCode.MESSAGE_TOO_LARGE,
    422: ErrorCode.INVALID_MESSAGE,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.OVERLOADED,
    504: ErrorCode.TIMEOUT,
}


def from_body(body: Any) -> SluiceError | None:
    """A typed error from a JSON error body (``{code, message, ...}``, possibly under ``error``)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if not isinstance(body, dict):
        return None
    raw_code, message = body.get("code"), body.get("message")
    if not isinstance(raw_code, str) or raw_code not in ErrorCode.__members__.values():
        return None
    code = ErrorCode(raw_code)
    retryable = body.get("retryable")
    retry_after = body.get("retry_after_ms")
    ref = body.get("ref") if isinstance(body.get("ref"), str) else body.get("id")
    return SluiceError(
        code,
        message if isinstance(message, str) else code.value,
        retryable=retryable if isinstance(retryable, bool) else None,
        retry_after_ms=retry_after
        if isinstance(retry_after, int) and not isinstance(retry_after, bool)
        else None,
        ref=ref if isinstance(ref, str) else None,
    )


def from_status(status: int, body: Any = None, *, retry_after_s: str | None = None) -> SluiceError:
    """The error for an HTTP refusal: the typed body when the server sent one, else by status."""
    typed = from_body(body)
    if typed is not None:
        return typed
    code = _STATUS_CODES.get(status, ErrorCode.UPSTREAM_ERROR if status >= 500 else ErrorCode.INVALID_REQUEST)
    retry_after_ms = None
    if retry_after_s is not None and retry_after_s.strip().isdigit():
        retry_after_ms = int(retry_after_s.strip()) * 1000
    retryable = is_retryable(code) or status >= 500
    return SluiceError(
        code, f"the server answered HTTP {status}", retryable=retryable, retry_after_ms=retry_after_ms
    )


def closed_with(code: int | None, reason: str = "") -> TransportClosed:
    """What a close code (WebSocket close frame, or the SSE stream's ``close`` event) means."""
    match code:
        case 1008:
            lowered = reason.lower()
            kind = (
                ErrorCode.UNAUTHORIZED if "unauthor" in lowered or "token" in lowered else ErrorCode.FORBIDDEN
            )
            return TransportClosed(
                SluiceError(kind, reason or "refused by policy", retryable=False), fatal=True
            )
        case 4009:
            return TransportClosed(taken_over(), fatal=True)
        case 4008:
            return TransportClosed(SluiceError(ErrorCode.SLOW_CONSUMER, "the client read too slowly"))
        case 1009:
            return TransportClosed(SluiceError(ErrorCode.MESSAGE_TOO_LARGE, "a message was too large"))
        case 1001 | 1012:
            return TransportClosed(SluiceError(ErrorCode.SHUTTING_DOWN, reason or "the server is going away"))
        case None | 1006:
            return TransportClosed(connection_failed("the connection was lost"))
        case _:
            return TransportClosed(connection_failed(f"the connection closed (code {code})"))
