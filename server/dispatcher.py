"""Runs protocol requests on the backends: the one place a request becomes backend work.

`Dispatcher` turns a `Generate` into a stream of text pieces and one `Finished`, an `Embed` into
an `EmbedResult` and a `Classify` into a `ClassifyResult`. It resolves the model through the
registry, measures ``queue_ms`` / ``ttft_ms`` / ``total_ms``, feeds metrics and the per-key token
budget, and maps every exception to a `SluiceError` in one place (`_accounting`): an unexpected
one is logged with its session and request id and leaves as ``internal``, with no text of it.

It knows nothing of sessions, seq or transports, so every transport uses it as it is: the
WebSocket and SSE session runtime (`server.runtime`, which takes each piece through `relay`'s
callbacks) and the plain HTTP APIs, which call `admit` and then `generate` / `embed` /
`classify` directly. Cancelling is the caller's: cancel
the task awaiting it, or ``aclose()`` the `generate` iterator (use ``contextlib.aclosing``), and
the backend stops at once (Ollama's stream is closed, local decoding stops within a token,
queued batch items are dropped).
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from protocol.conversation import conversation as build_conversation
from protocol.errors import ErrorCode, SluiceError
from protocol.messages import ChatMessage, Classify, Embed, Generate, LabelScore, RequestKind, Timings, Usage
from protocol.tools import NamedToolChoice
from server.backends.base import (
    Classifier,
    Embedder,
    GenerationRequest,
    GenerationResult,
    Generator,
    SamplingOptions,
    Tool,
    ToolCall,
    ToolChoice,
    Turn,
)
from server.draining import DrainState
from server.metrics import Metrics
from server.ratelimit import RateLimiter

__all__ = [
    "ClassifyResult",
    "Dispatcher",
    "EmbedResult",
    "Finished",
    "ModelSource",
    "RequestTrace",
    "encode_vectors",
    "generation_request",
    "new_call_id",
]

log = logging.getLogger("sluice.dispatcher")


class ModelSource(Protocol):
    """What the dispatcher needs of `server.backends.registry.ModelRegistry`."""

    def generator(self, model: str | None) -> tuple[str, Generator]: ...
    def embedder(self, model: str | None) -> tuple[str, Embedder]: ...
    def classifier(self, model: str | None) -> tuple[str, Classifier]: ...


@dataclass(slots=True)
class RequestTrace:
    """What is known about one request while it runs; the caller may read it at any time (a
    runtime cancelling a generation reports its model, tokens so far and timings from it)."""

    kind: RequestKind
    session: str | None = None
    request: str | None = None
    model: str | None = None  # resolved name, once known
    accepted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None
    pieces: int = 0

    def timings(self, now: float | None = None) -> Timings:
        end = time.perf_counter() if now is None else now
        started = self.started_at if self.started_at is not None else end
        first = self.first_token_at
        return Timings(
            queue_ms=_ms(started - self.accepted_at),
            ttft_ms=None if first is None else _ms(first - self.accepted_at),
            total_ms=_ms(end - self.accepted_at),
        )


@dataclass(frozen=True, slots=True)
class Finished:
    """The last item of `Dispatcher.generate`: how the generation ended."""

    finish_reason: Literal["stop", "length", "tool_calls"]
    usage: Usage
    timings: Timings
    model: str


@dataclass(frozen=True, slots=True)
class EmbedResult:
    model: str
    dimensions: int
    vectors: npt.NDArray[np.float32]
    # What goes on the wire: float lists, or base64 strings when ``encoding`` was "base64".
    embeddings: list[list[float]] | list[str]


@dataclass(frozen=True, slots=True)
class ClassifyResult:
    model: str
    results: list[list[LabelScore]]


class Dispatcher:
    """Runs requests on the models of one registry; see the module docstring."""

    def __init__(
        self,
        registry: ModelSource,
        *,
        limiter: RateLimiter,
        metrics: Metrics,
        drain: DrainState | None = None,
    ) -> None:
        self._registry = registry
        self._limiter = limiter
        self._metrics = metrics
        # While the server drains, new requests are refused with ``shutting_down``.
        self._drain = drain if drain is not None else DrainState()

    def admit(self, key_id: str) -> None:
        """Count one new request for ``key_id``, or refuse it (``shutting_down``, ``rate_limited``).

        Call it before a message becomes a request: a refusal is not a request's terminal error.
        """
        self._drain.check()
        self._limiter.check_request(key_id)

    async def generate(
        self,
        message: Generate,
        *,
        key_id: str,
        conversation: Sequence[ChatMessage] | None = None,
        trace: RequestTrace | None = None,
    ) -> AsyncGenerator[str | ToolCall | Finished, None]:
        """Text pieces and tool calls (each with a server-made ``id``, its ``call_id``) as the model
        produces them, then one `Finished`. Raises `SluiceError` only.

        ``conversation`` is the session's view of the turns (`protocol.session.Session.conversation`);
        without it the turns come from the message alone.
        """
        trace = trace if trace is not None else RequestTrace("generate", request=message.id)
        with self._accounting(trace) as outcome:
            name, backend, request = self._generation(message, conversation, trace)
            result: GenerationResult | None = None
            stream = backend.generate(request)
            try:
                async for item in stream:
                    if type(item) is str:  # the common case, once per token
                        if item:
                            self._piece(trace, key_id, name)
                            yield item
                    elif isinstance(item, GenerationResult):
                        result = item
                    elif isinstance(item, ToolCall):
                        yield ToolCall(name=item.name, arguments=item.arguments, id=new_call_id())
                    elif item:
                        self._piece(trace, key_id, name)
                        yield item
            finally:
                await _aclose(stream)
            finished = _finished(result, trace, name)
            outcome.append("done")
            yield finished

    async def relay(
        self,
        message: Generate,
        *,
        key_id: str,
        on_text: Callable[[str], None],
        on_call: Callable[[ToolCall], None],
        conversation: Sequence[ChatMessage] | None = None,
        trace: RequestTrace | None = None,
    ) -> Finished:
        """What `generate` yields, handed on as it comes: each text piece to ``on_text``, each tool
        call (with its ``id``) to ``on_call``; returns the `Finished`. Raises `SluiceError` only.

        For a consumer that acts on each piece at once (the session runtime): the backend's
        `relay` calls it, with no async generator resumed per token around the backend's."""
        trace = trace if trace is not None else RequestTrace("generate", request=message.id)
        with self._accounting(trace) as outcome:
            name, backend, request = self._generation(message, conversation, trace)
            piece = self._piece

            def text(item: str) -> None:
                if item:
                    piece(trace, key_id, name)
                    on_text(item)

            def call(item: ToolCall) -> None:
                on_call(ToolCall(name=item.name, arguments=item.arguments, id=new_call_id()))

            result = await backend.relay(request, text, call)
            finished = _finished(result, trace, name)
            outcome.append("done")
            return finished
        raise AssertionError("unreachable")  # pragma: no cover  (the with block returns or raises)

    async def embed(self, message: Embed, *, key_id: str, trace: RequestTrace | None = None) -> EmbedResult:
        """One vector per input, as float lists or base64 strings. Raises `SluiceError` only."""
        trace = trace if trace is not None else RequestTrace("embed", request=message.id)
        with self._accounting(trace) as outcome:
            name, embedder = self._registry.embedder(message.model)
            trace.model = name
            texts = message.texts
            self._started(trace)
            vectors = await embedder.embed(texts, normalize=message.normalize)
            if vectors.ndim != 2 or vectors.shape[0] != len(texts):
                raise RuntimeError(f"embedder {name} returned shape {vectors.shape} for {len(texts)} texts")
            result = EmbedResult(
                model=name,
                dimensions=int(vectors.shape[1]),
                vectors=vectors,
                embeddings=encode_vectors(vectors, message.encoding),
            )
            outcome.append("done")
            return result
        raise AssertionError("unreachable")  # pragma: no cover  (the with block returns or raises)

    async def classify(
        self, message: Classify, *, key_id: str, trace: RequestTrace | None = None
    ) -> ClassifyResult:
        """Zero-shot scores per input, sorted by score descending. Raises `SluiceError` only."""
        trace = trace if trace is not None else RequestTrace("classify", request=message.id)
        with self._accounting(trace) as outcome:
            name, classifier = self._registry.classifier(message.model)
            trace.model = name
            texts = message.texts
            self._started(trace)
            scored = await classifier.classify(texts, message.labels, multi_label=message.multi_label)
            if len(scored) != len(texts):
                raise RuntimeError(f"classifier {name} returned {len(scored)} results for {len(texts)} texts")
            results = [
                [LabelScore(label=label, score=float(score)) for label, score in row] for row in scored
            ]
            outcome.append("done")
            return ClassifyResult(model=name, results=results)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- bookkeeping -------------------------------------------------------------------------

    @contextmanager
    def _accounting(self, trace: RequestTrace) -> Iterator[list[str]]:
        """Counts the request in flight and finished, and is the one place exceptions from the
        backends become `SluiceError`. The body appends "done" to the yielded list on success;
        leaving without it and without an error means the request was cancelled."""
        outcome: list[str] = []
        self._metrics.request_started(trace.kind)
        try:
            yield outcome
        except SluiceError as exc:
            outcome.append(exc.code.value)
            raise
        except Exception:
            outcome.append(ErrorCode.INTERNAL.value)
            log.exception(
                "%s request failed unexpectedly",
                trace.kind,
                extra={"session": trace.session, "request": trace.request, "model": trace.model},
            )
            raise SluiceError.internal() from None
        finally:
            self._metrics.request_finished(trace.kind, outcome[0] if outcome else "cancelled")

    def _generation(
        self, message: Generate, conversation: Sequence[ChatMessage] | None, trace: RequestTrace
    ) -> tuple[str, Generator, GenerationRequest]:
        """The model's name, its backend and the backend request for ``message``; starts ``trace``."""
        name, backend = self._registry.generator(message.model)
        trace.model = name
        request = generation_request(name, message, conversation)
        self._started(trace)
        return name, backend, request

    def _started(self, trace: RequestTrace) -> None:
        trace.started_at = time.perf_counter()
        self._metrics.queue_wait(trace.kind, trace.started_at - trace.accepted_at)

    def _piece(self, trace: RequestTrace, key_id: str, model: str) -> None:
        if trace.first_token_at is None:
            trace.first_token_at = time.perf_counter()
            self._metrics.ttft(trace.first_token_at - trace.accepted_at)
        trace.pieces += 1
        self._metrics.tokens(1, model)
        self._limiter.consume_tokens(key_id, 1)


def new_call_id() -> str:
    """A unique ``call_id`` for one tool call (a later ``tool`` turn names it)."""
    return "call_" + secrets.token_urlsafe(12)


def generation_request(
    model: str, message: Generate, conversation: Sequence[ChatMessage] | None = None
) -> GenerationRequest:
    """The backend request for a `Generate`, with ``conversation`` (system and history included)
    as its turns when given; a plain prompt without history stays a prompt."""
    options = message.options
    sampling = SamplingOptions(
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        max_tokens=options.max_tokens,
        stop=tuple(options.stop or ()),
        seed=options.seed,
    )
    tools = tuple(
        Tool(
            name=tool.function.name,
            description=tool.function.description,
            parameters=tool.function.parameters,
        )
        for tool in message.tools or ()
    )
    choice = message.tool_choice
    if isinstance(choice, NamedToolChoice):
        tool_choice = ToolChoice(mode="required", name=choice.function.name)
    else:
        tool_choice = ToolChoice(mode=choice or "auto")
    if message.prompt is not None and not message.history:
        return GenerationRequest(
            model=model,
            prompt=message.prompt,
            system=message.system,
            options=sampling,
            format=message.format,
            tools=tools,
            tool_choice=tool_choice,
        )
    if conversation is None:
        conversation = build_conversation(message)
    turns = tuple(_turn(turn) for turn in conversation)
    return GenerationRequest(
        model=model,
        messages=turns,
        options=sampling,
        format=message.format,
        tools=tools,
        tool_choice=tool_choice,
    )


def _turn(turn: ChatMessage) -> Turn:
    calls = tuple(
        ToolCall(name=call.function.name, arguments=call.function.arguments, id=call.id)
        for call in turn.tool_calls or ()
    )
    return Turn(role=turn.role, content=turn.content, tool_calls=calls, tool_call_id=turn.tool_call_id)


def encode_vectors(
    vectors: npt.NDArray[np.float32], encoding: Literal["float", "base64"]
) -> list[list[float]] | list[str]:
    """Vectors as JSON-ready float lists, or as base64 of their little-endian float32 bytes.

    When a row is a whole number of base64 blocks (its byte count a multiple of 3, as for 384 or
    768 dimensions) the matrix is encoded in one call and the text cut into rows.
    """
    if encoding == "float":
        rows: list[list[float]] = vectors.astype(np.float32, copy=False).tolist()
        return rows
    little = np.ascontiguousarray(vectors, dtype="<f4")
    row_bytes = little.shape[1] * 4 if little.ndim == 2 else 0
    if row_bytes and row_bytes % 3 == 0:
        width = row_bytes // 3 * 4
        text = base64.b64encode(little.tobytes()).decode("ascii")
        return [text[start : start + width] for start in range(0, len(text), width)]
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]


def _finished(result: GenerationResult | None, trace: RequestTrace, model: str) -> Finished:
    if result is None:
        raise SluiceError(ErrorCode.UPSTREAM_ERROR, "the model stopped without finishing its reply")
    return Finished(
        finish_reason=result.finish_reason,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        timings=trace.timings(),
        model=model,
    )


async def _aclose(stream: AsyncIterator[object]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _ms(seconds: float) -> float:
    return round(max(seconds, 0.0) * 1000.0, 3)
