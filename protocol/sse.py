"""Server-Sent Events framing as pure bytes: one event or comment in, its wire form out.

This is the encoder only (the WHATWG ``text/event-stream`` format): the streaming response, the
keep-alive timer and ``Last-Event-ID`` handling belong to the server. Output is UTF-8 with LF line
ends. Data spanning several lines becomes several ``data:`` lines (a parser joins them back with
LF, so CR and CRLF in the data arrive as LF); ``id`` and ``event`` cannot hold a line break and a
value that does is refused rather than silently split into a different stream.
"""

from __future__ import annotations

import re

from protocol.codec import encode
from protocol.messages import LoggedMessage

__all__ = ["encode_comment", "encode_event", "encode_message"]

# The three line ends the SSE parser recognises: CRLF, lone CR, lone LF.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _field(name: str, value: str) -> str:
    # "name: value"; an empty value is written without the space, which means the same to a parser.
    return f"{name}: {value}\n" if value else f"{name}:\n"


def _single_line(name: str, value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"SSE {name} must not contain a line break")
    return value


def encode_event(
    data: str,
    *,
    id: int | str | None = None,
    event: str | None = None,
    retry_ms: int | None = None,
) -> bytes:
    """One event: optional ``id:``, ``event:`` and ``retry:`` lines, ``data:`` lines, a blank line."""
    out = ""
    if id is not None:
        value = str(id)
        if "\0" in value:
            # Parsers ignore an id holding NUL, so the client's Last-Event-ID would silently go stale.
            raise ValueError("SSE id must not contain NUL")
        out += _field("id", _single_line("id", value))
    if event is not None:
        out += _field("event", _single_line("event", event))
    if retry_ms is not None:
        if isinstance(retry_ms, bool) or retry_ms < 0:
            raise ValueError("SSE retry must be a non-negative integer of milliseconds")
        out += f"retry: {retry_ms}\n"
    if "\r" in data or "\n" in data:
        out += "".join(_field("data", line) for line in _LINE_BREAK.split(data))
    else:
        out += _field("data", data)
    return (out + "\n").encode()


def encode_comment(text: str = "") -> bytes:
    """A comment (``: text``), ignored by clients; sent to keep proxies from closing the stream."""
    lines = _LINE_BREAK.split(text) if text else [""]
    return ("".join(f": {line}\n" if line else ":\n" for line in lines) + "\n").encode()


def encode_message(message: LoggedMessage) -> bytes:
    """A logged server message as the events stream carries it: ``id: seq``, ``event: type``."""
    return encode_event(encode(message), id=message.seq, event=message.type)
