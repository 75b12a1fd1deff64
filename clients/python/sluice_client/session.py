"""The asynchronous API: `AsyncClient`, `AsyncSession` and `connect`.

    async with sluice_client.AsyncClient("http://127.0.0.1:8000") as client:
        async with await client.session() as s:
            async for piece in s.generate(prompt="Hello"):
                print(piece, end="")
            vectors = await s.embed(["a", "b"])          # float32 array (2, d)

One `AsyncSession` is one server session that outlives its connections (see `connection`): any
number of requests in flight at once, resumed across reconnects. Everything here runs on the
caller's event loop; `sluice_client.sync` wraps it for code without one (or inside Jupyter's).
This module turns calls into requests and results into Python values; it never touches a socket.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, overload

import httpx
import numpy as np
import numpy.typing as npt

from protocol.messages import Classification, Embedding, Limits, Models, Request, ServerInfo, Welcome
from sluice_client.batching import in_batches, with_retries
from sluice_client.build import (
    FormatLike,
    MessageLike,
    OptionsLike,
    RequestIds,
    ToolChoiceLike,
    ToolLike,
    check_batch_size,
    classify_request,
    embed_request,
    generate_options,
    generate_request,
    text_list,
)
from sluice_client.connection import Backoff, Connection, Status
from sluice_client.display import LiveText, progress_bar, session_html
from sluice_client.state import Terminal
from sluice_client.streams import AsyncGenerateStream, FutureSink
from sluice_client.transports.select import Endpoints, Opener, TransportChoice
from sluice_client.wire import vectors

__all__ = ["AsyncClient", "AsyncSession", "Scores", "connect"]

CLIENT_NAME = "sluice-python/0.1"
Scores = dict[str, float]
# Requests of one embed/classify call in flight at once: enough to keep the server's batcher busy,
# well under the session's max_inflight so generations started meanwhile still fit.
_MAX_BATCHES_IN_FLIGHT = 8


class AsyncClient:
    """Where the server is and how to reach it; opens sessions. Use on one event loop."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        transport: TransportChoice = "auto",
        open_timeout: float = 10.0,
        backoff: Backoff | None = None,
    ) -> None:
        if transport not in ("auto", "websocket", "sse"):
            raise ValueError(f"transport must be 'auto', 'websocket' or 'sse', not {transport!r}")
        self.url = url
        self.endpoints = Endpoints.from_url(url)
        self.transport: TransportChoice = transport
        self._token = token
        self._open_timeout = open_timeout
        self._backoff = backoff
        self._http: httpx.AsyncClient | None = None
        self._sessions: weakref.WeakSet[AsyncSession] = weakref.WeakSet()

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            self._http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self._open_timeout))
        return self._http

    async def session(self) -> AsyncSession:
        """Open a new session. Raises `SluiceError` when the server cannot be reached."""
        opener = Opener(
            self.endpoints,
            self._http_client(),
            choice=self.transport,
            token=self._token,
            open_timeout=self._open_timeout,
        )
        connection = Connection(opener, backoff=self._backoff, client_name=CLIENT_NAME)
        await connection.start()
        session = AsyncSession(connection, url=self.url)
        self._sessions.add(session)
        return session

    async def aclose(self) -> None:
        """Close every session opened here, then the HTTP pool."""
        for session in list(self._sessions):
            await session.close()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def connect(
    url: str,
    *,
    token: str | None = None,
    transport: TransportChoice = "auto",
    open_timeout: float = 10.0,
    backoff: Backoff | None = None,
) -> AsyncSession:
    """Open a session on a client of its own (closed with the session)."""
    client = AsyncClient(url, token=token, transport=transport, open_timeout=open_timeout, backoff=backoff)
    try:
        session = await client.session()
    except BaseException:
        await client.aclose()
        raise
    session._owner = client
    return session


class AsyncSession:
    """One server session: generate, chat, embed and classify, many requests at once."""

    def __init__(self, connection: Connection, *, url: str) -> None:
        self._connection = connection
        self._ids = RequestIds()
        self._owner: AsyncClient | None = None
        self.url = url

    # -- what the server said ----------------------------------------------------------------

    @property
    def welcome(self) -> Welcome:
        return self._connection.welcome

    @property
    def id(self) -> str:
        return self.welcome.session

    @property
    def models(self) -> Models:
        return self.welcome.models

    @property
    def limits(self) -> Limits:
        return self.welcome.limits

    @property
    def server(self) -> ServerInfo:
        return self.welcome.server

    @property
    def status(self) -> Status:
        return self._connection.status

    @property
    def transport(self) -> str | None:
        return self._connection.transport_kind

    @property
    def inflight(self) -> list[str]:
        """Ids of the requests in flight."""
        return self._connection.inflight

    @property
    def reconnects(self) -> int:
        return self._connection.reconnects

    # -- requests ----------------------------------------------------------------------------

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
    ) -> AsyncGenerateStream:
        """Start a generation (sent at once) and return its stream of text pieces.

        ``format``: ``"json"`` or a JSON Schema (a dict) the reply text is an instance of.
        ``tools``: dicts in OpenAI's shape (``{"type": "function", "function": {"name", ...}}``);
        ``tool_choice``: ``"auto"``, ``"none"``, ``"required"`` or ``{"type": "function",
        "function": {"name": ...}}``. The calls made are on ``stream.tool_calls`` as they come and
        on the result, which then ends with ``finish_reason`` ``"tool_calls"``.
        Options (``temperature``, ``top_p``, ``top_k``, ``max_tokens``, ``stop``, ``seed``) go as
        keywords, or as ``options={...}`` like the ``ollama`` package's, or both (a name given
        twice, or unknown, is a ``TypeError``).
        ``display=True`` shows the reply in one notebook output area as it is read.
        """
        request = generate_request(
            self._ids.next("g"),
            prompt=prompt,
            messages=messages,
            model=model,
            system=system,
            history=history,
            format=format,
            tools=tools,
            tool_choice=tool_choice,
            options=generate_options(options, keyword_options),
        )
        stream = AsyncGenerateStream(request, self._connection.cancel, LiveText() if display else None)
        self._connection.submit(request, stream)
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
    ) -> AsyncGenerateStream:
        """One user turn. With ``history`` (the default) the session keeps the conversation."""
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

    async def embed(
        self,
        texts: str | Sequence[str],
        *,
        model: str | None = None,
        normalize: bool = True,
        batch_size: int = 256,
        concurrency: int | None = None,
        progress: bool | None = None,
    ) -> npt.NDArray[np.float32]:
        """Vectors as a float32 array: shape (len(texts), d), or (d,) for one string.

        Lists longer than ``batch_size`` go as several requests in flight together, with a
        progress bar unless ``progress=False``.
        """
        items = text_list(texts)
        check_batch_size(batch_size)
        show = progress if progress is not None else len(items) > batch_size
        bar = progress_bar(len(items), "embed") if show and items else None
        try:
            matrix = await self.embed_batches(
                items,
                model=model,
                normalize=normalize,
                batch_size=batch_size,
                concurrency=concurrency,
                on_done=None if bar is None else bar.update,
            )
        finally:
            if bar is not None:
                bar.close()
        return matrix[0] if isinstance(texts, str) else matrix

    async def embed_batches(
        self,
        items: list[str],
        *,
        model: str | None,
        normalize: bool,
        batch_size: int,
        concurrency: int | None,
        on_done: Callable[[int], object] | None,
    ) -> npt.NDArray[np.float32]:
        """`embed` without the progress bar: ``on_done(n)`` after each finished chunk."""
        if not items:
            return np.zeros((0, 0), dtype=np.float32)

        async def one(chunk: list[str]) -> npt.NDArray[np.float32]:
            async def attempt() -> Terminal:
                return await self._request(
                    embed_request(self._ids.next("e"), chunk, model=model, normalize=normalize)
                )

            event = await with_retries(attempt)
            assert isinstance(event, Embedding)
            return vectors(event)

        parts = await in_batches(
            items,
            batch_size=batch_size,
            concurrency=concurrency or self._batch_concurrency(),
            run=one,
            on_done=on_done,
        )
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @overload
    async def classify(  # type: ignore[overload-overlap]  # a str is also a Sequence[str]
        self,
        texts: str,
        labels: Sequence[str],
        *,
        multi_label: bool = ...,
        model: str | None = ...,
        batch_size: int = ...,
    ) -> Scores: ...

    @overload
    async def classify(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        multi_label: bool = ...,
        model: str | None = ...,
        batch_size: int = ...,
    ) -> list[Scores]: ...

    async def classify(
        self,
        texts: str | Sequence[str],
        labels: Sequence[str],
        *,
        multi_label: bool = False,
        model: str | None = None,
        batch_size: int = 64,
    ) -> Scores | list[Scores]:
        """Zero-shot scores, ``{label: score}`` sorted best first; a list of them for a list of texts."""
        items = text_list(texts)
        check_batch_size(batch_size)

        async def one(chunk: list[str]) -> list[Scores]:
            async def attempt() -> Terminal:
                request = classify_request(
                    self._ids.next("c"), chunk, labels, multi_label=multi_label, model=model
                )
                return await self._request(request)

            event = await with_retries(attempt)
            assert isinstance(event, Classification)
            return [{score.label: score.score for score in row} for row in event.results]

        parts = await in_batches(items, batch_size=batch_size, concurrency=self._batch_concurrency(), run=one)
        results = [scores for part in parts for scores in part]
        return results[0] if isinstance(texts, str) else results

    async def ping(self) -> float:
        """Round-trip time to the server, in seconds."""
        return await self._connection.ping()

    async def _request(self, request: Request) -> Terminal:
        sink = FutureSink()
        self._connection.submit(request, sink)
        try:
            return await sink.future
        finally:
            if not sink.future.done() or sink.future.cancelled():
                self._connection.cancel(request.id)

    def _batch_concurrency(self) -> int:
        return max(1, min(_MAX_BATCHES_IN_FLIGHT, self.limits.max_inflight // 2))

    # -- lifetime ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel what is in flight and end the session. Idempotent."""
        await self._connection.close()
        if self._owner is not None:
            owner, self._owner = self._owner, None
            await owner.aclose()

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def summary(self) -> dict[str, Any]:
        """What the notebook repr shows: id, server, transport, state, models, requests in flight."""
        welcome = self._connection.state.welcome
        return {
            "id": welcome.session if welcome else None,
            "server": f"{self.url} ({welcome.server.name} {welcome.server.version})" if welcome else self.url,
            "transport": self.transport,
            "status": self.status,
            "models": welcome.models.model_dump() if welcome else {},
            "in flight": self.inflight,
            "reconnects": self.reconnects,
        }

    def __repr__(self) -> str:
        info = self.summary()
        models = info["models"]
        shown = " ".join(f"{kind}={names}" for kind, names in models.items())
        inflight = info["in flight"]
        return (
            f"<sluice session {info['id']} {info['status']} via {info['transport']} to {self.url}; "
            f"models: {shown}; {len(inflight)} in flight{': ' + ', '.join(inflight) if inflight else ''}>"
        )

    def _repr_html_(self) -> str:
        return session_html(self.summary())
