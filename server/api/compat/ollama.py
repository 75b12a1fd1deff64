"""The Ollama-compatible API: ``/api/chat``, ``/api/generate``, ``/api/embed``, the legacy
``/api/embeddings``, ``/api/version``, and the model metadata of `ollama_models` (``/api/tags``,
``/api/show``, ``/api/ps``), in Ollama's own wire format (OLLAMA.md).

Tools that speak to Ollama can point at sluice and get its batching, limits and metrics: the
requests become protocol messages and run through the dispatcher (`server.api.calls`).
Streaming is the default, as in Ollama: NDJSON (``application/x-ndjson``), one object per line,
each piece as ``message.content`` (chat) or ``response`` (generate), then a final ``done: true``
object with ``done_reason`` and the timings in nanoseconds. An error before any output is a JSON
``{"error"}`` with its status; after output has begun it is one more ``{"error"}`` line, the status
staying 200. A request with nothing to generate (empty prompt or no messages) answers at once
with ``done_reason`` ``load`` (``unload`` with ``keep_alive: 0``), as Ollama does.

Requests are read by `ollama_chat` (``format``, ``tools``, tool calls in the history, and what is
refused with a 400 naming it). Each tool call the model makes is one more chunk whose
``message.tool_calls`` holds that call, complete (``arguments`` an object), as Ollama streams
them; ``done_reason`` stays ``stop`` after calls, as in Ollama. ``/api/version`` reports
sluice's version. ``prompt_eval_count`` of ``/api/embed`` counts whitespace-separated words
(embedders report no token counts); the legacy ``/api/embeddings`` answers the model's vector
without normalising it, as Ollama's does (an ``ollama/`` model's vector comes normalised from
Ollama's ``/api/embed``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import orjson
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import MAX_INPUTS, Generate, Timings
from server.api import calls
from server.api.compat import ollama_models
from server.api.compat.ollama_chat import (
    KeepAlive,
    OllamaChatRequest,
    OllamaGenerateRequest,
    chat_message,
    generate_message,
    tool_calls_out,
)
from server.api.errors import Family, error_body, json_response, status_for
from server.api.routing import api_router, caller_key, error_model
from server.api.streams import NDJSON, ndjson_stream
from server.backends.base import ToolCall
from server.dispatcher import Finished
from server.services import SERVER_VERSION, services_of

__all__ = ["routers"]

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    status: {"model": error_model(Family.OLLAMA)} for status in (400, 401, 404, 422, 429, 503)
}
_NDJSON_DOC: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "content": {NDJSON: {"schema": {"type": "string"}}},
        "description": "With `stream` (the default): one JSON object per line, the last with `done: true`.",
    }
}

# Ollama parses the body as JSON whatever its Content-Type (`curl -d` says form-encoded); so does sluice.
router = api_router(
    Family.OLLAMA, prefix="/api", tags=["Ollama-compatible API"], responses=_ERRORS, any_content_type=True
)
_public = api_router(
    Family.OLLAMA,
    authenticate=False,
    prefix="/api",
    tags=["Ollama-compatible API"],
    any_content_type=True,
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


Text = Annotated[str, StringConstraints(max_length=1_000_000)]


class OllamaEmbedRequest(_Body):
    model: str | None = Field(default=None, min_length=1, max_length=256)
    input: Text | list[Text] = Field(default_factory=list)
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)
    keep_alive: KeepAlive = None


class OllamaLegacyEmbeddingsRequest(_Body):
    model: str | None = Field(default=None, min_length=1, max_length=256)
    prompt: Text = ""
    keep_alive: KeepAlive = None


class OllamaLegacyEmbeddingsResponse(BaseModel):
    embedding: list[float]


class OllamaFunctionOut(BaseModel):
    index: int
    name: str
    arguments: dict[str, Any]


class OllamaToolCallOut(BaseModel):
    id: str
    function: OllamaFunctionOut


class OllamaAssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[OllamaToolCallOut] | None = None


class _Final(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaChatResponse(_Final):
    message: OllamaAssistantMessage


class OllamaGenerateResponse(_Final):
    response: str
    tool_calls: list[OllamaToolCallOut] | None = None


class OllamaEmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class OllamaVersion(BaseModel):
    version: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ns(ms: float) -> int:
    return max(0, round(ms * 1_000_000))


def _stats(finished: Finished) -> dict[str, Any]:
    """The final object's fields: reason, counts and durations (nanoseconds), from sluice's timings."""
    timings: Timings = finished.timings
    first = timings.ttft_ms if timings.ttft_ms is not None else timings.total_ms
    return {
        "done": True,
        # Ollama says "stop" after tool calls too (OLLAMA.md).
        "done_reason": "stop" if finished.finish_reason == "tool_calls" else finished.finish_reason,
        "total_duration": _ns(timings.total_ms),
        "load_duration": 0,
        "prompt_eval_count": finished.usage.prompt_tokens,
        "prompt_eval_duration": _ns(first - timings.queue_ms),
        "eval_count": finished.usage.completion_tokens,
        "eval_duration": _ns(timings.total_ms - first),
    }


def _idle(model: str, keep_alive: KeepAlive, field: str, empty: object) -> Response:
    """What Ollama answers when there is nothing to generate: the model was (un)loaded."""
    unload = keep_alive in (0, 0.0, "0", "0s", "0m")
    body = {"model": model, "created_at": _now(), field: empty, "done": True}
    body["done_reason"] = "unload" if unload else "load"
    return json_response(body)


@router.post("/chat", response_model=OllamaChatResponse, responses=_NDJSON_DOC, summary="Chat (Ollama)")
async def chat(request: Request, body: OllamaChatRequest) -> Response:
    model = body.model or services_of(request).settings.default_model
    if not body.messages:
        return _idle(model, body.keep_alive, "message", {"role": "assistant", "content": ""})
    return await _answer(request, chat_message(body), body.stream, chat=True)


@router.post(
    "/generate", response_model=OllamaGenerateResponse, responses=_NDJSON_DOC, summary="Generate (Ollama)"
)
async def generate(request: Request, body: OllamaGenerateRequest) -> Response:
    model = body.model or services_of(request).settings.default_model
    message = generate_message(body) if body.prompt else None
    if message is None:
        return _idle(model, body.keep_alive, "response", "")
    return await _answer(request, message, body.stream, chat=False)


async def _answer(request: Request, message: Generate, stream: bool, *, chat: bool) -> Response:
    key_id = caller_key(request)
    if not stream:
        reply = await calls.complete(request, key_id, message)
        body: dict[str, Any] = {"model": reply.finished.model, "created_at": _now()}
        made = tool_calls_out(reply.tool_calls)
        if chat:
            body["message"] = {"role": "assistant", "content": reply.text}
            if made:
                body["message"]["tool_calls"] = made
        else:
            body["response"] = reply.text
            if made:
                body["tool_calls"] = made
        return json_response(body | _stats(reply.finished))
    generation = await calls.start_generation(request, key_id, message)
    return ndjson_stream(_lines(generation, chat=chat))


async def _lines(generation: calls.Generation, *, chat: bool) -> AsyncIterator[bytes]:
    """Ollama's NDJSON stream of one generation."""
    model = orjson.dumps(generation.model)
    prefix = b'{"model":' + model + b',"created_at":"'
    if chat:
        middle = b'","message":{"role":"assistant","content":'
        suffix = b'},"done":false}\n'
    else:
        middle = b'","response":'
        suffix = b',"done":false}\n'
    made = 0
    try:
        async for item in generation.items():
            if isinstance(item, Finished):
                final: dict[str, Any] = {"model": item.model, "created_at": _now()}
                if chat:
                    final["message"] = {"role": "assistant", "content": ""}
                else:
                    final["response"] = ""
                yield orjson.dumps(final | _stats(item)) + b"\n"
            elif isinstance(item, ToolCall):
                line: dict[str, Any] = {"model": generation.model, "created_at": _now()}
                calls_out = tool_calls_out([item], made)
                made += 1
                if chat:
                    line["message"] = {"role": "assistant", "content": "", "tool_calls": calls_out}
                else:
                    line |= {"response": "", "tool_calls": calls_out}
                yield orjson.dumps(line | {"done": False}) + b"\n"
            else:
                yield prefix + _now().encode() + middle + orjson.dumps(item) + suffix
    except SluiceError as exc:
        yield orjson.dumps(error_body(Family.OLLAMA, exc, status=status_for(exc))) + b"\n"


@router.post("/embed", response_model=OllamaEmbedResponse, summary="Embed (Ollama)")
async def embed(request: Request, body: OllamaEmbedRequest) -> Response:
    started = time.perf_counter()
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    model = body.model or services_of(request).settings.embed_model
    if not texts:
        return json_response(
            {
                "model": model,
                "embeddings": [],
                "total_duration": 0,
                "load_duration": 0,
                "prompt_eval_count": 0,
            }
        )
    if len(texts) > MAX_INPUTS:
        raise SluiceError(ErrorCode.INVALID_REQUEST, f"input: at most {MAX_INPUTS} texts per request")
    result = await calls.embed(request, caller_key(request), texts, model=body.model)
    if body.dimensions is not None and body.dimensions != result.dimensions:
        raise SluiceError(
            ErrorCode.INVALID_REQUEST, f"dimensions: model {result.model} has {result.dimensions} dimensions"
        )
    return json_response(
        {
            "model": result.model,
            "embeddings": result.embeddings,
            "total_duration": _ns((time.perf_counter() - started) * 1000.0),
            "load_duration": 0,
            "prompt_eval_count": sum(len(text.split()) for text in texts),
        }
    )


@router.post(
    "/embeddings", response_model=OllamaLegacyEmbeddingsResponse, summary="Embed one text (Ollama, legacy)"
)
async def embeddings(request: Request, body: OllamaLegacyEmbeddingsRequest) -> Response:
    if not body.prompt:
        return json_response({"embedding": []})  # what Ollama answers for an empty prompt
    result = await calls.embed(request, caller_key(request), [body.prompt], model=body.model, normalize=False)
    return json_response({"embedding": result.embeddings[0]})


@_public.get("/version", response_model=OllamaVersion, summary="Server version (Ollama)")
async def version() -> Response:
    return json_response({"version": SERVER_VERSION})


routers = (router, ollama_models.router, _public)
