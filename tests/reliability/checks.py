"""What every server message stream must satisfy, checked from the client's side.

`parse_server_message` validates one frame against the closed `ServerMessage` union (unknown
types, unknown error codes and extra fields fail). `StreamCheck` follows one session's numbered
events across any number of connections: ``seq`` starts at 1 and goes up by exactly one (nothing
lost, nothing repeated), and it counts terminal messages per request id, so a test can compare
them with the requests the server accepted. Test support only: nothing here sends anything.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

import orjson
from pydantic import TypeAdapter

from protocol.messages import ServerMessage

__all__ = ["TERMINAL_TYPES", "StreamCheck", "is_terminal", "parse_server_message"]

TERMINAL_TYPES: Final = frozenset({"done", "embedding", "classification"})
_SERVER_MESSAGE: Final[TypeAdapter[Any]] = TypeAdapter(ServerMessage)
UNNUMBERED: Final = frozenset({"welcome", "pong"})


def parse_server_message(raw: str | bytes) -> dict[str, Any]:
    """The message as a dict; raises when it is not a valid server message of PROTOCOL.md."""
    event = orjson.loads(raw)
    if not isinstance(event, dict):
        raise AssertionError(f"server sent a non-object: {raw!r:.200}")
    _SERVER_MESSAGE.validate_python(event)
    return event


def is_terminal(event: dict[str, Any]) -> bool:
    return event["type"] in TERMINAL_TYPES or (event["type"] == "error" and event.get("id") is not None)


class StreamCheck:
    """One session's numbered events, in the order the client read them."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.events: list[dict[str, Any]] = []
        self.terminals: Counter[str] = Counter()
        self.refusals: list[dict[str, Any]] = []

    def add(self, event: dict[str, Any]) -> None:
        """Record a numbered event; raises on a gap or a repeat."""
        seq = event.get("seq")
        if event["type"] in UNNUMBERED:
            assert seq is None, f"{event['type']} must not carry seq: {event}"
            return
        assert seq == self.last_seq + 1, f"seq {seq} after {self.last_seq}: an event lost or repeated"
        self.last_seq = seq
        self.events.append(event)
        if is_terminal(event):
            self.terminals[event["id"]] += 1
        elif event["type"] == "error":
            self.refusals.append(event)

    def text(self, request_id: str) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "delta" and e["id"] == request_id)

    def terminal(self, request_id: str) -> dict[str, Any] | None:
        ends = [e for e in self.events if e.get("id") == request_id and is_terminal(e)]
        assert len(ends) <= 1, f"{len(ends)} terminal messages for {request_id!r}"
        return ends[0] if ends else None
