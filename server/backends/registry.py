"""The model registry: which backend serves a model name, and what is loaded.

Local names are served in-process: generate ``smollm2:135m`` (alias ``SmolLM2-135M-Instruct``),
embed ``all-MiniLM-L6-v2`` (plus ``settings.extra_embed_models``), classify ``zero-shot-minilm``
(plus ``settings.nli_classify_models``). Any other generate model goes to Ollama when it is
configured, and embed models named ``ollama/<name>`` go to Ollama's ``/api/embed``. Ollama's
reachability and model list are `server.backends.ollama.health.OllamaHealth`'s. When the local
generator is disabled or failed, ``smollm2:135m`` goes to Ollama too (Ollama uses the same name).

Models load once, in `ModelRegistry.start`, in worker threads (never on the event loop), with
their load time logged. Ollama being down at start is a warning, not a failure: local models still
serve. This module must never run inference itself and never reads the environment.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from protocol.errors import ErrorCode, SluiceError
from server.backends.base import BackendState, Classifier, Embedder, Generator
from server.backends.batcher import BatchRecord, MicroBatcher
from server.backends.classify import ZERO_SHOT_MINILM, EmbeddingClassifier, NliClassifier
from server.backends.embedding import MINILM, SentenceEmbedder, minilm_path
from server.backends.ollama.health import OLLAMA_PREFIX, OllamaControl, OllamaHealth
from server.backends.ollama.health import REFRESH_S as OLLAMA_REFRESH_S
from server.settings import Settings

__all__ = [
    "GENERATE_ALIASES",
    "LOCAL_GENERATE",
    "OLLAMA_PREFIX",
    "ModelRegistry",
    "parse_named_paths",
]

log = logging.getLogger(__name__)

LOCAL_GENERATE = "smollm2:135m"
GENERATE_ALIASES: dict[str, str] = {"SmolLM2-135M-Instruct": LOCAL_GENERATE}
# What a client is told to wait before retrying a model that is still loading.
LOADING_RETRY_MS = 1000


_B = TypeVar("_B", Generator, Embedder, Classifier)

LocalFactory = Callable[[Settings], Generator]
OllamaFactory = Callable[[Settings], Generator]
OllamaEmbedderFactory = Callable[[Generator, str], Embedder]
EmbedLoader = Callable[[str, str, Settings], SentenceEmbedder]
NliLoader = Callable[[str, str, Settings], NliClassifier]


def parse_named_paths(entries: Sequence[str], setting: str) -> dict[str, str]:
    """``["name=path", ...]`` to ``{name: path}``; a malformed entry is a configuration error."""
    named: dict[str, str] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"{setting}: expected name=path, got {entry!r}")
        named[name.strip()] = path.strip()
    return named


# transformers' loading keeps process-wide state while it builds a model (how weights are
# initialised and tied): two models loaded at once in two threads can interleave in it, and under
# load SmolLM2 came out with a freshly initialised, untied output head (random tokens).
_LOADING = threading.Lock()


def _one_at_a_time(load: Callable[[], _B]) -> _B:
    """Run one blocking model load, never two at once (see `_LOADING`)."""
    with _LOADING:
        return load()


def _import_all(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # the load that needs it reports the failure, in its own slot
            log.warning("importing %s failed", name, exc_info=True)


def _load_local_generator(settings: Settings) -> Generator:
    # Imported by name so this module loads (and its tests run) without the local backend.
    module = importlib.import_module("server.backends.local")
    generator = module.LocalGenerator.load(settings)
    if not isinstance(generator, Generator):
        raise TypeError("LocalGenerator.load did not return a Generator")
    return generator


def _make_ollama(settings: Settings) -> Generator:
    module = importlib.import_module("server.backends.ollama.backend")
    backend = module.OllamaBackend(settings)
    if not isinstance(backend, Generator):
        raise TypeError("OllamaBackend is not a Generator")
    return backend


def _make_ollama_embedder(backend: Generator, model: str) -> Embedder:
    module = importlib.import_module("server.backends.ollama.backend")
    embedder = module.OllamaEmbedder(backend, model)
    if not isinstance(embedder, Embedder):
        raise TypeError("OllamaEmbedder is not an Embedder")
    return embedder


async def _close(resource: object) -> None:
    """Close a backend whichever way it closes (``aclose()``, or ``close()`` sync or async)."""
    closer = getattr(resource, "aclose", None) or getattr(resource, "close", None)
    if closer is None:
        return
    try:
        if inspect.iscoroutinefunction(closer):
            await closer()
        else:
            result = await asyncio.to_thread(closer)  # a blocking close (joins threads) stays off the loop
            if inspect.isawaitable(result):
                await result
    except Exception:
        log.exception("closing %s failed", type(resource).__name__)


@dataclass(slots=True)
class _Slot:
    """One locally served model: its load state, and the backend once loaded."""

    kind: str  # "generate" | "embed" | "classify"
    state: str = BackendState.LOADING
    load_s: float | None = None
    backend: Generator | Embedder | Classifier | None = None


class ModelRegistry:
    """Model names to backends. Call `start` once (it loads the local models) and `close` at the end.

    Backend constructors are injectable for tests; by default the real ones are imported lazily.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        local_factory: LocalFactory | None = None,
        ollama_factory: OllamaFactory | None = None,
        ollama_embedder_factory: OllamaEmbedderFactory | None = None,
        embed_loader: EmbedLoader | None = None,
        nli_loader: NliLoader | None = None,
    ) -> None:
        self.settings = settings
        self._local_factory = local_factory or _load_local_generator
        self._ollama_factory = ollama_factory or _make_ollama
        self._ollama_embedder_factory = ollama_embedder_factory or _make_ollama_embedder
        self._embed_loader = embed_loader or SentenceEmbedder.load
        self._nli_loader = nli_loader or NliClassifier.load
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._ollama: Generator | None = None
        self._ollama_control: OllamaControl | None = None
        self._ollama_health = OllamaHealth(settings.ollama_urls)
        self._ollama_embedders: dict[str, Embedder] = {}
        self._batch_observers: list[Callable[[BatchRecord], None]] = []
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the local models (in threads, concurrently) and probe Ollama; returns when done.

        Load failures are logged and recorded in `status`, never raised. A malformed ``name=path``
        setting raises ValueError before anything loads: that is a configuration error.
        """
        if self._started:
            return
        settings = self.settings
        embed_paths = {MINILM: ""} | parse_named_paths(settings.extra_embed_models, "extra_embed_models")
        nli_paths = parse_named_paths(settings.nli_classify_models, "nli_classify_models")
        self._started = True
        loads = []
        if settings.load_local_generation:
            self._slots[("generate", LOCAL_GENERATE)] = _Slot("generate")
            loads.append(self._load_generator())
        for name in embed_paths:
            self._slots[("embed", name)] = _Slot("embed")
        self._slots[("classify", ZERO_SHOT_MINILM)] = _Slot("classify")
        loads.extend(self._load_embedder(name, path) for name, path in embed_paths.items())
        for name in nli_paths:
            self._slots[("classify", name)] = _Slot("classify")
        loads.extend(self._load_nli(name, path) for name, path in nli_paths.items())
        if settings.ollama_urls:
            loads.append(self._start_ollama())
        modules = self._model_modules()
        if modules:
            await asyncio.to_thread(_import_all, modules)
        await asyncio.gather(*loads)

    def _model_modules(self) -> list[str]:
        """The model libraries the real loaders below will import.

        transformers builds its namespace lazily, and two threads importing it for the first time
        at once can see it half built (``cannot import name 'DynamicCache' from 'transformers'``):
        so they are imported once, in one thread, before the loads run concurrently.
        """
        modules = []
        if self.settings.load_local_generation and self._local_factory is _load_local_generator:
            modules.append("server.backends.local")
        if self._embed_loader == SentenceEmbedder.load or self._nli_loader == NliClassifier.load:
            modules.extend(["transformers", "sentence_transformers"])
        return modules

    async def close(self) -> None:
        await self._ollama_health.close()
        for slot in self._slots.values():
            # The MiniLM classifier has no close of its own: its embedder owns the batcher.
            if slot.backend is not None:
                await _close(slot.backend)
            slot.backend = None
            slot.state = BackendState.UNAVAILABLE
        for embedder in self._ollama_embedders.values():
            await _close(embedder)
        self._ollama_embedders.clear()
        if self._ollama_control is not None:
            await _close(self._ollama_control)
        self._ollama = self._ollama_control = None

    async def _timed_load(self, kind: str, name: str, load: Callable[[], _B]) -> _B | None:
        slot = self._slots[(kind, name)]
        started = time.perf_counter()
        try:
            backend = await asyncio.to_thread(_one_at_a_time, load)
        except Exception as exc:
            slot.state = BackendState.FAILED
            log.error("%s model %s failed to load", kind, name, exc_info=exc)
            return None
        slot.load_s = time.perf_counter() - started
        slot.backend = backend
        slot.state = BackendState.READY
        log.info("%s model %s loaded in %.2f s", kind, name, slot.load_s)
        return backend

    async def _load_generator(self) -> None:
        await self._timed_load("generate", LOCAL_GENERATE, lambda: self._local_factory(self.settings))

    async def _load_embedder(self, name: str, path: str) -> None:
        def load() -> SentenceEmbedder:
            embedder = self._embed_loader(name, path or minilm_path(), self.settings)
            for observer in self._batch_observers:
                embedder.batcher.add_observer(observer)
            embedder.start()
            return embedder

        embedder = await self._timed_load("embed", name, load)
        if name == MINILM:
            # The default classifier shares MiniLM, and so its batcher, with embed requests.
            classify = self._slots[("classify", ZERO_SHOT_MINILM)]
            if embedder is None:
                classify.state = BackendState.FAILED
                return
            classify.backend = EmbeddingClassifier(embedder)
            classify.load_s = 0.0
            classify.state = BackendState.READY

    async def _load_nli(self, name: str, path: str) -> None:
        def load() -> NliClassifier:
            classifier = self._nli_loader(name, path, self.settings)
            for observer in self._batch_observers:
                classifier.batcher.add_observer(observer)
            classifier.start()
            return classifier

        await self._timed_load("classify", name, load)

    async def _start_ollama(self) -> None:
        try:
            backend = self._ollama_factory(self.settings)
            if not isinstance(backend, OllamaControl):
                raise TypeError("the Ollama backend lacks probe/list_models/aclose")
        except Exception as exc:
            self._ollama_health.failed()
            log.error("Ollama backend could not be created", exc_info=exc)
            return
        self._ollama, self._ollama_control = backend, backend
        await self._ollama_health.attach(backend)

    async def refresh(self, *, max_age_s: float = OLLAMA_REFRESH_S) -> None:
        """Re-probe Ollama and re-read its model list if the last look is older than ``max_age_s``."""
        await self._ollama_health.refresh(max_age_s=max_age_s)

    # -- resolution ----------------------------------------------------------------------------

    def _local(self, kind: str, name: str) -> Generator | Embedder | Classifier | None:
        """The loaded backend for a local name; None when it is not local or cannot serve."""
        slot = self._slots.get((kind, name))
        if slot is None:
            return None
        if slot.state == BackendState.LOADING:
            raise SluiceError(
                ErrorCode.OVERLOADED, f"model {name} is still loading", retry_after_ms=LOADING_RETRY_MS
            )
        return slot.backend if slot.state == BackendState.READY else None

    def generator(self, model: str | None) -> tuple[str, Generator]:
        name = model or self.settings.default_model
        name = GENERATE_ALIASES.get(name, name)
        local = self._local("generate", name)
        if isinstance(local, Generator):
            return name, local
        if self._ollama is not None:
            return name, self._ollama
        raise SluiceError(ErrorCode.MODEL_NOT_FOUND, f"no backend serves generate model {name!r}")

    def embedder(self, model: str | None) -> tuple[str, Embedder]:
        name = model or self.settings.embed_model
        local = self._local("embed", name)
        if isinstance(local, Embedder):
            return name, local
        upstream = name.removeprefix(OLLAMA_PREFIX)
        if self._ollama is not None and name.startswith(OLLAMA_PREFIX) and upstream:
            embedder = self._ollama_embedders.get(upstream)
            if embedder is None:
                embedder = self._ollama_embedders[upstream] = self._ollama_embedder_factory(
                    self._ollama, upstream
                )
            return name, embedder
        raise SluiceError(ErrorCode.MODEL_NOT_FOUND, f"no backend serves embed model {name!r}")

    def classifier(self, model: str | None) -> tuple[str, Classifier]:
        name = model or self.settings.classify_model
        local = self._local("classify", name)
        if isinstance(local, Classifier):
            return name, local
        raise SluiceError(ErrorCode.MODEL_NOT_FOUND, f"no backend serves classify model {name!r}")

    # -- what is served ------------------------------------------------------------------------

    @property
    def ollama(self) -> Generator | None:
        """The Ollama backend, when one is configured and was created (for its metadata calls)."""
        return self._ollama

    def models(self) -> dict[str, list[str]]:
        """Model names per kind, for ``welcome.models`` and ``/v1/models`` (local ones first).

        Lists what can be asked for now or soon (loaded or loading). The Ollama part is the last
        ``/api/tags`` answer; when that is older than a few seconds a refresh starts in the background.
        """
        self._ollama_health.refresh_soon()
        listed: dict[str, list[str]] = {"generate": [], "embed": [], "classify": []}
        for (kind, name), slot in self._slots.items():
            if slot.state in (BackendState.READY, BackendState.LOADING):
                listed[kind].append(name)
        if self._ollama is not None:
            ollama_models = self._ollama_health.models
            listed["generate"].extend(m for m in ollama_models if m not in listed["generate"])
            listed["embed"].extend(OLLAMA_PREFIX + m for m in ollama_models)
        return listed

    def status(self) -> dict[str, object]:
        """Per-backend state for ``/ready``: each local model, and Ollama with each URL's reachability."""
        local: dict[str, object] = {
            f"{kind}:{name}": {"state": slot.state, "load_s": slot.load_s}
            for (kind, name), slot in self._slots.items()
        }
        return {"ready": self.ready, "local": local, "ollama": self._ollama_health.status()}

    @property
    def ready(self) -> bool:
        """True once the default models that are served locally have loaded."""
        if not self._started:
            return False
        settings = self.settings
        defaults = [
            ("generate", GENERATE_ALIASES.get(settings.default_model, settings.default_model)),
            ("embed", settings.embed_model),
            ("classify", settings.classify_model),
        ]
        for key in defaults:
            slot = self._slots.get(key)
            if slot is not None and slot.state != BackendState.READY:
                return False
        return True

    def observe_batches(self, observer: Callable[[BatchRecord], None]) -> None:
        """Report every forward pass of every local batcher to ``observer`` (call it before `start`).

        It runs on the batchers' worker threads: keep it quick and thread-safe (prometheus is).
        """
        self._batch_observers.append(observer)
        for batcher in self.batchers().values():
            batcher.add_observer(observer)

    def batchers(self) -> dict[str, MicroBatcher[Any, Any]]:
        """Each local micro-batcher by model name, for metrics (``.stats``, ``.queued``, observers)."""
        found: dict[str, MicroBatcher[Any, Any]] = {}
        for (_, name), slot in self._slots.items():
            if isinstance(slot.backend, SentenceEmbedder | NliClassifier):
                found[name] = slot.backend.batcher
        return found
