"""Why a connection ends: the close codes of PROTOCOL.md §3, shared by every transport.

The WebSocket sends them as close frames; the SSE stream sends the same numbers in its last
``event: close``. Pure values: nothing here closes anything.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["CloseCode"]


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008
    TOO_LARGE = 1009
    INTERNAL = 1011
    SERVICE_RESTART = 1012
    SLOW_CONSUMER = 4008
    TAKEN_OVER = 4009
