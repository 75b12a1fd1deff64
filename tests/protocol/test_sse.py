"""protocol.sse: byte-exact framing of events and comments."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.errors import ErrorCode
from protocol.messages import Delta, Error
from protocol.sse import encode_comment, encode_event, encode_message


@pytest.mark.parametrize(
    ("data", "fields", "expected"),
    [
        ("hello", {}, b"data: hello\n\n"),
        ("", {}, b"data:\n\n"),
        ('{"a":1}', {"id": 7, "event": "delta"}, b'id: 7\nevent: delta\ndata: {"a":1}\n\n'),
        ("x", {"id": "abc"}, b"id: abc\ndata: x\n\n"),
        ("x", {"id": 0}, b"id: 0\ndata: x\n\n"),
        ("x", {"id": ""}, b"id:\ndata: x\n\n"),
        ("x", {"event": "goaway"}, b"event: goaway\ndata: x\n\n"),
        ("x", {"retry_ms": 3000}, b"retry: 3000\ndata: x\n\n"),
        ("x", {"retry_ms": 0}, b"retry: 0\ndata: x\n\n"),
        ("x", {"id": 1, "event": "e", "retry_ms": 5}, b"id: 1\nevent: e\nretry: 5\ndata: x\n\n"),
        # multi-line data: one data line per line, whatever the line end
        ("a\nb", {}, b"data: a\ndata: b\n\n"),
        ("a\r\nb", {}, b"data: a\ndata: b\n\n"),
        ("a\rb", {}, b"data: a\ndata: b\n\n"),
        ("a\n\nb", {}, b"data: a\ndata:\ndata: b\n\n"),
        ("a\r\n\rb", {}, b"data: a\ndata:\ndata: b\n\n"),
        ("a\n", {}, b"data: a\ndata:\n\n"),
        ("\n", {}, b"data:\ndata:\n\n"),
        ("\r\n", {}, b"data:\ndata:\n\n"),
        # a leading space or colon in the data survives: the parser strips exactly one space
        (" x", {}, b"data:  x\n\n"),
        (":x", {}, b"data: :x\n\n"),
        ("é ✓ 😀", {"event": "ü"}, "event: ü\ndata: é ✓ 😀\n\n".encode()),
        ("\u2028", {}, "data: \u2028\n\n".encode()),
    ],
)
def test_encode_event(data: str, fields: dict[str, Any], expected: bytes) -> None:
    assert encode_event(data, **fields) == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"id": "a\nb"}, "id"),
        ({"id": "a\rb"}, "id"),
        ({"id": "a\0b"}, "NUL"),
        ({"event": "a\nb"}, "event"),
        ({"event": "a\r"}, "event"),
        ({"retry_ms": -1}, "retry"),
        ({"retry_ms": True}, "retry"),
    ],
)
def test_values_that_would_change_the_stream_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_event("x", **fields)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", b":\n\n"),
        ("keep-alive", b": keep-alive\n\n"),
        ("a\nb", b": a\n: b\n\n"),
        ("a\r\nb\rc", b": a\n: b\n: c\n\n"),
        ("a\n", b": a\n:\n\n"),
    ],
)
def test_encode_comment(text: str, expected: bytes) -> None:
    assert encode_comment(text) == expected


def test_encode_comment_default() -> None:
    assert encode_comment() == b":\n\n"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            Delta(id="a", seq=12, text="hi\nthere"),
            b'id: 12\nevent: delta\ndata: {"type":"delta","id":"a","seq":12,"text":"hi\\nthere"}\n\n',
        ),
        (
            Error(seq=3, ref="r", code=ErrorCode.DUPLICATE_ID, message="dup", retryable=False),
            b'id: 3\nevent: error\ndata: {"type":"error","ref":"r","seq":3,"code":"duplicate_id",'
            b'"message":"dup","retryable":false}\n\n',
        ),
    ],
)
def test_encode_message(message: Any, expected: bytes) -> None:
    assert encode_message(message) == expected


def parse(stream: bytes) -> list[dict[str, str]]:
    """A minimal WHATWG event-stream parser, to check that framing round-trips."""
    events, current, data = [], {}, []
    for line in stream.decode().split("\n"):
        if line == "":
            if data:
                events.append({**current, "data": "\n".join(data)})
            current, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            current[name] = value
    return events


@pytest.mark.parametrize("data", ["plain", "two\nlines", "\nleading", "trailing\n", "  spaced ", "a\n\n\nb"])
def test_framing_round_trips_through_a_parser(data: str) -> None:
    stream = encode_comment("hi") + encode_event(data, id=5, event="delta") + encode_comment()
    assert parse(stream) == [{"id": "5", "event": "delta", "data": data}]
