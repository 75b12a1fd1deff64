"""The small interface every inference backend implements, and the values that cross it.

A generator yields text pieces (`str`) and complete tool calls (`ToolCall`, ``id`` None: the
dispatcher names them) and then exactly one `GenerationResult`; the consumer
cancels by closing the iterator (``aclose()``) or cancelling the task that iterates it, and the
backend must then stop its work at once (close the upstream response, stop the decode loop).
Embedders and classifiers take a batch of texts. Backends raise only `protocol.errors.SluiceError`:
each one maps its foreign exceptions in a single function. No transport code lives here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "BackendState",
    "Classifier",
    "Embedder",
    "GenerationItem",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "JsonSchema",
    "LabelScores",
    "OutputFormat",
    "SamplingOptions",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "Turn",
]

# A JSON Schema document, as parsed JSON.
JsonSchema = Mapping[str, Any]
# ``"json"``: the reply is one JSON value; a schema: the reply is an instance of it.
OutputFormat = Literal["json"] | JsonSchema


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A complete call of a tool: one the model made (yielded by a generator, ``id`` None), or one
    an earlier assistant turn made (``id`` is the ``call_id`` a later ``tool`` turn answers)."""

    name: str
    arguments: str  # a JSON text (an object)
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; ``parameters`` is a JSON Schema of its arguments object."""

    name: str
    description: str | None = None
    parameters: JsonSchema | None = None


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """``auto``: text or calls, the model's choice; ``none``: text only; ``required``: at least one
    call of a listed tool; ``name`` set (mode ``required``): a call of that tool."""

    mode: Literal["auto", "none", "required"] = "auto"
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Turn:
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    # An assistant turn's calls; a tool turn's answer names the call it answers.
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation. Exactly one of `prompt` and `messages` is set (the protocol checked it)."""

    model: str
    prompt: str | None = None
    messages: tuple[Turn, ...] | None = None
    system: str | None = None
    options: SamplingOptions = field(default_factory=SamplingOptions)
    format: OutputFormat | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)


@dataclass(frozen=True, slots=True)
class GenerationResult:
    finish_reason: Literal["stop", "length", "tool_calls"]
    prompt_tokens: int
    completion_tokens: int
    # What the backend itself measured, when it knows (Ollama's final chunk); milliseconds.
    load_ms: float | None = None
    prompt_eval_ms: float | None = None
    eval_ms: float | None = None
    total_ms: float | None = None


GenerationItem = str | ToolCall | GenerationResult


class BackendState:
    LOADING = "loading"
    READY = "ready"
    UNAVAILABLE = "unavailable"
    FAILED = "failed"


class Generator(ABC):
    """Produces text for the models it serves."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationItem]:
        """Yield text pieces and tool calls, then one `GenerationResult`. Raises `SluiceError` only.

        A request with ``format``, ``tools`` or a ``tool_choice`` the backend cannot enforce
        raises ``SluiceError(invalid_request)`` naming it, before any output: never ignored."""

    async def relay(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        on_call: Callable[[ToolCall], None],
    ) -> GenerationResult | None:
        """`generate`'s items handed on as they come: text pieces to ``on_text``, tool calls to
        ``on_call``, in order; returns the `GenerationResult` (None if it never came). Raises what
        `generate` raises, and what a callback raises. Cancelling the awaiting task stops it.

        This one iterates `generate`; a backend that can hand pieces on from where they arrive
        (without waking the awaiting task per piece) overrides it, and must keep the same items."""
        result: GenerationResult | None = None
        stream = self.generate(request)
        try:
            async for item in stream:
                if isinstance(item, GenerationResult):
                    result = item
                elif isinstance(item, ToolCall):
                    on_call(item)
                else:
                    on_text(item)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return result


LabelScores = list[tuple[str, float]]


class Embedder(ABC):
    dimensions: int

    @abstractmethod
    async def embed(self, texts: Sequence[str], *, normalize: bool = True) -> npt.NDArray[np.float32]:
        """One float32 row per text, shape ``(len(texts), dimensions)``."""


class Classifier(ABC):
    @abstractmethod
    async def classify(
        self, texts: Sequence[str], labels: Sequence[str], *, multi_label: bool = False
    ) -> list[LabelScores]:
        """One list of (label, score) per text, sorted by score descending.

        Single-label scores sum to 1; multi-label scores are independent, each in [0, 1].
        """
