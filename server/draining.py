"""Whether this server is draining, and what new work is told while it is: one source of truth.

`server.shutdown.Drainer` begins the drain; the dispatcher (new requests), the transports (new
connections and sessions) and ``/ready`` only read it. Nothing here waits, closes or sends.
"""

from __future__ import annotations

from protocol.errors import ErrorCode, SluiceError

__all__ = ["GOAWAY_RETRY_MS", "DrainState", "shutting_down"]

# What goaway and the shutting-down error tell clients to wait before reconnecting elsewhere.
GOAWAY_RETRY_MS = 500


def shutting_down() -> SluiceError:
    """The error for new work and new connections while the server drains (retryable)."""
    return SluiceError(ErrorCode.SHUTTING_DOWN, "the server is shutting down", retry_after_ms=GOAWAY_RETRY_MS)


class DrainState:
    """The drain flag of one server."""

    __slots__ = ("_active",)

    def __init__(self) -> None:
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def begin(self) -> None:
        """Start draining (`server.shutdown.Drainer` only); there is no way back."""
        self._active = True

    def check(self) -> None:
        """Raise `shutting_down()` while draining."""
        if self._active:
            raise shutting_down()
