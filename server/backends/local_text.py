"""Incremental detokenization with stop strings: which text of a growing sequence is safe to emit.

A byte-level BPE token can end in the middle of a UTF-8 character, so decoding the tokens so far
ends in U+FFFD until the next token completes it; and a stop string can arrive split over
several tokens. `TextStream` decodes the whole generated sequence after every token and emits
only the new suffix that can no longer change: trailing replacement characters and any tail that
could be the start of a stop string are held back. When a stop string appears, the text before
it is emitted and the stop string and everything after it never are.

Pure: no model, no threads. The decode function is injected (tests use a toy one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["TextStream"]

_REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids with `push`; call `flush` once when generation ends without a stop string."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        # An empty stop string would match before any text; it means nothing, so it is ignored.
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became safe to emit (maybe empty).

        Sets `stopped` when a stop string appeared: the returned text then ends right before it,
        and the stream takes no more tokens.
        """
        if self.stopped:
            raise RuntimeError("push after a stop string")
        self._ids.append(token_id)
        self._text = self._decode(self._ids)
        start = self._emitted
        cut = self._find_stop(start)
        if cut is not None:
            self.stopped = True
            return self._emit(cut)
        end = len(self._text)
        while end > start and self._text[end - 1] == _REPLACEMENT:
            end -= 1
        return self._emit(end - self._stop_prefix(start, end))

    def flush(self) -> str:
        """The held-back tail, emitted when generation ended for another reason (EOS, length)."""
        if self.stopped:
            return ""
        return self._emit(len(self._text))

    def _emit(self, end: int) -> str:
        piece = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece

    def _find_stop(self, start: int) -> int | None:
        # Text before `start` was emitted only because no stop string could begin there.
        found = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _stop_prefix(self, start: int, end: int) -> int:
        """Length of the longest tail of text[start:end] that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, end - start), longest, -1):
                if self._text.endswith(stop[:size], start, end):
                    longest = size
                    break
        return longest
