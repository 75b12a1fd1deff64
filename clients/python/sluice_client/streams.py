"""What a request hands back: a stream of text pieces for ``generate``, a future for the rest.

`AsyncGenerateStream` is fed by the connection (it is the request's `Sink`) and read by the
caller: ``async for piece in stream``, ``async for item in stream.events()`` (text pieces and
`ToolCall` values in arrival order), ``await stream`` (the whole `GenerationResult`, tool calls
included), or ``async with``. Leaving the loop early, an exception in its body, task cancellation or
``KeyboardInterrupt`` sends ``cancel`` — the loop runs a fresh async generator each time, and
Python closes a generator as soon as the loop drops it. `FutureSink` is the sink of a request with
one result (``embed``, ``classify``). Nothing here sends anything itself: cancels go through the
callback the session passes in.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeAlias, TypeVar

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import ChatMessage, Delta, Done, FinishReason, Generate, Timings, Usage
from protocol.messages import ToolCall as ToolCallEvent
from protocol.tools import FunctionCall, MessageToolCall
from sluice_client.state import Progress, Terminal

__all__ = ["AsyncGenerateStream", "FutureSink", "GenerationResult", "StreamItem", "TextListener", "ToolCall"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model made to a tool of the request (a ``tool_call`` event).

    ``arguments`` is the JSON text the server sent; ``parsed`` is that text as a dict. Answer it
    with ``call.reply(content)``: the ``tool`` message for the next request's ``messages``.
    """

    index: int
    call_id: str
    name: str
    arguments: str

    @property
    def parsed(self) -> dict[str, Any]:
        """The arguments as a dict (``ValueError`` if they are not a JSON object)."""
        value = json.loads(self.arguments)
        if not isinstance(value, dict):
            raise ValueError(f"the arguments of tool call {self.call_id} are not a JSON object")
        return value

    def reply(self, content: str) -> ChatMessage:
        """The ``tool`` message answering this call, to send in a later request's ``messages``."""
        return ChatMessage(role="tool", content=content, tool_call_id=self.call_id)

    def as_message_call(self) -> MessageToolCall:
        """This call as an assistant message carries it (``tool_calls`` of `GenerationResult.message`)."""
        function = FunctionCall(name=self.name, arguments=self.arguments)
        return MessageToolCall(id=self.call_id, type="function", function=function)


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The end of a generation: the whole text, the tool calls made, and the server's account."""

    id: str
    text: str
    finish_reason: FinishReason
    model: str
    usage: Usage
    timings: Timings
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def message(self) -> ChatMessage:
        """This reply as the assistant turn of a later request's ``messages`` (calls included)."""
        calls = [call.as_message_call() for call in self.tool_calls] or None
        return ChatMessage(role="assistant", content=self.text, tool_calls=calls)

    def __repr__(self) -> str:
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        calls = (
            f", tool_calls=[{', '.join(call.name for call in self.tool_calls)}]" if self.tool_calls else ""
        )
        return (
            f"GenerationResult(text={text!r}{calls}, finish_reason={self.finish_reason!r}, "
            f"model={self.model!r}, completion_tokens={self.usage.completion_tokens}, "
            f"total_ms={self.timings.total_ms:.0f})"
        )


# What a stream yields from `events()`: a piece of text, or a whole tool call.
StreamItem: TypeAlias = str | ToolCall
_T = TypeVar("_T", str, StreamItem)


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
        self._queue: asyncio.Queue[StreamItem | Done | SluiceError] = asyncio.Queue()
        self._pieces: list[str] = []
        self._calls: list[ToolCall] = []
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
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls received so far, by ``index``."""
        return list(self._calls)

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

    def feed(self, event: Progress | Terminal) -> None:
        if self._abandoned:
            if isinstance(event, Done):
                self._take(event)
            return
        if isinstance(event, Delta):
            self._queue.put_nowait(event.text)
        elif isinstance(event, ToolCallEvent):
            self._queue.put_nowait(ToolCall(event.index, event.call_id, event.name, event.arguments))
        elif isinstance(event, Done):
            self._queue.put_nowait(event)

    def fail(self, error: SluiceError) -> None:
        if self._abandoned:
            self._take(error)
        else:
            self._queue.put_nowait(error)

    # -- the caller's side -------------------------------------------------------------------

    async def next_piece(self) -> str | None:
        """The next piece of text, or ``None`` at the end. Raises the request's `SluiceError`.

        Tool calls are not returned here (they are in `tool_calls`); `next_item` returns both."""
        while not self.finished:
            item = self._take(await self._queue.get())
            if item and type(item) is str:
                return item
        if self._error is not None:
            raise self._error
        return None

    async def next_item(self) -> StreamItem | None:
        """The next piece of text or tool call, or ``None`` at the end. Raises the request's
        `SluiceError`."""
        while not self.finished:
            item = self._take(await self._queue.get())
            if item:
                return item
        if self._error is not None:
            raise self._error
        return None

    def _take(self, item: StreamItem | Done | SluiceError) -> StreamItem | None:
        if self.finished:
            return None
        match item:
            case str():
                self._pieces.append(item)
                if self._listener is not None:
                    self._listener.update(self.text)
                return item
            case ToolCall():
                self._calls.append(item)
                return item
            case Done():
                self._result = GenerationResult(
                    item.id,
                    self.text,
                    item.finish_reason,
                    item.model,
                    item.usage,
                    item.timings,
                    tuple(self._calls),
                )
            case SluiceError() if item.code is ErrorCode.CANCELLED and self._cancel_requested:
                # Cancelled before the server had it: no server ``done``, the same outcome.
                model = self.request.model or ""
                self._result = GenerationResult(
                    self.id, self.text, "cancelled", model, _NO_USAGE, _NO_TIMINGS, tuple(self._calls)
                )
            case SluiceError():
                self._error = item
        if self._listener is not None:
            self._listener.finish(self.text)
        return None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate(self.next_piece)

    def events(self) -> AsyncIterator[StreamItem]:
        """Text pieces and `ToolCall` values, in the order they came (read this or the stream)."""
        return self._iterate(self.next_item)

    async def _iterate(
        self, next_one: Callable[[], Coroutine[Any, Any, _T | None]]
    ) -> AsyncGenerator[_T, None]:
        try:
            while (item := await next_one()) is not None:
                yield item
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
            if not isinstance(item, str | ToolCall):
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
        calls = f", {len(self._calls)} tool call(s)" if self._calls else ""
        return f"<GenerateStream {self.id} {state}, {len(self.text)} chars{calls}>"


class FutureSink:
    """The sink of a request with a single result (``embed``, ``classify``)."""

    def __init__(self) -> None:
        self.future: asyncio.Future[Terminal] = asyncio.get_running_loop().create_future()

    def feed(self, event: Progress | Terminal) -> None:
        if isinstance(event, Terminal) and not self.future.done():
            self.future.set_result(event)

    def fail(self, error: SluiceError) -> None:
        if not self.future.done():
            self.future.set_exception(error)
