"""The Ollama-compatible model metadata: ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``.

Shaped as the ``ollama`` package parses them (``list()``, ``show()``, ``ps()``). Models served here
(the embedded generator and embedders) are described by sluice itself: ``details``,
``capabilities`` (``completion`` and ``tools`` for the generator, ``embedding`` for an
embedder), ``model_info`` in Ollama's ``<architecture>.<key>`` style, and the sampling defaults as
``parameters``; ``template`` is empty because sluice renders chats with the model's own chat
template, not an Ollama one. Any other model is upstream Ollama's, and ``/api/show`` relays what
Ollama answers for it (404 when it does not know it). ``/api/ps`` lists the embedded models that
are loaded plus what every reachable Ollama reports; an Ollama that is down adds nothing and
never fails the call. ``verbose`` on ``/api/show`` is accepted: sluice's ``model_info`` has no
tokenizer arrays to add. This module only describes models: it never runs one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol, runtime_checkable

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.errors import ErrorCode, SluiceError
from server.api.errors import Family, json_response
from server.api.routing import api_router, error_model
from server.backends.registry import OLLAMA_PREFIX
from server.services import ModelBackends, services_of

__all__ = ["LOCAL_FACTS", "ModelFacts", "router"]

_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    status: {"model": error_model(Family.OLLAMA)} for status in (400, 401, 404, 422)
}
router = api_router(
    Family.OLLAMA, prefix="/api", tags=["Ollama-compatible API"], responses=_ERRORS, any_content_type=True
)

# sluice keeps its models loaded for as long as it runs; Ollama says the same of keep_alive < 0
# with an expiry this far ahead.
_NEVER: Final = "2318-01-01T00:00:00Z"


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What sluice states about a model it serves itself, in Ollama's terms."""

    architecture: str
    parameter_size: str
    parameter_count: int
    context_length: int
    embedding_length: int
    capabilities: tuple[str, ...]
    format: str = "safetensors"
    quantization_level: str = "F32"  # the embedded models run in float32
    parameters: str = ""


# The models the sluice wheels ship (SmolLM2-135M-Instruct, all-MiniLM-L6-v2), from their cards.
LOCAL_FACTS: Final[dict[str, ModelFacts]] = {
    "smollm2:135m": ModelFacts(
        architecture="llama",
        parameter_size="135M",
        parameter_count=134_515_008,
        context_length=2048,
        embedding_length=576,
        capabilities=("completion", "tools"),
        parameters="temperature 0.2\ntop_p 0.9\nnum_predict 512",
    ),
    "all-MiniLM-L6-v2": ModelFacts(
        architecture="bert",
        parameter_size="22.7M",
        parameter_count=22_713_216,
        context_length=256,
        embedding_length=384,
        capabilities=("embedding",),
    ),
}


@runtime_checkable
class _Metadata(Protocol):
    """What `server.backends.ollama.backend.OllamaBackend` relays of Ollama's model metadata."""

    async def show(self, model: str) -> dict[str, Any]: ...
    async def running(self) -> list[dict[str, Any]]: ...


class ShowRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"anyOf": [{"required": ["model"]}, {"required": ["name"]}]}
    )
    model: str | None = Field(default=None, min_length=1, max_length=256)
    name: str | None = Field(
        default=None, min_length=1, max_length=256, description="The older name of `model`."
    )
    verbose: bool = False

    @model_validator(mode="after")
    def _named(self) -> ShowRequest:
        if not (self.model or self.name):
            raise ValueError("model is required")
        return self

    @property
    def named(self) -> str:
        return self.model or self.name or ""


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


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class RunningModel(BaseModel):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int | None = None


class RunningModels(BaseModel):
    models: list[RunningModel]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _details(name: str) -> dict[str, Any]:
    facts = LOCAL_FACTS.get(name)
    if facts is None:
        return ModelDetails(family=name.split(":")[0].split("/")[-1]).model_dump()
    return ModelDetails(
        format=facts.format,
        family=facts.architecture,
        families=[facts.architecture],
        parameter_size=facts.parameter_size,
        quantization_level=facts.quantization_level,
    ).model_dump()


def _tag(name: str, modified_at: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": modified_at,
        "size": 0,
        "digest": _digest(name),
        "details": _details(name),
    }


@router.get("/tags", response_model=OllamaTags, summary="Models (Ollama)")
async def tags(request: Request) -> Response:
    listed = services_of(request).registry.models()
    names = list(dict.fromkeys([*listed.get("generate", []), *listed.get("embed", [])]))
    modified = _now()
    return json_response({"models": [_tag(name, modified) for name in names]})


def _local_show(name: str, kind: str, dimensions: int | None) -> dict[str, Any]:
    facts = LOCAL_FACTS.get(name)
    capabilities = ["completion", "tools"] if kind == "generate" else ["embedding"]
    info: dict[str, Any] = {"general.basename": name}
    if facts is not None:
        arch = facts.architecture
        capabilities = list(facts.capabilities)
        info |= {
            "general.architecture": arch,
            "general.parameter_count": facts.parameter_count,
            f"{arch}.context_length": facts.context_length,
            f"{arch}.embedding_length": facts.embedding_length,
        }
    elif dimensions:
        info |= {"general.architecture": "bert", "bert.embedding_length": dimensions}
    return {
        "modelfile": f"# Served by sluice itself (embedded model)\nFROM {name}\n",
        "parameters": facts.parameters if facts is not None else "",
        "template": "",
        "details": _details(name),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": _now(),
    }


def _upstream(registry: ModelBackends) -> _Metadata | None:
    # `ModelRegistry.ollama`; registries made for tests may have no Ollama at all.
    backend = getattr(registry, "ollama", None)
    return backend if isinstance(backend, _Metadata) else None


async def _show(registry: ModelBackends, name: str) -> dict[str, Any]:
    if name.startswith(OLLAMA_PREFIX):
        upstream = _upstream(registry)
        if upstream is None:
            raise SluiceError(ErrorCode.MODEL_NOT_FOUND, f"model {name!r} not found")
        return await upstream.show(name.removeprefix(OLLAMA_PREFIX))
    if name in registry.models().get("embed", []):
        _, embedder = registry.embedder(name)
        return _local_show(name, "embed", embedder.dimensions)
    resolved, backend = registry.generator(name)
    if isinstance(backend, _Metadata):  # Ollama serves it: its own description
        return await backend.show(resolved)
    return _local_show(resolved, "generate", None)


@router.post("/show", response_model=ShowResponse, summary="A model's details (Ollama)")
async def show(request: Request, body: ShowRequest) -> Response:
    return json_response(await _show(services_of(request).registry, body.named))


def _loaded(status: Mapping[str, object]) -> list[tuple[str, str]]:
    """(kind, name) of each embedded model that is loaded, from the registry's status."""
    local = status.get("local")
    found: list[tuple[str, str]] = []
    for key, entry in (local if isinstance(local, dict) else {}).items():
        kind, _, name = str(key).partition(":")
        if isinstance(entry, dict) and entry.get("state") == "ready" and kind in ("generate", "embed"):
            found.append((kind, name))
    return found


def _running(name: str) -> dict[str, Any]:
    facts = LOCAL_FACTS.get(name)
    return {
        "name": name,
        "model": name,
        # What a model holds in memory is not measured here: 0 says unknown, not empty.
        "size": 0,
        "digest": _digest(name),
        "details": _details(name),
        "expires_at": _NEVER,
        "size_vram": 0,
        "context_length": facts.context_length if facts is not None else None,
    }


@router.get("/ps", response_model=RunningModels, summary="Loaded models (Ollama)")
async def ps(request: Request) -> Response:
    registry = services_of(request).registry
    models = [_running(name) for _, name in _loaded(registry.status())]
    upstream = _upstream(registry)
    if upstream is not None:
        seen = {entry["name"] for entry in models}
        models += [entry for entry in await upstream.running() if entry.get("name") not in seen]
    return json_response({"models": models})
