"""`stream_to_display`: show a generation in one notebook output area while it streams.

Works on both kinds of stream: a sync `GenerateStream` is read here and its result returned; an
`AsyncGenerateStream` gives back a coroutine to ``await``. In a Jupyter kernel the area is updated
in place (throttled); elsewhere the text goes to stdout as it arrives. Reading the stream is all
this does: breaking off (an interrupt) cancels the generation like any other early exit.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, overload

from sluice_client.display import LiveText
from sluice_client.streams import AsyncGenerateStream, GenerationResult
from sluice_client.sync import GenerateStream

__all__ = ["stream_to_display"]


@overload
def stream_to_display(stream: GenerateStream) -> GenerationResult: ...


@overload
def stream_to_display(stream: AsyncGenerateStream) -> Coroutine[Any, Any, GenerationResult]: ...


def stream_to_display(
    stream: GenerateStream | AsyncGenerateStream,
) -> GenerationResult | Coroutine[Any, Any, GenerationResult]:
    if isinstance(stream, AsyncGenerateStream):
        return _display_async(stream)
    return stream.display()


async def _display_async(stream: AsyncGenerateStream) -> GenerationResult:
    live = LiveText()
    try:
        async for _ in stream:
            live.update(stream.text)
    finally:
        live.finish(stream.text)
    assert stream.result is not None
    return stream.result
