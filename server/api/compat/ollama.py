"""The Ollama-compatible API: ``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``,
``/api/version``, in Ollama's own wire format (OLLAMA.md).

Tools that speak to Ollama can point at sluice and get its batching, limits and metrics: the
requests become protocol messages and run through the dispatcher (`server.api.calls`).
Streaming is the default, as in Ollama: NDJSON (``application/x-ndjson``), one object per line,
each piece as ``message.content`` (chat) or ``response`` (generate), then a final ``done: true``
object with ``done_reason`` and the timings in nanoseconds. An error before any output is a JSON
``{"error"}`` with its status; after output has begun it is one more ``{"error"}`` line, the status
staying 200. A request with nothing to generate (empty prompt or no messages) answers at once
with ``done_reason`` ``load`` (``unload`` with ``keep_alive: 0``), as Ollama does.

What sluice cannot honour is refused, never silently dropped: images, ``suffix``, and JSON-schema
``format`` (only ``"json"``) get a 400. Unknown ``options`` (``num_ctx`` and the like) are ignored,
as Ollama itself ignores options a model does not use. ``/api/version`` reports sluice's version.
``prompt_eval_count`` of ``/api/embed`` counts whitespace-separated words (embedders report no
token counts).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import orjson
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import MAX_INPUTS, MAX_STOP, Generate, Timings
from server.api import calls
from server.api.errors import Family, error_body, json_response, status_for
from server.api.routing import api_router, caller_key, error_model
from server.api.streams import NDJSON, ndjson_stream
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
KeepAlive = str | int | float | None


class OllamaOptions(_Body):
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    # -1: until the model stops, -2: until the context is full; sluice has no such cap for either.
    num_predict: int | None = Field(default=None, ge=-2, le=32768)
    stop: list[str] | None = Field(default=None, max_length=MAX_STOP)


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text = ""
    images: list[str] | None = None


class OllamaChatRequest(_Body):
    model: str | None = Field(default=None, min_length=1, max_length=256)
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=4096)
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None


class OllamaGenerateRequest(_Body):
    model: str | None = Field(default=None, min_length=1, max_length=256)
    prompt: Text = ""
    system: Text | None = None
    suffix: str | None = None
    images: list[str] | None = None
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None


class OllamaEmbedRequest(_Body):
    model: str | None = Field(default=None, min_length=1, max_length=256)
    input: Text | list[Text] = Field(default_factory=list)
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)
    keep_alive: KeepAlive = None


class OllamaAssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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


class OllamaEmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class OllamaTag(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class OllamaTags(BaseModel):
    models: list[OllamaTag]


class OllamaVersion(BaseModel):
    version: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _json_format(value: str | dict[str, Any] | None) -> bool:
    if value is None or value == "":
        return False
    if value == "json":
        return True
    raise SluiceError(ErrorCode.INVALID_REQUEST, 'format: only "json" is supported')


def _sampling(options: OllamaOptions | None) -> dict[str, Any]:
    if options is None:
        return {}
    limit = options.num_predict
    return {
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k,
        "seed": options.seed,
        "max_tokens": limit if limit is not None and limit > 0 else None,
        "stop": options.stop,
    }


def _no_images(images: list[str] | None) -> None:
    if images:
        raise SluiceError(ErrorCode.INVALID_REQUEST, "images are not supported by sluice's models")


def _ns(ms: float) -> int:
    return max(0, round(ms * 1_000_000))


def _stats(finished: Finished) -> dict[str, Any]:
    """The final object's fields: reason, counts and durations (nanoseconds), from sluice's timings."""
    timings: Timings = finished.timings
    first = timings.ttft_ms if timings.ttft_ms is not None else timings.total_ms
    return {
        "done": True,
        "done_reason": finished.finish_reason,
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
    for message in body.messages:
        _no_images(message.images)
    generate = calls.generate_message(
        model=body.model,
        messages=[(message.role, message.content) for message in body.messages],
        json_format=_json_format(body.format),
        **_sampling(body.options),
    )
    return await _answer(request, generate, body.stream, chat=True)


@router.post(
    "/generate", response_model=OllamaGenerateResponse, responses=_NDJSON_DOC, summary="Generate (Ollama)"
)
async def generate(request: Request, body: OllamaGenerateRequest) -> Response:
    model = body.model or services_of(request).settings.default_model
    _no_images(body.images)
    if body.suffix:
        raise SluiceError(ErrorCode.INVALID_REQUEST, "suffix (fill-in-the-middle) is not supported")
    if not body.prompt:
        return _idle(model, body.keep_alive, "response", "")
    message = calls.generate_message(
        model=body.model,
        prompt=body.prompt,
        system=body.system,
        json_format=_json_format(body.format),
        **_sampling(body.options),
    )
    return await _answer(request, message, body.stream, chat=False)


async def _answer(request: Request, message: Generate, stream: bool, *, chat: bool) -> Response:
    key_id = caller_key(request)
    if not stream:
        text, finished = await calls.complete(request, key_id, message)
        body: dict[str, Any] = {"model": finished.model, "created_at": _now()}
        if chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        return json_response(body | _stats(finished))
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
    try:
        async for item in generation.items():
            if isinstance(item, Finished):
                final: dict[str, Any] = {"model": item.model, "created_at": _now()}
                if chat:
                    final["message"] = {"role": "assistant", "content": ""}
                else:
                    final["response"] = ""
                yield orjson.dumps(final | _stats(item)) + b"\n"
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


@router.get("/tags", response_model=OllamaTags, summary="Models (Ollama)")
async def tags(request: Request) -> Response:
    listed = services_of(request).registry.models()
    names = list(dict.fromkeys([*listed.get("generate", []), *listed.get("embed", [])]))
    modified = _now()
    return json_response({"models": [_tag(name, modified) for name in names]})


def _tag(name: str, modified_at: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": modified_at,
        "size": 0,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": ModelDetails(family=name.split(":")[0].split("/")[-1]).model_dump(),
    }


@_public.get("/version", response_model=OllamaVersion, summary="Server version (Ollama)")
async def version() -> Response:
    return json_response({"version": SERVER_VERSION})


routers = (router, _public)
