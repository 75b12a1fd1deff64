"""The closed set of error codes of PROTOCOL.md and the one exception type that carries them.

Every failure that reaches a client is a `SluiceError` with one of these codes. Code outside
`protocol/` translates foreign exceptions into it in exactly one place per boundary; nothing here
ever holds exception text from a foreign library (``internal`` errors carry a fixed message).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["INTERNAL_MESSAGE", "ErrorCode", "SluiceError", "is_retryable"]


class ErrorCode(StrEnum):
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    DUPLICATE_ID = "duplicate_id"
    MESSAGE_TOO_LARGE = "message_too_large"
    TOO_MANY_INFLIGHT = "too_many_inflight"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    INVALID_REQUEST = "invalid_request"
    MODEL_NOT_FOUND = "model_not_found"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_ERROR = "upstream_error"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    SLOW_CONSUMER = "slow_consumer"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


# Retrying the same message later can succeed for these; for the rest the client must change
# something first (or, for ``cancelled``, it asked for the outcome it got).
_RETRYABLE: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.TOO_MANY_INFLIGHT,
        ErrorCode.RATE_LIMITED,
        ErrorCode.UPSTREAM_UNAVAILABLE,
        ErrorCode.OVERLOADED,
        ErrorCode.TIMEOUT,
        ErrorCode.SLOW_CONSUMER,
        ErrorCode.SHUTTING_DOWN,
    }
)

INTERNAL_MESSAGE = "internal server error"


def is_retryable(code: ErrorCode) -> bool:
    """Whether an error with this code is retryable when nothing more specific is known."""
    return code in _RETRYABLE


class SluiceError(Exception):
    """A failure with a protocol error code, safe to show to the client as it is.

    ``message`` must never contain text taken from a foreign exception for ``internal``; use
    `SluiceError.internal()` there.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after_ms: int | None = None,
        ref: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = is_retryable(code) if retryable is None else retryable
        self.retry_after_ms = retry_after_ms
        self.ref = ref

    @classmethod
    def internal(cls) -> SluiceError:
        return cls(ErrorCode.INTERNAL, INTERNAL_MESSAGE)

    def __repr__(self) -> str:
        return f"SluiceError({self.code.value!r}, {self.message!r}, retryable={self.retryable})"
