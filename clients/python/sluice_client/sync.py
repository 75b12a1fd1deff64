"""The synchronous API, for scripts and notebooks: `Client`, `Session`, `GenerateStream`.

    s = sluice_client.Client("http://127.0.0.1:8000").session()
    for piece in s.generate(prompt="Hello"):
        print(piece, end="")

It runs the asynchronous session on one background event-loop thread shared by the process (never
``asyncio.run``), so it works the same in a plain script and inside a running event loop — in a
Jupyter cell, or an ``async def`` — whose loop it never blocks on or touches. Each call hands a
coroutine to that thread and waits for it. A ``KeyboardInterrupt`` (Jupyter's interrupt button)
while waiting cancels the work on the loop thread, sends ``cancel`` for a generation, and is raised
again. Progress bars and notebook output are drawn from the calling thread, where the notebook
expects them. Never call this API from the loop thread itself (a callback of the async API).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, ClassVar, TypeVar, overload

import numpy as np
import numpy.typing as npt

from protocol.messages import Limits, Models, ServerInfo, Welcome
from sluice_client.build import (
    FormatLike,
    MessageLike,
    OptionsLike,
    ToolChoiceLike,
    ToolLike,
    check_batch_size,
    text_list,
)
from sluice_client.connection import Backoff, Status
from sluice_client.display import LiveText, progress_bar, session_html
from sluice_client.session import AsyncClient, AsyncSession, Scores
from sluice_client.streams import AsyncGenerateStream, GenerationResult, StreamItem, ToolCall
from sluice_client.transports.select import TransportChoice

__all__ = ["Client", "GenerateStream", "Session"]

T = TypeVar("T")
# How often a waiting call wakes to move its progress bar.
_PROGRESS_TICK_S = 0.1


class _LoopThread:
    """One event loop running forever on a daemon thread; the sync API's work happens there."""

    _shared: ClassVar[_LoopThread | None] = None
    _lock: ClassVar = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sluice-client-loop", daemon=True)
        self.thread.start()

    @classmethod
    def shared(cls) -> _LoopThread:
        with cls._lock:
            if cls._shared is None or not cls._shared.thread.is_alive():
                cls._shared = cls()
            return cls._shared

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError(
                "the sync sluice API cannot be called from its own loop thread; use the async API"
            )
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return _wait(self.submit(coroutine))

    def call(self, function: Callable[[], T]) -> T:
        async def call() -> T:
            return function()

        return self.run(call())

    def call_soon(self, function: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(function)


def _wait(future: concurrent.futures.Future[T], tick: Callable[[], object] | None = None) -> T:
    try:
        while True:
            try:
                return future.result(timeout=None if tick is None else _PROGRESS_TICK_S)
            except TimeoutError:
                if tick is not None:
                    tick()
    except KeyboardInterrupt:
        # Cancels the task on the loop thread; the request's own cleanup sends `cancel`.
        future.cancel()
        raise


class GenerateStream:
    """A generation as it streams; iterate it once (``for piece in stream``)."""

    def __init__(self, loop: _LoopThread, stream: AsyncGenerateStream) -> None:
        self._loop = loop
        self._stream = stream

    @property
    def id(self) -> str:
        return self._stream.id

    @property
    def text(self) -> str:
        return self._stream.text

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls received so far."""
        return self._stream.tool_calls

    @property
    def result(self) -> GenerationResult | None:
        return self._stream.result

    @property
    def finished(self) -> bool:
        return self._stream.finished

    def __iter__(self) -> Iterator[str]:
        return self._iterate(self._stream.next_piece)

    def events(self) -> Iterator[StreamItem]:
        """Text pieces and `ToolCall` values, in the order they came (read this or the stream)."""
        return self._iterate(self._stream.next_item)

    def _iterate(self, next_one: Callable[[], Coroutine[Any, Any, T | None]]) -> Iterator[T]:
        try:
            while (item := self._loop.run(next_one())) is not None:
                yield item
        finally:
            # On break (Python closes the generator when the loop drops it), on an exception in
            # the loop body, and on KeyboardInterrupt: stop the generation on the server.
            if not self._stream.finished:
                self._loop.call_soon(self._stream.abandon)

    def collect(self) -> GenerationResult:
        """Read to the end; return the result (raises the request's `SluiceError`)."""
        for _ in self:
            pass
        assert self._stream.result is not None
        return self._stream.result

    def cancel(self, wait_s: float = 10.0) -> GenerationResult:
        """Cancel and wait for the end (``finish_reason`` ``"cancelled"``)."""
        return self._loop.run(self._stream.cancel(wait_s))

    def display(self) -> GenerationResult:
        """Show the reply in one notebook output area (stdout elsewhere) as it streams."""
        live = LiveText()
        try:
            for _ in self:
                live.update(self.text)
        finally:
            live.finish(self.text)
        assert self._stream.result is not None
        return self._stream.result

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._stream.finished:
            self._loop.call_soon(self._stream.abandon)

    def __repr__(self) -> str:
        return repr(self._stream)


class Session:
    """The synchronous face of an `AsyncSession`; same methods, results returned directly."""

    def __init__(self, loop: _LoopThread, session: AsyncSession) -> None:
        self._loop = loop
        self._session = session

    @property
    def aio(self) -> AsyncSession:
        """The underlying async session (use only on the client's loop thread)."""
        return self._session

    @property
    def id(self) -> str:
        return self._session.id

    @property
    def welcome(self) -> Welcome:
        return self._session.welcome

    @property
    def models(self) -> Models:
        return self._session.models

    @property
    def limits(self) -> Limits:
        return self._session.limits

    @property
    def server(self) -> ServerInfo:
        return self._session.server

    @property
    def status(self) -> Status:
        return self._session.status

    @property
    def transport(self) -> str | None:
        return self._session.transport

    @property
    def inflight(self) -> list[str]:
        return self._loop.call(lambda: self._session.inflight)

    @property
    def reconnects(self) -> int:
        return self._session.reconnects

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[MessageLike] | None = None,
        model: str | None = None,
        system: str | None = None,
        history: bool = False,
        format: FormatLike | None = None,
        tools: Iterable[ToolLike] | None = None,
        tool_choice: ToolChoiceLike | None = None,
        options: OptionsLike | None = None,
        display: bool = False,
        **keyword_options: Any,
    ) -> GenerateStream:
        """Start a generation and return its stream (arguments as `AsyncSession.generate`). With
        ``display=True`` the reply is shown as it streams (one updating notebook output area) and
        the stream is returned finished."""
        started = self._loop.call(
            lambda: self._session.generate(
                prompt,
                messages=messages,
                model=model,
                system=system,
                history=history,
                format=format,
                tools=tools,
                tool_choice=tool_choice,
                options=options,
                **keyword_options,
            )
        )
        stream = GenerateStream(self._loop, started)
        if display:
            stream.display()
        return stream

    def chat(
        self,
        message: str,
        *,
        history: bool = True,
        model: str | None = None,
        system: str | None = None,
        format: FormatLike | None = None,
        tools: Iterable[ToolLike] | None = None,
        tool_choice: ToolChoiceLike | None = None,
        options: OptionsLike | None = None,
        display: bool = False,
        **keyword_options: Any,
    ) -> GenerateStream:
        """One user turn; with ``history`` (the default) the session keeps the conversation."""
        return self.generate(
            messages=[{"role": "user", "content": message}],
            model=model,
            system=system,
            history=history,
            format=format,
            tools=tools,
            tool_choice=tool_choice,
            options=options,
            display=display,
            **keyword_options,
        )

    def embed(
        self,
        texts: str | Sequence[str],
        *,
        model: str | None = None,
        normalize: bool = True,
        batch_size: int = 256,
        concurrency: int | None = None,
        progress: bool | None = None,
    ) -> npt.NDArray[np.float32]:
        """Vectors as a float32 array (n, d), or (d,) for one string; see `AsyncSession.embed`."""
        items = text_list(texts)
        check_batch_size(batch_size)
        show = progress if progress is not None else len(items) > batch_size
        finished = [0]

        def done(n: int) -> None:
            finished[0] += n  # on the loop thread; read by the bar below

        future = self._loop.submit(
            self._session.embed_batches(
                items,
                model=model,
                normalize=normalize,
                batch_size=batch_size,
                concurrency=concurrency,
                on_done=done,
            )
        )
        if not (show and items):
            matrix = _wait(future)
        else:
            bar = progress_bar(len(items), "embed")

            def tick() -> None:
                if finished[0] > bar.n:
                    bar.update(finished[0] - bar.n)

            try:
                matrix = _wait(future, tick)
                tick()
            finally:
                bar.close()
        return matrix[0] if isinstance(texts, str) else matrix

    @overload
    def classify(  # type: ignore[overload-overlap]  # a str is also a Sequence[str]
        self, texts: str, labels: Sequence[str], *, multi_label: bool = ..., model: str | None = ...
    ) -> Scores: ...

    @overload
    def classify(
        self, texts: Sequence[str], labels: Sequence[str], *, multi_label: bool = ..., model: str | None = ...
    ) -> list[Scores]: ...

    def classify(
        self,
        texts: str | Sequence[str],
        labels: Sequence[str],
        *,
        multi_label: bool = False,
        model: str | None = None,
    ) -> Scores | list[Scores]:
        """Zero-shot ``{label: score}`` (best first), or a list of them for a list of texts."""
        return self._loop.run(self._session.classify(texts, labels, multi_label=multi_label, model=model))

    def ping(self) -> float:
        return self._loop.run(self._session.ping())

    def close(self) -> None:
        self._loop.run(self._session.close())

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def summary(self) -> dict[str, Any]:
        return self._loop.call(self._session.summary)

    def __repr__(self) -> str:
        return self._loop.call(lambda: repr(self._session))

    def _repr_html_(self) -> str:
        return session_html(self.summary())


class Client:
    """Where the server is; opens synchronous sessions. Safe to use inside a running event loop."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        transport: TransportChoice = "auto",
        open_timeout: float = 10.0,
        backoff: Backoff | None = None,
    ) -> None:
        self._loop = _LoopThread.shared()
        self._client = self._loop.call(
            lambda: AsyncClient(
                url, token=token, transport=transport, open_timeout=open_timeout, backoff=backoff
            )
        )

    @property
    def url(self) -> str:
        return self._client.url

    def session(self) -> Session:
        """Open a session. Raises `SluiceError` when the server cannot be reached."""
        return Session(self._loop, self._loop.run(self._client.session()))

    def close(self) -> None:
        self._loop.run(self._client.aclose())

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
