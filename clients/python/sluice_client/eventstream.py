"""An incremental ``text/event-stream`` parser (the WHATWG SSE format): bytes in, events out.

Feed it chunks exactly as the network cut them — a chunk may end inside a line, between the CR
and LF of a CRLF, or inside a UTF-8 character — and it returns each event once its blank line
has arrived. It keeps ``last_event_id`` as the specification says (an ``id`` field with a NUL is
ignored), which is what a reconnect sends back as ``Last-Event-ID``. Comments are dropped. It does
no I/O and knows nothing of sluice messages.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

__all__ = ["EventStreamParser", "ServerSentEvent"]


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None  # the stream's last event id when this event was dispatched
    retry_ms: int | None = None


class EventStreamParser:
    """Stateful parser for one event stream. ``feed`` returns the events completed by a chunk."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._started = False
        self._pending_cr = False
        self._data: list[str] = []
        self._event = ""
        self._retry: int | None = None
        self.last_event_id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        text = self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._pending_cr and text.startswith("\n"):
            # The LF of a CRLF whose CR ended the previous chunk: that line was already taken.
            text = text[1:]
        self._pending_cr = False
        self._buffer += text
        events: list[ServerSentEvent] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                break
            end, width = cut
            line = self._buffer[:end]
            if width == 1 and self._buffer[end] == "\r" and end + 1 == len(self._buffer):
                self._pending_cr = True
            self._buffer = self._buffer[end + width :]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event, retry = self._data, self._event, self._retry
        self._data, self._event, self._retry = [], "", None
        if not data:
            return None
        return ServerSentEvent("\n".join(data), event or "message", self.last_event_id, retry)


def _line_end(buffer: str) -> tuple[int, int] | None:
    """Where the first line ends and how wide its break is (CRLF = 2), or None if it has not."""
    cr = buffer.find("\r")
    lf = buffer.find("\n")
    if cr == -1 and lf == -1:
        return None
    if cr == -1 or (lf != -1 and lf < cr):
        return lf, 1
    if cr + 1 < len(buffer) and buffer[cr + 1] == "\n":
        return cr, 2
    return cr, 1
