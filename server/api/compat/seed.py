"""The seed-compatible plain HTTP API, ``/api/v1/*``: what the articles sluice grew from describe.

- ``POST /api/v1/generate`` → ``{text, model, usage, latency_ms, finish_reason}``;
- ``POST /api/v1/generate/stream`` → server-sent events ``data: {"text": ...}`` per piece, then
  ``data: [DONE]`` (a failure after the stream started is one ``data: {"error": {...}}`` first);
- ``POST /api/v1/embeddings {texts, model}`` → ``{embeddings, model, dimensions}``;
- ``POST /api/v1/classify {text, labels, multi_label}`` → ``{results: [{label, score}], model}``;
- ``POST /api/v1/batch/embeddings`` → 202 ``{task_id, status, poll_url}``, then
  ``GET /api/v1/tasks/{id}`` until ``status`` is ``completed`` (with ``result``) or ``failed``
  (with its typed ``error``).

Every call goes through the dispatcher (`server.api.calls`), so it shares the WebSocket's
batching, limits and metrics; errors use the typed body of `server.api.errors` (family
``sluice``). This module only translates shapes: it never runs a model itself.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final, Literal

import numpy as np
import orjson
from fastapi import Path, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import MAX_INPUTS, MAX_LABELS, MAX_STOP, Embed, Generate
from server.api import calls
from server.api.errors import Family, StatusError, error_body, json_response, status_for
from server.api.routing import api_router, caller_key, error_model
from server.api.streams import event_stream
from server.api.tasks import EmbeddingBatch, Task, TaskStore
from server.services import services_of

__all__ = ["BATCH_CHUNK", "BATCH_MAX_TEXTS", "router", "tasks_of"]

# Texts per dispatcher call inside a batch job: big enough to fill the micro-batcher, small
# enough that progress moves and other clients' requests interleave.
BATCH_CHUNK: Final = 256
BATCH_MAX_TEXTS: Final = 16384

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    status: {"model": error_model(Family.SLUICE)} for status in (400, 401, 404, 422, 429, 503)
}
_SSE_DOC: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": 'Server-sent events: `data: {"text": "..."}` per piece, then `data: [DONE]`.',
    }
}
_DONE: Final = b"data: [DONE]\n\n"

router = api_router(Family.SLUICE, prefix="/api/v1", tags=["seed-compatible API"], responses=_ERRORS)


def tasks_of(request: Request) -> TaskStore:
    """The app's batch job store (created by `server.api.mount.install`)."""
    store = request.app.state.sluice_tasks
    assert isinstance(store, TaskStore)
    return store


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


Text = Annotated[str, StringConstraints(max_length=1_000_000)]


class SeedGenerateRequest(_Body):
    # The seed declares min_length=1: an empty prompt is a 422, not a generation from nothing.
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=1_000_000)]
    model: str | None = Field(default=None, min_length=1, max_length=256)
    system: Text | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    stop: list[str] | None = Field(default=None, max_length=MAX_STOP)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)


class SeedUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class SeedGenerateResponse(BaseModel):
    text: str
    model: str
    usage: SeedUsage
    latency_ms: float
    finish_reason: Literal["stop", "length"]


class SeedEmbeddingsRequest(_Body):
    texts: list[Text] = Field(min_length=1, max_length=MAX_INPUTS)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    normalize: bool = True


class SeedEmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]
    model: str
    dimensions: int


class SeedClassifyRequest(_Body):
    text: Text
    labels: list[Annotated[str, StringConstraints(min_length=1, max_length=1000)]] = Field(
        min_length=2, max_length=MAX_LABELS, json_schema_extra={"uniqueItems": True}
    )
    multi_label: bool = False
    model: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        return labels


class LabelScore(BaseModel):
    label: str
    score: float


class SeedClassifyResponse(BaseModel):
    results: list[LabelScore]
    model: str


class BatchEmbeddingsRequest(_Body):
    texts: list[Text] = Field(min_length=1, max_length=BATCH_MAX_TEXTS)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    normalize: bool = True


class BatchAccepted(BaseModel):
    task_id: str
    status: Literal["pending", "running", "completed", "failed"]
    poll_url: str


class Progress(BaseModel):
    done: int
    total: int


class TaskError(BaseModel):
    code: str
    message: str
    retryable: bool
    retry_after_ms: int | None = None


class TaskView(BaseModel):
    task_id: str
    status: Literal["pending", "running", "completed", "failed"]
    created_at: float
    progress: Progress
    result: SeedEmbeddingsResponse | None = None
    error: TaskError | None = None


def _message(body: SeedGenerateRequest) -> Generate:
    return calls.generate_message(
        model=body.model,
        prompt=body.prompt,
        system=body.system,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        max_tokens=body.max_tokens,
        stop=body.stop,
        seed=body.seed,
    )


@router.post("/generate", response_model=SeedGenerateResponse, summary="Generate text (whole answer)")
async def generate(request: Request, body: SeedGenerateRequest) -> Response:
    started = time.perf_counter()
    reply = await calls.complete(request, caller_key(request), _message(body))
    finished = reply.finished
    return json_response(
        {
            "text": reply.text,
            "model": finished.model,
            "usage": finished.usage.model_dump(),
            "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
            "finish_reason": finished.finish_reason,
        }
    )


def _data(value: object) -> bytes:
    # orjson escapes every line break, so one JSON value is always one valid `data:` line.
    return b"data: " + orjson.dumps(value) + b"\n\n"


def _text(piece: str) -> bytes:
    return b'data: {"text":' + orjson.dumps(piece) + b"}\n\n"


@router.post("/generate/stream", responses=_SSE_DOC, summary="Generate text as server-sent events")
async def generate_stream(request: Request, body: SeedGenerateRequest) -> Response:
    relay = await calls.start_relay(request, caller_key(request), _message(body), _text)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in relay.chunks():
                yield chunk
        except SluiceError as exc:
            yield _data(error_body(Family.SLUICE, exc, status=status_for(exc)))
        yield _DONE

    return event_stream(events(), services_of(request).settings)


@router.post("/embeddings", response_model=SeedEmbeddingsResponse, summary="Embed texts")
async def embeddings(request: Request, body: SeedEmbeddingsRequest) -> Response:
    result = await calls.embed(
        request, caller_key(request), body.texts, model=body.model, normalize=body.normalize
    )
    return json_response(
        {"embeddings": result.embeddings, "model": result.model, "dimensions": result.dimensions}
    )


@router.post("/classify", response_model=SeedClassifyResponse, summary="Zero-shot classify one text")
async def classify(request: Request, body: SeedClassifyRequest) -> Response:
    result = await calls.classify(
        request, caller_key(request), body.text, body.labels, model=body.model, multi_label=body.multi_label
    )
    scores = [{"label": item.label, "score": item.score} for item in result.results[0]]
    return json_response({"results": scores, "model": result.model})


@router.post(
    "/batch/embeddings",
    status_code=202,
    response_model=BatchAccepted,
    summary="Start a batch embeddings job (poll its task)",
)
async def batch_embeddings(request: Request, body: BatchEmbeddingsRequest) -> Response:
    key_id = caller_key(request)
    services = services_of(request)
    services.dispatcher.admit(key_id)
    texts, model, normalize = body.texts, body.model, body.normalize

    async def job(task: Task) -> EmbeddingBatch:
        parts: list[np.ndarray[Any, np.dtype[np.float32]]] = []
        name = ""
        for start in range(0, len(texts), BATCH_CHUNK):
            chunk = texts[start : start + BATCH_CHUNK]
            message = Embed(
                type="embed", id=calls.new_id("task"), input=chunk, model=model, normalize=normalize
            )
            result = await services.dispatcher.embed(message, key_id=key_id)
            parts.append(result.vectors.astype(np.float32, copy=False))
            name = result.model
            task.done += len(chunk)
        return EmbeddingBatch(model=name, vectors=np.concatenate(parts, axis=0))

    task = tasks_of(request).submit(key_id, len(texts), job)
    poll_url = str(request.url_for("get_task", task_id=task.id).path)
    return json_response({"task_id": task.id, "status": task.status, "poll_url": poll_url}, status=202)


@router.get("/tasks/{task_id}", response_model=TaskView, summary="A batch job's status and result")
async def get_task(request: Request, task_id: Annotated[str, Path(max_length=128)]) -> Response:
    task = tasks_of(request).get(task_id, caller_key(request))
    if task is None:
        raise StatusError(404, ErrorCode.INVALID_REQUEST, "no such task (unknown or expired)")
    return json_response(task.view())
