"""What a request hands back: a stream of text pieces for ``generate``, a future for the rest.

`AsyncGenerateStream` is fed by the connection (it is the request's `Sink`) and read by the
caller: ``async for piece in stream``, ``await stream`` (the whole `GenerationResult`), or
``async with``. Leaving the loop early, an exception in its body, task cancellation or
``KeyboardInterrupt`` sends ``cancel`` — the loop runs a fresh async generator each time, and
Python closes a generator as soon as the loop drops it. `FutureSink` is the sink of a request with
one result (``embed``, ``classify``). Nothing here sends anything itself: cancels go through the
callback the session passes in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import Delta, Done, FinishReason, Generate, Timings, Usage
from sluice_client.state import Terminal

__all__ = ["AsyncGenerateStream", "FutureSink", "GenerationResult", "TextListener"]


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The end of a generation: the whole text and the server's account of it."""

    id: str
    text: str
    finish_reason: FinishReason
    model: str
    usage: Usage
    timings: Timings

    def __repr__(self) -> str:
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return (
            f"GenerationResult(text={text!r}, finish_reason={self.finish_reason!r}, model={self.model!r}, "
            f"completion_tokens={self.usage.completion_tokens}, total_ms={self.timings.total_ms:.0f})"
        )


class TextListener(Protocol):
    """Told the text so far after each piece, and once more when the stream ends (notebook output)."""

    def update(self, text: str) -> None: ...

    def finish(self, text: str) -> None: ...


_NO_USAGE = Usage(prompt_tokens=0, completion_tokens=0)
_NO_TIMINGS = Timings(queue_ms=0.0, ttft_ms=None, total_ms=0.0)


class AsyncGenerateStream:
    """The text of one ``generate`` as it streams. Iterate it once; ``result`` is set at the end."""

    def __init__(
        self, request: Generate, cancel: Callable[[str], None], listener: TextListener | None = None
    ) -> None:
        self.request = request
        self._cancel = cancel
        self._listener = listener
        self._queue: asyncio.Queue[str | Done | SluiceError] = asyncio.Queue()
        self._pieces: list[str] = []
        self._result: GenerationResult | None = None
        self._error: SluiceError | None = None
        self._cancel_requested = False
        self._abandoned = False

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._pieces)

    @property
    def result(self) -> GenerationResult | None:
        """The outcome, once the stream has ended (``None`` before, or when it failed)."""
        return self._result

    @property
    def error(self) -> SluiceError | None:
        return self._error

    @property
    def finished(self) -> bool:
        return self._result is not None or self._error is not None

    # -- the connection's side (Sink) --------------------------------------------------------

    def feed(self, event: Delta | Terminal) -> None:
        if self._abandoned:
            if isinstance(event, Done):
                self._take(event)
            return
        if isinstance(event, Delta):
            self._queue.put_nowait(event.text)
        elif isinstance(event, Done):
            self._queue.put_nowait(event)

    def fail(self, error: SluiceError) -> None:
        if self._abandoned:
            self._take(error)
        else:
            self._queue.put_nowait(error)

    # -- the caller's side -------------------------------------------------------------------

    async def next_piece(self) -> str | None:
        """The next piece of text, or ``None`` at the end. Raises the request's `SluiceError`."""
        while not self.finished:
            piece = self._take(await self._queue.get())
            if piece:
                return piece
        if self._error is not None:
            raise self._error
        return None

    def _take(self, item: str | Done | SluiceError) -> str | None:
        if self.finished:
            return None
        match item:
            case str():
                self._pieces.append(item)
                if self._listener is not None:
                    self._listener.update(self.text)
                return item
            case Done():
                self._result = GenerationResult(
                    item.id, self.text, item.finish_reason, item.model, item.usage, item.timings
                )
            case SluiceError() if item.code is ErrorCode.CANCELLED and self._cancel_requested:
                # Cancelled before the server had it: no server ``done``, the same outcome.
                model = self.request.model or ""
                self._result = GenerationResult(
                    self.id, self.text, "cancelled", model, _NO_USAGE, _NO_TIMINGS
                )
            case SluiceError():
                self._error = item
        if self._listener is not None:
            self._listener.finish(self.text)
        return None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncGenerator[str, None]:
        try:
            while (piece := await self.next_piece()) is not None:
                yield piece
        finally:
            # Reached on break (the generator is closed when dropped), on an exception in the
            # loop body, and on task cancellation or KeyboardInterrupt while waiting.
            if not self.finished:
                self.abandon()

    def __await__(self) -> Generator[Any, None, GenerationResult]:
        return self.collect().__await__()

    async def collect(self) -> GenerationResult:
        """Read to the end and return the result (raises the request's `SluiceError`)."""
        async for _ in self:
            pass
        assert self._result is not None
        return self._result

    def request_cancel(self) -> None:
        """Ask the server to stop; the stream still ends with its ``done`` (``cancelled``)."""
        if not self.finished and not self._cancel_requested:
            self._cancel_requested = True
            self._cancel(self.id)

    def abandon(self) -> None:
        """Stop reading: cancel the request and drop the text still to come. Idempotent."""
        if self.finished or self._abandoned:
            return
        self._abandoned = True
        self.request_cancel()
        while not self._queue.empty() and not self.finished:
            item = self._queue.get_nowait()
            if not isinstance(item, str):
                self._take(item)

    async def cancel(self, wait_s: float = 10.0) -> GenerationResult:
        """Cancel and wait for the end; returns the result (``finish_reason`` ``"cancelled"``,
        or what the generation had already finished with)."""
        self.request_cancel()
        try:
            async with asyncio.timeout(wait_s):
                while not self.finished:
                    self._take(await self._queue.get())
        except TimeoutError:
            self._take(SluiceError(ErrorCode.CANCELLED, "request cancelled", retryable=False))
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abandon()

    def __repr__(self) -> str:
        if self._result is not None:
            state = f"{self._result.finish_reason}, {self._result.usage.completion_tokens} tokens"
        elif self._error is not None:
            state = f"failed: {self._error.code.value}"
        else:
            state = "cancelling" if self._cancel_requested else "streaming"
        return f"<GenerateStream {self.id} {state}, {len(self.text)} chars>"


class FutureSink:
    """The sink of a request with a single result (``embed``, ``classify``)."""

    def __init__(self) -> None:
        self.future: asyncio.Future[Terminal] = asyncio.get_running_loop().create_future()

    def feed(self, event: Delta | Terminal) -> None:
        if not isinstance(event, Delta) and not self.future.done():
            self.future.set_result(event)

    def fail(self, error: SluiceError) -> None:
        if not self.future.done():
            self.future.set_exception(error)
