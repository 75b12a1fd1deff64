"""Incremental detokenization and stop strings (`server.backends.local_text`), with toy decoders."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.backends.local_text import TextStream


def byte_decode(ids: Sequence[int]) -> str:
    """A byte-level 'tokenizer': one token per UTF-8 byte, like BPE at its worst."""
    return bytes(ids).decode("utf-8", errors="replace")


def char_decode(ids: Sequence[int]) -> str:
    return "".join(chr(i) for i in ids)


def feed(stream: TextStream, ids: Sequence[int]) -> list[str]:
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            return pieces
    pieces.append(stream.flush())
    return pieces


def test_multibyte_characters_split_over_tokens_are_never_emitted_half() -> None:
    text = "héllo wörld 世界 🎉 done"
    pieces = feed(TextStream(byte_decode), list(text.encode()))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    # The 4-byte emoji gives three empty pieces while it is incomplete, then all of it at once.
    assert "🎉" in pieces


def test_stop_string_split_over_tokens_is_cut_with_everything_after_it() -> None:
    stream = TextStream(char_decode, ["END"])
    pieces = [stream.push(ord(c)) for c in "abcEN"]
    assert "".join(pieces) == "abc"  # "EN" could begin "END": held back
    assert stream.push(ord("D")) == ""
    assert stream.stopped
    assert stream.text == "abc"
    assert stream.flush() == ""
    with pytest.raises(RuntimeError):
        stream.push(ord("x"))


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    stream = TextStream(char_decode, ["END"])
    assert stream.push(ord("x")) == "x"
    assert stream.push(ord("E")) == ""
    assert stream.push(ord("y")) == "Ey"
    assert stream.push(ord("E")) == ""
    assert stream.flush() == "E"  # generation ended (EOS or length): the tail was not a stop
    assert stream.text == "xEyE"


def test_stop_at_the_very_start_emits_nothing() -> None:
    assert "".join(feed(TextStream(char_decode, ["\n"]), [ord("\n"), ord("a")])) == ""


def test_empty_stop_strings_are_ignored() -> None:
    assert "".join(feed(TextStream(char_decode, ["", "zz"]), [ord(c) for c in "abc"])) == "abc"


def test_stop_containing_a_multibyte_character() -> None:
    pieces = feed(TextStream(byte_decode, ["é!"]), list("café! more".encode()))
    assert "".join(pieces) == "caf"


def first_stop_reference(text: str, stops: Sequence[str]) -> str:
    """What a streaming consumer must see: text up to the first stop string to complete."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        found = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if found:
            return text[: min(found)]
    return text


@given(
    text=st.text(alphabet="abAB \n🎉é", max_size=40),
    stops=st.lists(st.text(alphabet="abAB \n🎉é", max_size=4), max_size=3),
)
def test_streamed_text_equals_the_text_up_to_the_first_stop(text: str, stops: list[str]) -> None:
    for decode, ids in ((char_decode, [ord(c) for c in text]), (byte_decode, list(text.encode()))):
        stream = TextStream(decode, stops)
        pieces = feed(stream, ids)
        assert "".join(pieces) == first_stop_reference(text, stops)
        assert all("\ufffd" not in piece for piece in pieces)
