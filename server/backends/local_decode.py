"""The batched decode loop of the local model: one worker thread, one KV cache for all requests.

Requests (`Job`) queue up; between decode steps the worker admits newcomers (up to
``max_batch`` sequences in all): it prefills the ones that arrived together in one forward pass,
samples their first tokens, and merges their KV cache into the running batch (an idle loop waits
a few milliseconds after a first arrival, so a burst is prefilled as one). The batch cache is
left-padded: every row's real tokens sit
at the right end, so a row of length ``n`` in a cache of length ``L`` is masked out before column
``L - n``, and its position ids count only its own tokens. One decode step then runs the model
once over all rows (the weights are read once per step instead of once per request, which is
what makes four requests cost far less than four times one). Finished and cancelled rows leave
between steps and the leading padding that no remaining row needs is trimmed off.

Results go back to the event loop with ``loop.call_soon_threadsafe`` into each job's asyncio
queue: text pieces, then a `GenerationResult`, or an exception (mapped to `SluiceError` by the
consumer, in `server.backends.local`). A job's `cancel()` takes effect before the next step, so a
cancelled request gets at most the one token already being computed.

Each row is a `local_reply.Reply`, which turns its sampled tokens into text, tool calls and the
result. A job whose plan (`local_tools.OutputPlan`) has a grammar gets a
`local_grammar.Constraint`, compiled at admission on this thread: before each of its tokens is
sampled, the tokens its grammar forbids are masked out of its own logits row, so the other rows
of the batch sample exactly as they would alone. It ends when the grammar is complete or the
model picks EOS (only allowed once the grammar accepts).

This module never awaits and never runs on the event loop; it raises nothing to the caller.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any

import torch
from transformers import DynamicCache

from server.backends.base import GenerationItem, GenerationRequest
from server.backends.local_grammar import Constraint, GrammarError, Grammars
from server.backends.local_model import LocalModel
from server.backends.local_reply import DecodeCounters, Reply
from server.backends.local_sampling import Sampling
from server.backends.local_tools import OutputPlan

__all__ = ["DecodeLoop", "Job", "LoopClosed"]

log = logging.getLogger(__name__)

# How long an idle loop waits for more requests after the first one arrives (see _wait_for_work).
_GATHER_S = 0.005

Delivery = GenerationItem | BaseException
KV = list[tuple[torch.Tensor, torch.Tensor]]


class LoopClosed(Exception):
    """The decode loop shut down (server stopping) before the job finished."""


class Job:
    """One generation request as the decode loop sees it; made and cancelled on the event loop."""

    def __init__(
        self,
        request: GenerationRequest,
        sampling: Sampling,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[Delivery],
        plan: OutputPlan | None = None,
    ) -> None:
        self.request = request
        self.sampling = sampling
        self.plan = plan or OutputPlan()
        self.submitted = time.perf_counter()
        self._loop = loop
        self._queue = queue
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop this job; the worker drops it before its next token. Safe from any thread."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def deliver(self, item: Delivery) -> None:
        """Hand one item to the consumer (called on the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody can read this any more
            self.cancel()


class DecodeLoop:
    """Owns the model on one worker thread. `submit` jobs; `close` at the end."""

    def __init__(
        self,
        model: LocalModel,
        *,
        max_batch: int,
        max_pending: int,
        threads: int = 1,
        grammars: Grammars | None = None,
    ) -> None:
        self._model = model
        self._grammars = grammars
        self._threads = threads
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._rows: list[Reply] = []
        self._cache: DynamicCache | None = None
        # Counters for tests and metrics (read from any thread; written by the worker only).
        self.counters = DecodeCounters()
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="sluice-local-decode", daemon=True)
        self._thread.start()

    @property
    def decoded_tokens(self) -> int:
        """Tokens sampled since the start, across all requests (cancelled ones included)."""
        return self.counters.decoded_tokens

    @property
    def active(self) -> int:
        """Jobs queued or in the batch."""
        with self._cond:
            return len(self._pending) + len(self._rows)

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full. Raises `LoopClosed` after `close`."""
        with self._cond:
            if self._closing:
                raise LoopClosed()
            if len(self._pending) >= self._max_pending:
                return False
            self._pending.append(job)
            self._cond.notify()
            return True

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; unfinished jobs get `LoopClosed`. Blocks up to ``timeout`` seconds."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        # Per thread: torch's intra-op count is set by (and for) the thread that runs the ops.
        torch.set_num_threads(self._threads)
        try:
            with torch.inference_mode():
                while (newcomers := self._wait_for_work()) is not None:
                    if newcomers:
                        self._admit(newcomers)
                    # After the prefills, which take a while: a cancel that came meanwhile counts.
                    self._drop_cancelled()
                    if self._rows:
                        self._step()
        except BaseException as exc:  # a bug here must not leave consumers waiting forever
            log.exception("local decode loop crashed")
            with self._cond:
                self._closing = True
            self._fail_all(exc)
            raise
        self._fail_all(LoopClosed())

    def _wait_for_work(self) -> list[Job] | None:
        with self._cond:
            while not (self._closing or self._pending or self._rows):
                self._cond.wait()
            if self._closing:
                return None
            if not self._rows:
                # Idle until now: requests sent together arrive a few ms apart; prefill them as one.
                deadline = time.monotonic() + _GATHER_S
                while len(self._pending) < self._max_batch and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            newcomers: list[Job] = []
            while self._pending and len(self._rows) + len(newcomers) < self._max_batch:
                newcomers.append(self._pending.popleft())
            return newcomers

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            jobs = [row.job for row in self._rows] + list(self._pending)
            self._pending.clear()
            self._rows = []
            self._cache = None
        for job in jobs:
            if not job.cancelled:
                job.deliver(exc)

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill newcomers together, emit their first tokens, and merge them into the batch."""
        prompts: list[tuple[Job, list[int], Constraint | None]] = []
        for job in jobs:
            if job.cancelled:
                continue
            try:
                constraint = self._constrain(job.plan)
                ids = self._model.encode(
                    job.request, job.sampling.max_tokens, tools_prompt=job.plan.tools_prompt
                )
            except GrammarError as exc:  # the client's schema: its error, nothing to log
                job.deliver(exc)
                continue
            except Exception as exc:
                log.exception("local prompt encoding failed")
                job.deliver(exc)
                continue
            prompts.append((job, ids, constraint))
        if not prompts:
            return
        try:
            # Left-padded like the batch itself, so the prefilled block merges as it is.
            lengths = torch.tensor([len(ids) for _, ids, _ in prompts])
            width = int(lengths.max())
            columns = torch.arange(width)[None, :] - (width - lengths)[:, None]
            started = time.perf_counter()
            cache = DynamicCache()
            out = self._model.model(
                input_ids=torch.tensor([[0] * (width - len(ids)) + ids for _, ids, _ in prompts]),
                attention_mask=(columns >= 0).long(),
                position_ids=columns.clamp(min=0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            now = time.perf_counter()
            rows, keep = [], []
            for index, (job, ids, constraint) in enumerate(prompts):
                row = Reply(
                    job=job,
                    decode=self._model.decode,
                    eos_ids=self._model.eos_ids,
                    counters=self.counters,
                    prompt_tokens=len(ids),
                    prefill_ms=(now - started) * 1000.0,
                    first_token_at=now,
                    constraint=constraint,
                )
                if row.next(out.logits[index, -1]):
                    rows.append(row)
                    keep.append(index)
        except Exception as exc:
            log.exception("local prefill failed for %d prompts", len(prompts))
            for job, _, _ in prompts:
                job.deliver(exc)
            return
        if rows:
            self._join(rows, _take(_layers(cache), keep, max(row.length for row in rows)))

    def _step(self) -> None:
        """One token for every row of the batch."""
        assert self._cache is not None
        rows = self._rows
        width = self._cache.get_seq_length()
        lengths = torch.tensor([row.length for row in rows])
        mask = (torch.arange(width + 1)[None, :] >= (width - lengths)[:, None]).long()
        try:
            out = self._model.model(
                input_ids=torch.tensor([[row.next_token] for row in rows]),
                attention_mask=mask,
                position_ids=lengths[:, None],
                past_key_values=self._cache,  # grows in place by one column
                use_cache=True,
            )
            self.steps += 1
            keep = []
            for index, row in enumerate(rows):
                row.length += 1
                if row.job.cancelled:
                    continue
                if row.next(out.logits[index, -1]):
                    keep.append(index)
        except Exception as exc:
            log.exception("local decode step failed for a batch of %d", len(rows))
            for row in rows:
                row.job.deliver(exc)
            with self._cond:
                self._rows, self._cache = [], None
            return
        self._select(keep)

    def _constrain(self, plan: OutputPlan) -> Constraint | None:
        if plan.grammar is None:
            return None
        if self._grammars is None:
            raise GrammarError("format and tools are not available for this model")
        for where, schema in plan.schemas:
            self._grammars.check(schema, where)
        return self._grammars.constraint(plan.grammar)

    def _join(self, rows: list[Reply], kv: KV) -> None:
        """Merge prefilled rows into the batch, left-padding whichever side is shorter."""
        if self._cache is not None:
            width = max(self._cache.get_seq_length(), kv[0][0].shape[2])
            kv = [
                (_cat_left_padded(k, k_new, width), _cat_left_padded(v, v_new, width))
                for (k, v), (k_new, v_new) in zip(_layers(self._cache), kv, strict=True)
            ]
        with self._cond:
            self._rows = [*self._rows, *rows]
            self._cache = DynamicCache(ddp_cache_data=kv)

    def _drop_cancelled(self) -> None:
        self._select([i for i, row in enumerate(self._rows) if not row.job.cancelled])

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows; cut the leading padding no remaining row needs."""
        if len(keep) == len(self._rows):
            return
        rows = [self._rows[i] for i in keep]
        cache: DynamicCache | None = None
        if rows and self._cache is not None:
            kv = _take(_layers(self._cache), keep, max(row.length for row in rows))
            cache = DynamicCache(ddp_cache_data=kv)
        with self._cond:
            self._rows, self._cache = rows, cache


def _layers(cache: DynamicCache) -> KV:
    """The per-layer (keys, values) tensors, each ``[batch, kv_heads, length, head_dim]``."""
    layers: list[Any] = list(cache.layers)  # DynamicLayer: plain growing tensors
    return [(layer.keys, layer.values) for layer in layers]


def _take(kv: KV, rows: list[int], length: int) -> KV:
    """These rows of the cache, cut to the last ``length`` columns (the padding before is unused)."""
    index = torch.tensor(rows)
    return [(k[index, :, -length:], v[index, :, -length:]) for k, v in kv]


def _cat_left_padded(batch: torch.Tensor, new: torch.Tensor, width: int) -> torch.Tensor:
    def pad(t: torch.Tensor) -> torch.Tensor:
        missing = width - t.shape[2]
        return torch.nn.functional.pad(t, (0, 0, missing, 0)) if missing else t

    return torch.cat([pad(batch), pad(new)], dim=0)
