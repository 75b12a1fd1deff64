"""Running one plain-HTTP request through the dispatcher, tied to the life of its HTTP exchange.

Every HTTP API (seed, OpenAI, Ollama) builds a protocol message (`Generate`, `Embed`, `Classify`)
and runs it here, so that it goes through exactly what a WebSocket request goes through: the
dispatcher's admission (drain state, per-key request rate), the model registry and its batching,
the token budget and the metrics.

The exchange bounds the work: when the client disconnects, the work is cancelled, which closes
Ollama's stream, stops local decoding and drops queued batch items (see `server.dispatcher`).
`run_or_cancel` does that for request/response calls; a streaming response cancels its body
iterator on disconnect by itself, and `start_generation` reads the first item before the
response starts, so that a failure before any output still gets its proper status. Nothing here
encodes a response body: each API module writes its own wire format.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal, TypeVar

from fastapi import Request

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import ChatMessage, Classify, Embed, Generate, GenerateOptions
from server.backends.base import ToolCall
from server.dispatcher import ClassifyResult, EmbedResult, Finished, RequestTrace
from server.services import Services, services_of

__all__ = [
    "ClientGone",
    "Generation",
    "Role",
    "classify",
    "complete",
    "embed",
    "generate_message",
    "new_id",
    "run_or_cancel",
    "start_generation",
]

_T = TypeVar("_T")
Role = Literal["system", "user", "assistant", "tool"]


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
    messages: Sequence[tuple[Role, str]] | None = None,
    system: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    json_format: bool = False,
) -> Generate:
    """The protocol `Generate` for an HTTP request (raises pydantic's ValidationError: 422)."""
    return Generate(
        type="generate",
        id=new_id("http"),
        model=model or None,
        prompt=prompt,
        messages=[ChatMessage(role=role, content=content) for role, content in messages]
        if messages is not None
        else None,
        system=system or None,
        options=GenerateOptions(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_tokens=max_tokens,
            stop=list(stop) if stop else None,
            seed=seed,
        ),
        format="json" if json_format else None,
    )


@dataclass(slots=True)
class Generation:
    """A started generation: its first item (already read) and the rest of its stream.

    Iterate it once (text pieces, then one `Finished`); iterating closes the stream at the end,
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
    """Admit ``message`` and read its first item, so that a failure before any output (unknown
    model, upstream down, rate limited) raises here and becomes a status, not a broken stream."""
    services = services_of(request)
    started_at = time.time()
    services.dispatcher.admit(key_id)
    trace = RequestTrace("generate", request=message.id)
    stream = services.dispatcher.generate(message, key_id=key_id, trace=trace)
    try:
        first = await run_or_cancel(request, _first(stream))
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


async def complete(request: Request, key_id: str, message: Generate) -> tuple[str, Finished]:
    """The whole text of a generation and how it finished (request/response APIs)."""
    services = services_of(request)
    services.dispatcher.admit(key_id)
    return await run_or_cancel(request, _collect(services, key_id, message))


async def _collect(services: Services, key_id: str, message: Generate) -> tuple[str, Finished]:
    parts: list[str] = []
    finished: Finished | None = None
    async with aclosing(services.dispatcher.generate(message, key_id=key_id)) as stream:
        async for item in stream:
            if isinstance(item, Finished):
                finished = item
            else:
                assert isinstance(item, str), "tool calls are not wired into the HTTP APIs yet"
                parts.append(item)
    if finished is None:
        raise SluiceError(ErrorCode.INTERNAL, "generation ended without a result")
    return "".join(parts), finished


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
