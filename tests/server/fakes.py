"""Fake backends and a fake registry for in-process tests of the runtime, dispatcher and sessions.

`ScriptedGenerator` yields the pieces it is given (optionally paced, optionally failing or
gated on an event) and records whether each stream was closed before it ended, which is how
tests see that a cancel reached the backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import Limits, Models, ServerInfo, Welcome
from server.backends.base import (
    Classifier,
    Embedder,
    GenerationItem,
    GenerationRequest,
    GenerationResult,
    Generator,
    LabelScores,
)

__all__ = ["FakeClassifier", "FakeEmbedder", "FakeRegistry", "ScriptedGenerator", "StreamRecord"]


@dataclass
class StreamRecord:
    request: GenerationRequest
    sent: int = 0
    closed_early: bool = False
    finished: bool = False


@dataclass
class ScriptedGenerator(Generator):
    pieces: list[str] = field(default_factory=lambda: ["Hello", ",", " world"])
    delay_s: float = 0.0
    fail_after: int | None = None
    fail_with: BaseException | None = None
    gate: asyncio.Event | None = None  # when set, the stream waits for it before each piece
    records: list[StreamRecord] = field(default_factory=list)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationItem]:
        record = StreamRecord(request)
        self.records.append(record)
        try:
            for index, piece in enumerate(self.pieces):
                if self.fail_after is not None and index == self.fail_after:
                    raise self.fail_with or SluiceError(ErrorCode.UPSTREAM_ERROR, "upstream broke")
                if self.gate is not None:
                    await self.gate.wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                record.sent += 1
                yield piece
            record.finished = True
            yield GenerationResult(finish_reason="stop", prompt_tokens=3, completion_tokens=len(self.pieces))
        finally:
            if not record.finished:
                record.closed_early = True


class FakeEmbedder(Embedder):
    dimensions = 4

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[list[str]] = []
        self.cancelled = 0

    async def embed(self, texts: Sequence[str], *, normalize: bool = True) -> npt.NDArray[np.float32]:
        self.calls.append(list(texts))
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        rows = [[float(len(text)), 1.0, -2.5, 0.125] for text in texts]
        return np.asarray(rows, dtype=np.float32)


class FakeClassifier(Classifier):
    async def classify(
        self, texts: Sequence[str], labels: Sequence[str], *, multi_label: bool = False
    ) -> list[LabelScores]:
        share = 1.0 / len(labels)
        return [[(label, share) for label in labels] for _ in texts]


class FakeRegistry:
    """Model names to the fakes; also what `create_app(registry=...)` needs."""

    def __init__(
        self,
        generator: Generator | None = None,
        embedder: Embedder | None = None,
        classifier: Classifier | None = None,
    ) -> None:
        self.gen = generator or ScriptedGenerator()
        self.emb = embedder or FakeEmbedder()
        self.cls = classifier or FakeClassifier()
        self.started = False
        self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    @property
    def ready(self) -> bool:
        return self.started

    def models(self) -> dict[str, list[str]]:
        return {"generate": ["fake-gen"], "embed": ["fake-embed"], "classify": ["fake-cls"]}

    def status(self) -> dict[str, object]:
        return {"fake": {"state": "ready"}}

    def generator(self, model: str | None) -> tuple[str, Generator]:
        if model not in (None, "fake-gen"):
            raise SluiceError(ErrorCode.MODEL_NOT_FOUND, f"no backend serves generate model {model!r}")
        return "fake-gen", self.gen

    def embedder(self, model: str | None) -> tuple[str, Embedder]:
        if model not in (None, "fake-embed"):
            raise SluiceError(ErrorCode.MODEL_NOT_FOUND, f"no backend serves embed model {model!r}")
        return "fake-embed", self.emb

    def classifier(self, model: str | None) -> tuple[str, Classifier]:
        if model not in (None, "fake-cls"):
            raise SluiceError(ErrorCode.MODEL_NOT_FOUND, f"no backend serves classify model {model!r}")
        return "fake-cls", self.cls


class Clock:
    """A monotonic clock that tests move by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


TEST_LIMITS = Limits(max_message_bytes=1024, max_inflight=8, replay_events=16, session_ttl_s=10)


def welcome(session_id: str, resumed: bool, last_seq: int, limits: Limits = TEST_LIMITS) -> Welcome:
    """The first message a registry test's connections get."""
    return Welcome(
        session=session_id,
        resumed=resumed,
        last_seq=last_seq,
        server=ServerInfo(version="test"),
        limits=limits,
        models=Models(generate=[], embed=[], classify=[]),
    )
