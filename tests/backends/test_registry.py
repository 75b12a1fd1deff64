"""The model registry with fake backends: loading, resolution, errors, model lists and status."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
import numpy.typing as npt
import pytest

from protocol.errors import ErrorCode, SluiceError
from server.backends.base import (
    BackendState,
    Embedder,
    GenerationItem,
    GenerationRequest,
    GenerationResult,
    Generator,
    SamplingOptions,
)
from server.backends.batcher import BatchRecord
from server.backends.classify import EmbeddingClassifier, NliClassifier
from server.backends.embedding import SentenceEmbedder
from server.backends.registry import ModelRegistry, parse_named_paths
from server.settings import Settings

pytestmark = pytest.mark.timeout(30)

OLLAMA = "http://127.0.0.1:11434"


class FakeLocal(Generator):
    def __init__(self) -> None:
        self.closed = False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationItem]:
        yield "local"
        yield GenerationResult("stop", 1, 1)

    def close(self) -> None:  # blocking, like the real one
        self.closed = True


class FakeOllama(Generator):
    def __init__(
        self, urls: Sequence[str], *, up: bool = True, models: Sequence[str] = ("llama3.2:1b",)
    ) -> None:
        self.up = up
        self.urls = list(urls)
        self.models = list(models)
        self.list_calls = 0
        self.closed = False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationItem]:
        yield "ollama"
        yield GenerationResult("stop", 1, 1)

    async def probe(self) -> dict[str, bool]:
        return dict.fromkeys(self.urls, self.up)

    async def list_models(self) -> list[str]:
        self.list_calls += 1
        return list(self.models)

    async def aclose(self) -> None:
        self.closed = True


class FakeOllamaEmbedder(Embedder):
    dimensions = 3

    def __init__(self, backend: Generator, model: str) -> None:
        self.backend, self.model = backend, model

    async def embed(self, texts: Sequence[str], *, normalize: bool = True) -> npt.NDArray[np.float32]:
        return np.ones((len(texts), 3), dtype=np.float32)


def fake_embedder(name: str, path: str, settings: Settings) -> SentenceEmbedder:
    def encode(texts: list[str]) -> npt.NDArray[np.float32]:
        return np.array([[len(t), 1.0, 0.5, 0.0] for t in texts], dtype=np.float32)

    embedder = SentenceEmbedder(name, encode, 4, settings)
    embedder.loaded_from = path  # type: ignore[attr-defined]
    return embedder


def fake_nli(name: str, path: str, settings: Settings) -> NliClassifier:
    def pipe(texts: list[str], *, candidate_labels: list[str], **kwargs: object) -> object:
        share = 1.0 / len(candidate_labels)
        return [{"labels": candidate_labels, "scores": [share] * len(candidate_labels)} for _ in texts]

    return NliClassifier(name, pipe, settings)


class Harness:
    """Builds registries on fakes and remembers what it built."""

    def __init__(self) -> None:
        self.local: FakeLocal | None = None
        self.ollama: FakeOllama | None = None
        self.ollama_up = True
        self.local_gate: threading.Event | None = None
        self.local_error: Exception | None = None
        self.embed_error: Exception | None = None

    def make_local(self, settings: Settings) -> Generator:
        if self.local_gate is not None:
            assert self.local_gate.wait(10)
        if self.local_error is not None:
            raise self.local_error
        self.local = FakeLocal()
        return self.local

    def make_ollama(self, settings: Settings) -> Generator:
        self.ollama = FakeOllama(settings.ollama_urls, up=self.ollama_up)
        return self.ollama

    def load_embedder(self, name: str, path: str, settings: Settings) -> SentenceEmbedder:
        if self.embed_error is not None:
            raise self.embed_error
        return fake_embedder(name, path, settings)

    def registry(self, **overrides: object) -> ModelRegistry:
        values: dict[str, object] = {"ollama_urls": []} | overrides
        return ModelRegistry(
            Settings(**values),  # type: ignore[arg-type]
            local_factory=self.make_local,
            ollama_factory=self.make_ollama,
            ollama_embedder_factory=FakeOllamaEmbedder,
            embed_loader=self.load_embedder,
            nli_loader=fake_nli,
        )


@pytest.fixture
def harness() -> Harness:
    return Harness()


async def text_of(generator: Generator) -> str:
    request = GenerationRequest(model="x", prompt="hi")
    return "".join([item async for item in generator.generate(request) if isinstance(item, str)])


def code_of(call: object) -> ErrorCode:
    assert isinstance(call, SluiceError)
    return call.code


async def test_local_models_load_and_resolve_with_defaults_and_aliases(harness: Harness) -> None:
    registry = harness.registry()
    assert not registry.ready
    await registry.start()
    try:
        assert registry.ready
        assert registry.generator(None)[0] == "smollm2:135m"
        name, generator = registry.generator("SmolLM2-135M-Instruct")
        assert name == "smollm2:135m" and generator is harness.local
        assert await text_of(generator) == "local"
        name, embedder = registry.embedder(None)
        assert name == "all-MiniLM-L6-v2" and embedder.dimensions == 4
        assert (await embedder.embed(["abc", "de"])).shape == (2, 4)
        name, classifier = registry.classifier(None)
        assert name == "zero-shot-minilm" and isinstance(classifier, EmbeddingClassifier)
        assert classifier.embedder is embedder  # shares the embedder and its batcher
        assert registry.models() == {
            "generate": ["smollm2:135m"],
            "embed": ["all-MiniLM-L6-v2"],
            "classify": ["zero-shot-minilm"],
        }
    finally:
        await registry.close()


async def test_unknown_models_are_model_not_found_without_ollama(harness: Harness) -> None:
    registry = harness.registry()
    await registry.start()
    try:
        for resolve, name in (
            (registry.generator, "llama3.2:1b"),
            (registry.embedder, "ollama/nomic-embed-text"),
            (registry.embedder, "other-embedder"),
            (registry.classifier, "some-nli"),
        ):
            with pytest.raises(SluiceError) as caught:
                resolve(name)
            assert caught.value.code is ErrorCode.MODEL_NOT_FOUND and not caught.value.retryable
        assert registry.status()["ollama"] == {
            "configured": False,
            "state": "unavailable",
            "urls": {},
            "models": 0,
        }
    finally:
        await registry.close()


async def test_other_names_go_to_ollama_and_its_models_are_listed(harness: Harness) -> None:
    registry = harness.registry(ollama_urls=[OLLAMA])
    await registry.start()
    try:
        name, generator = registry.generator("llama3.2:1b")
        assert name == "llama3.2:1b" and generator is harness.ollama
        assert await text_of(generator) == "ollama"
        name, embedder = registry.embedder("ollama/nomic-embed-text")
        assert name == "ollama/nomic-embed-text" and isinstance(embedder, FakeOllamaEmbedder)
        assert embedder.model == "nomic-embed-text" and embedder.backend is harness.ollama
        assert registry.embedder("ollama/nomic-embed-text")[1] is embedder  # one adapter per model
        with pytest.raises(SluiceError):
            registry.embedder("ollama/")
        models = registry.models()
        assert models["generate"] == ["smollm2:135m", "llama3.2:1b"]
        assert models["embed"] == ["all-MiniLM-L6-v2", "ollama/llama3.2:1b"]
        status = registry.status()
        assert status["ollama"] == {"configured": True, "state": "ready", "urls": {OLLAMA: True}, "models": 1}
    finally:
        await registry.close()
    assert harness.ollama is not None and harness.ollama.closed


async def test_ollama_down_is_a_warning_and_local_models_still_serve(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.ollama_up = False
    registry = harness.registry(ollama_urls=[OLLAMA])
    with caplog.at_level(logging.WARNING, logger="server.backends.registry"):
        await registry.start()
    try:
        assert registry.ready
        assert any("Ollama is unreachable" in record.getMessage() for record in caplog.records)
        assert registry.generator(None)[1] is harness.local
        assert registry.status()["ollama"] == {
            "configured": True,
            "state": "unavailable",
            "urls": {OLLAMA: False},
            "models": 0,
        }
        # Still configured: the request goes there and the Ollama backend reports the outage itself.
        assert registry.generator("llama3.2:1b")[1] is harness.ollama
    finally:
        await registry.close()


async def test_disabled_local_generation_routes_its_name_to_ollama_or_nowhere(harness: Harness) -> None:
    registry = harness.registry(load_local_generation=False)
    await registry.start()
    try:
        assert harness.local is None and registry.ready
        assert code_of(_raises(registry.generator, None)) is ErrorCode.MODEL_NOT_FOUND
        assert registry.models()["generate"] == []
    finally:
        await registry.close()
    registry = harness.registry(load_local_generation=False, ollama_urls=[OLLAMA])
    await registry.start()
    try:
        assert registry.generator("SmolLM2-135M-Instruct") == ("smollm2:135m", harness.ollama)
    finally:
        await registry.close()


def _raises(resolve: object, model: str | None) -> SluiceError:
    try:
        resolve(model)  # type: ignore[operator]
    except SluiceError as error:
        return error
    raise AssertionError("expected a SluiceError")


async def test_a_loading_model_answers_retry_later_and_status_shows_it(harness: Harness) -> None:
    harness.local_gate = threading.Event()
    registry = harness.registry()
    starting = asyncio.create_task(registry.start())
    try:
        for _ in range(500):  # embed loads without waiting for the generator
            try:
                registry.embedder(None)
                break
            except SluiceError:
                await asyncio.sleep(0.01)
        assert not registry.ready
        error = _raises(registry.generator, None)
        assert error.code is ErrorCode.OVERLOADED and error.retryable and error.retry_after_ms
        status = registry.status()
        assert status["ready"] is False
        assert status["local"]["generate:smollm2:135m"]["state"] == "loading"  # type: ignore[index]
        assert registry.models()["generate"] == ["smollm2:135m"]
        harness.local_gate.set()
        await asyncio.wait_for(starting, 10)
        assert registry.ready
        local = registry.status()["local"]
        assert local["generate:smollm2:135m"]["state"] == "ready"
        assert local["generate:smollm2:135m"]["load_s"] >= 0
    finally:
        harness.local_gate.set()
        await registry.close()


async def test_a_failed_local_generator_is_reported_and_falls_back_to_ollama(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.local_error = OSError("weights missing")
    registry = harness.registry(ollama_urls=[OLLAMA])
    with caplog.at_level(logging.ERROR, logger="server.backends.registry"):
        await registry.start()
    try:
        assert not registry.ready
        assert registry.status()["local"]["generate:smollm2:135m"] == {"state": "failed", "load_s": None}  # type: ignore[index]
        assert registry.generator(None) == ("smollm2:135m", harness.ollama)
        assert registry.models()["generate"] == ["llama3.2:1b"]  # only what Ollama has
        assert any("failed to load" in record.getMessage() for record in caplog.records)
    finally:
        await registry.close()


async def test_a_failed_embedder_fails_the_default_classifier_too(harness: Harness) -> None:
    harness.embed_error = SluiceError(ErrorCode.MODEL_NOT_FOUND, "no such model")
    registry = harness.registry()
    await registry.start()
    try:
        assert not registry.ready
        local = registry.status()["local"]
        assert local["embed:all-MiniLM-L6-v2"]["state"] == BackendState.FAILED  # type: ignore[index]
        assert local["classify:zero-shot-minilm"]["state"] == BackendState.FAILED  # type: ignore[index]
        assert code_of(_raises(registry.embedder, None)) is ErrorCode.MODEL_NOT_FOUND
        assert code_of(_raises(registry.classifier, None)) is ErrorCode.MODEL_NOT_FOUND
        assert registry.models()["embed"] == [] and registry.models()["classify"] == []
    finally:
        await registry.close()


async def test_extra_embed_and_nli_models_come_from_settings(harness: Harness) -> None:
    registry = harness.registry(
        extra_embed_models=["bge-small=/models/bge", " e5 = /models/e5 "],
        nli_classify_models=["nli-deberta=/m/nli"],
    )
    await registry.start()
    try:
        _, bge = registry.embedder("bge-small")
        assert bge.loaded_from == "/models/bge"  # type: ignore[attr-defined]
        assert registry.embedder("e5")[1].loaded_from == "/models/e5"  # type: ignore[attr-defined]
        name, nli = registry.classifier("nli-deberta")
        assert name == "nli-deberta" and isinstance(nli, NliClassifier)
        assert await nli.classify(["t"], ["a", "b"]) == [[("a", 0.5), ("b", 0.5)]]
        assert registry.models()["embed"] == ["all-MiniLM-L6-v2", "bge-small", "e5"]
        assert registry.models()["classify"] == ["zero-shot-minilm", "nli-deberta"]
        assert set(registry.batchers()) == {"all-MiniLM-L6-v2", "bge-small", "e5", "nli-deberta"}
    finally:
        await registry.close()


def test_named_paths_are_parsed_strictly() -> None:
    assert parse_named_paths(["a=/x", "b = /y=z"], "s") == {"a": "/x", "b": "/y=z"}
    for bad in ("no-equals", "=path", "name="):
        with pytest.raises(ValueError, match="name=path"):
            parse_named_paths([bad], "extra_embed_models")


async def test_the_ollama_model_list_is_cached_and_refreshed(harness: Harness) -> None:
    registry = harness.registry(ollama_urls=[OLLAMA])
    await registry.start()
    try:
        assert harness.ollama is not None
        calls = harness.ollama.list_calls
        harness.ollama.models = ["llama3.2:1b", "qwen2.5:0.5b"]
        await registry.refresh()  # fresh enough: no new /api/tags
        assert harness.ollama.list_calls == calls
        await registry.refresh(max_age_s=0)
        assert harness.ollama.list_calls == calls + 1
        assert registry.models()["generate"] == ["smollm2:135m", "llama3.2:1b", "qwen2.5:0.5b"]
        harness.ollama.up = False
        await registry.refresh(max_age_s=0)
        assert registry.status()["ollama"]["state"] == "unavailable"  # type: ignore[index]
    finally:
        await registry.close()


async def test_close_closes_every_backend(harness: Harness) -> None:
    registry = harness.registry(ollama_urls=[OLLAMA])
    await registry.start()
    _, embedder = registry.embedder(None)
    await registry.close()
    assert harness.local is not None and harness.local.closed
    assert harness.ollama is not None and harness.ollama.closed
    with pytest.raises(SluiceError) as caught:
        await embedder.embed(["late"])
    assert caught.value.code is ErrorCode.SHUTTING_DOWN
    assert not registry.ready


async def test_batch_observers_see_embed_and_classify_passes(harness: Harness) -> None:
    records: list[BatchRecord] = []
    registry = harness.registry()
    registry.observe_batches(records.append)
    await registry.start()
    try:
        await registry.embedder(None)[1].embed(["one", "two"])
        await registry.classifier(None)[1].classify(["text"], ["a", "b"])
        for _ in range(200):
            if len(records) >= 2:
                break
            await asyncio.sleep(0.01)
        assert [record.model for record in records] == ["all-MiniLM-L6-v2", "all-MiniLM-L6-v2"]
        assert records[0].size == 2 and records[1].size == 1 + 2 * 3  # text + 2 labels x 3 templates
    finally:
        await registry.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_the_real_ollama_backend_unreachable_is_unavailable(harness: Harness) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    registry = ModelRegistry(
        Settings(ollama_urls=[url], ollama_connect_timeout_s=2.0),
        local_factory=harness.make_local,
        embed_loader=harness.load_embedder,
    )
    await registry.start()
    try:
        assert registry.ready
        assert registry.status()["ollama"] == {
            "configured": True,
            "state": "unavailable",
            "urls": {url: False},
            "models": 0,
        }
        assert registry.generator(None)[1] is harness.local
    finally:
        await registry.close()


@pytest.mark.models
@pytest.mark.timeout(300)
async def test_the_real_backends_load_and_serve_through_the_registry() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    registry = ModelRegistry(Settings(ollama_urls=[url]))
    await registry.start()
    try:
        assert registry.ready, registry.status()
        assert registry.models() == {
            "generate": ["smollm2:135m"],
            "embed": ["all-MiniLM-L6-v2"],
            "classify": ["zero-shot-minilm"],
        }
        name, generator = registry.generator("SmolLM2-135M-Instruct")
        request = GenerationRequest(
            model=name, prompt="Say hello.", options=SamplingOptions(max_tokens=3, seed=1)
        )
        items = [item async for item in generator.generate(request)]
        assert isinstance(items[-1], GenerationResult) and items[-1].completion_tokens <= 3
        assert (await registry.embedder(None)[1].embed(["hello"])).shape == (1, 384)
        scores = await registry.classifier(None)[1].classify(
            ["It is raining hard today."], ["weather", "sports"]
        )
        assert scores[0][0][0] == "weather"
    finally:
        await registry.close()


async def test_a_malformed_model_setting_fails_start_before_loading(harness: Harness) -> None:
    registry = harness.registry(extra_embed_models=["no-path-here"])
    with pytest.raises(ValueError, match="extra_embed_models"):
        await registry.start()
    assert not registry.ready and harness.local is None


def test_model_loads_run_one_at_a_time() -> None:
    from server.backends.registry import _one_at_a_time

    running: list[int] = []
    overlaps: list[int] = []

    def load() -> object:
        running.append(1)
        overlaps.append(len(running))
        time.sleep(0.05)
        running.pop()
        return object()

    threads = [threading.Thread(target=_one_at_a_time, args=(load,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [1, 1, 1, 1]
