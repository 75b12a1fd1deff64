"""The SSE parser, byte-exact, fed in every possible cut of the stream."""

from __future__ import annotations

import pytest
from sluice_client.eventstream import EventStreamParser, ServerSentEvent

from protocol.sse import encode_comment, encode_event


def _feed_in_pieces(data: bytes, cuts: list[int]) -> tuple[list[ServerSentEvent], EventStreamParser]:
    parser = EventStreamParser()
    events: list[ServerSentEvent] = []
    start = 0
    for cut in [*cuts, len(data)]:
        events += parser.feed(data[start:cut])
        start = cut
    return events, parser


STREAM = (
    encode_comment("keepalive")
    + encode_event('{"type":"delta","text":"Zürich 東京 ✓"}', id=7, event="delta")
    + b"id: 8\r\nevent: done\r\ndata: line one\r\ndata: line two\r\n\r\n"
    + b"data:no space\rid:9\r\r"
    + b"retry: 1500\nevent: x\n\n"  # no data: not dispatched
    + encode_event("last", id=10)
)
EXPECTED = [
    ServerSentEvent('{"type":"delta","text":"Zürich 東京 ✓"}', "delta", "7"),
    ServerSentEvent("line one\nline two", "done", "8"),
    ServerSentEvent("no space", "message", "9"),
    ServerSentEvent("last", "message", "10"),
]


def test_whole_stream_at_once() -> None:
    events, parser = _feed_in_pieces(STREAM, [])
    assert events == EXPECTED and parser.last_event_id == "10"


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_every_single_cut(cut: int) -> None:
    # Cuts land inside UTF-8 characters, between CR and LF, inside field names.
    events, _ = _feed_in_pieces(STREAM, [cut])
    assert events == EXPECTED


def test_byte_at_a_time() -> None:
    events, _ = _feed_in_pieces(STREAM, list(range(1, len(STREAM))))
    assert events == EXPECTED


def test_bom_comments_nul_ids_and_trailing_partial_event() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"\xef\xbb\xbfdata: a\n\n") == [ServerSentEvent("a")]
    assert parser.feed(b": just a comment\n\nid: bad\x00id\ndata: b\n\n") == [ServerSentEvent("b")]
    assert parser.last_event_id is None
    assert parser.feed(b"data: never finished\n") == []
