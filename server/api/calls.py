"""Running one plain-HTTP request through the dispatcher, tied to the life of its HTTP exchange.

Every HTTP API (seed, OpenAI, Ollama) builds a protocol message (`Generate`, `Embed`, `Classify`)
and runs it here, so that it goes through exactly what a WebSocket request goes through: the
dispatcher's admission (drain state, per-key request rate), the model registry and its batching,
the token budget and the metrics.

The exchange bounds the work: when the client disconnects, the work is cancelled, which closes
Ollama's stream, stops local decoding and drops queued batch items (see `server.dispatcher`).
`run_or_cancel` does that for request/response calls; a streaming response cancels its body
iterator on disconnect by itself, and `start_generation` (`open_generation` without an HTTP
exchange) reads the first item before the response starts, so that a failure before any output still gets its proper status. Nothing here
encodes a response body: each API module writes its own wire format.

`start_relay` runs a streaming request on the dispatcher's `relay` in a task of its own: each
piece is framed (by the API's ``frame``) from the upstream read callback and written to the
client there and then when the server offers it (`server.api.httpbody`: the response
started, the client keeps up, no send of the response's own under way); otherwise it is
appended to a bounded buffer, and the response body takes everything ready at each wake-up
(`Relay.chunks`), so the body task is woken per send it must make, not per token; a client that reads slower than the buffer's bound
ends the stream ``slow_consumer`` (the upstream closes) rather than holding it unbounded.

`generate_message` builds the `Generate` from protocol-shaped parts (messages with their tool
calls, ``format``, ``tools``, ``tool_choice``) and turns a protocol validation failure (an invalid
schema, a ``tool_choice`` naming no listed tool) into a 400 that names the field as the API
calls it, through the API's ``rename``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from fastapi import Request
from pydantic import ValidationError

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import Classify, Embed, Generate
from server.api.errors import FieldError, field_of, validation_errors
from server.api.httpbody import BODY_WRITE
from server.backends.base import ToolCall
from server.dispatcher import ClassifyResult, EmbedResult, Finished, RequestTrace
from server.services import Services, services_of

__all__ = [
    "ClientGone",
    "Generation",
    "Relay",
    "Reply",
    "Role",
    "classify",
    "complete",
    "embed",
    "generate_message",
    "new_id",
    "open_generation",
    "run_or_cancel",
    "start_generation",
    "start_relay",
]

_T = TypeVar("_T")
Role = Literal["system", "user", "assistant", "tool"]
# A protocol field path (``messages[2].tool_calls[0].function.arguments``) as the API names it.
Rename = Callable[[str], str]


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the work was cancelled."""


def new_id(prefix: str) -> str:
    """A request id for work that has no client-chosen one (unique, ≤ 64 characters)."""
    return f"{prefix}-{secrets.token_hex(12)}"


async def _disconnected(request: Request) -> None:
    # The body was read before the endpoint ran, so the next message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_or_cancel(request: Request, work: Awaitable[_T]) -> _T:
    """Await ``work``, cancelling it and raising `ClientGone` if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        # Wait for the cancelled work to unwind (an upstream response to close) before answering.
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


def generate_message(
    *,
    model: str | None,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    system: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    format: str | Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    rename: Rename = str,
) -> Generate:
    """The protocol `Generate` for an HTTP request; ``messages``, ``tools`` and ``tool_choice`` in
    the protocol's shapes (PROTOCOL.md §1). A value the protocol refuses raises `FieldError`
    (``invalid_request``, 400) naming the field through ``rename``."""
    options = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_tokens": max_tokens,
        "stop": list(stop) if stop else None,
        "seed": seed,
    }
    fields: dict[str, Any] = {
        "type": "generate",
        "id": new_id("http"),
        "model": model or None,
        "prompt": prompt,
        "messages": [dict(message) for message in messages] if messages is not None else None,
        "system": system or None,
        "options": {name: value for name, value in options.items() if value is not None},
        "format": format or None,
        "tools": [dict(tool) for tool in tools] if tools else None,
        "tool_choice": tool_choice,
    }
    try:
        return Generate.model_validate(fields)
    except ValidationError as exc:
        raise _refusal(validation_errors(exc), rename) from None


def _refusal(errors: Sequence[Mapping[str, Any]], rename: Rename) -> FieldError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    path = field_of(("body", *first.get("loc", ())))
    reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if path == "body" and "tool_choice" in reason:
        path = "tool_choice"  # the check of tool_choice against tools spans both fields
    name = rename(path)
    if len(reason) > 200:
        reason = reason[:199] + "…"
    return FieldError(name, ErrorCode.INVALID_REQUEST, f"{name}: {reason}")


@dataclass(slots=True)
class Reply:
    """A whole generation: its text, the tool calls it made (with their ``call_id``), how it ended."""

    text: str
    finished: Finished
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(slots=True)
class Generation:
    """A started generation: its first item (already read) and the rest of its stream.

    Iterate it once (text pieces and tool calls, then one `Finished`); iterating closes the stream at the end,
    on error, and when the iterating task is cancelled (client gone).
    """

    first: str | ToolCall | Finished
    rest: AsyncGenerator[str | ToolCall | Finished, None]
    model: str  # the resolved model name
    started_at: float  # wall clock, seconds

    async def items(self) -> AsyncIterator[str | ToolCall | Finished]:
        async with aclosing(self.rest) as rest:
            yield self.first
            if isinstance(self.first, Finished):
                return
            async for item in rest:
                yield item

    async def aclose(self) -> None:
        await self.rest.aclose()


async def start_generation(request: Request, key_id: str, message: Generate) -> Generation:
    """`open_generation` for an HTTP exchange: cancelled (and `ClientGone` raised) if the client
    leaves before the first item."""
    return await run_or_cancel(request, open_generation(services_of(request), key_id, message))


async def open_generation(
    services: Services, key_id: str, message: Generate, *, admit: bool = True
) -> Generation:
    """Admit ``message`` and read its first item, so that a failure before any output (unknown
    model, upstream down, rate limited) raises here and becomes a status, not a broken stream.
    Needs no HTTP exchange: a WebSocket or a background task starts a generation with it too
    (``admit=False`` when the caller already admitted it, to answer a refusal at once)."""
    started_at = time.time()
    if admit:
        services.dispatcher.admit(key_id)
    trace = RequestTrace("generate", request=message.id)
    stream = services.dispatcher.generate(message, key_id=key_id, trace=trace)
    try:
        first = await _first(stream)
    except BaseException:
        await stream.aclose()
        raise
    model = trace.model or message.model or ""
    return Generation(first=first, rest=stream, model=model, started_at=started_at)


async def _first(stream: AsyncGenerator[str | ToolCall | Finished, None]) -> str | ToolCall | Finished:
    try:
        return await anext(stream)
    except StopAsyncIteration:  # the dispatcher always ends with Finished or raises
        raise SluiceError(ErrorCode.INTERNAL, "generation ended without a result") from None


class Relay:
    """One streaming request relayed into a buffer of framed bytes (module docstring); `chunks`
    yields them, at most one chunk per wake-up, and raises what ended the request."""

    __slots__ = ("_direct", "_frame", "_limit", "_parts", "_size", "_task", "_waiter", "_write")

    def __init__(
        self, frame: Callable[[str], bytes], limit: int, write: Callable[[bytes], bool] | None
    ) -> None:
        self._frame = frame
        # The server's write-now (None without it), and whether it may be used at this moment.
        self._write = write
        self._direct = False
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[Finished] | None = None

    def _text(self, piece: str) -> None:
        data = self._frame(piece)
        if self._direct and not self._parts and self._write is not None and self._write(data):
            return
        self._parts.append(data)
        self._size += len(data)
        if self._size > self._limit:
            raise SluiceError(ErrorCode.SLOW_CONSUMER, "the client reads the stream too slowly")
        self._wake()

    def _call(self, call: ToolCall) -> None:
        pass  # the seed API offers no tools, so no calls come

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _run(self, services: Services, key_id: str, message: Generate) -> Finished:
        try:
            return await services.dispatcher.relay(
                message, key_id=key_id, on_text=self._text, on_call=self._call
            )
        finally:
            self._wake()

    async def _ready(self) -> None:
        """Until a piece is buffered or the request ended."""
        task = self._task
        assert task is not None
        while not self._parts and not task.done():
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The buffered bytes, all that is ready per chunk, until the request ends; then raises
        what ended it (`SluiceError`). Closing it (client gone) cancels the request."""
        task = self._task
        assert task is not None
        try:
            while True:
                # The response has started (its body is being read): pieces may be written now,
                # except while a chunk yielded here is being sent.
                self._direct = True
                await self._ready()
                if self._parts:
                    parts, self._parts, self._size = self._parts, [], 0
                    self._direct = False
                    yield parts[0] if len(parts) == 1 else b"".join(parts)
                    continue
                task.result()
                return
        finally:
            self._direct = False
            await self.cancel()

    async def cancel(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def start_relay(
    request: Request, key_id: str, message: Generate, frame: Callable[[str], bytes]
) -> Relay:
    """Admit ``message`` and relay it (module docstring) until its first piece or its end, so that
    a failure before any output raises here and becomes a status; cancelled (`ClientGone`) if the
    client leaves first."""
    services = services_of(request)
    services.dispatcher.admit(key_id)
    extension = request.scope.get("extensions", {}).get(BODY_WRITE)
    write = extension["write"] if extension is not None else None
    relay = Relay(frame, services.settings.outbound_hard_bytes, write)
    task = relay._task = asyncio.ensure_future(relay._run(services, key_id, message))
    try:
        await run_or_cancel(request, relay._ready())
    except BaseException:
        await relay.cancel()
        raise
    if task.done() and not relay._parts:
        task.result()  # raises what failed before any output
    return relay


async def complete(request: Request, key_id: str, message: Generate) -> Reply:
    """The whole reply of a generation (request/response APIs)."""
    services = services_of(request)
    services.dispatcher.admit(key_id)
    return await run_or_cancel(request, _collect(services, key_id, message))


async def _collect(services: Services, key_id: str, message: Generate) -> Reply:
    parts: list[str] = []
    calls: list[ToolCall] = []
    finished: Finished | None = None
    async with aclosing(services.dispatcher.generate(message, key_id=key_id)) as stream:
        async for item in stream:
            if isinstance(item, Finished):
                finished = item
            elif isinstance(item, ToolCall):
                calls.append(item)
            else:
                parts.append(item)
    if finished is None:
        raise SluiceError(ErrorCode.INTERNAL, "generation ended without a result")
    return Reply(text="".join(parts), finished=finished, tool_calls=calls)


async def embed(
    request: Request,
    key_id: str,
    texts: str | list[str],
    *,
    model: str | None,
    normalize: bool = True,
    encoding: Literal["float", "base64"] = "float",
) -> EmbedResult:
    """Vectors for ``texts`` through the dispatcher (and the model's micro-batcher)."""
    services = services_of(request)
    message = Embed(
        type="embed",
        id=new_id("http"),
        input=texts,
        model=model or None,
        normalize=normalize,
        encoding=encoding,
    )
    services.dispatcher.admit(key_id)
    return await run_or_cancel(request, services.dispatcher.embed(message, key_id=key_id))


async def classify(
    request: Request,
    key_id: str,
    texts: str | list[str],
    labels: list[str],
    *,
    model: str | None,
    multi_label: bool,
) -> ClassifyResult:
    """Zero-shot scores for ``texts`` through the dispatcher."""
    services = services_of(request)
    message = Classify(
        type="classify",
        id=new_id("http"),
        input=texts,
        labels=labels,
        multi_label=multi_label,
        model=model or None,
    )
    services.dispatcher.admit(key_id)
    return await run_or_cancel(request, services.dispatcher.classify(message, key_id=key_id))
