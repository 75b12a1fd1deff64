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

A job whose plan (`local_tools.OutputPlan`) has a grammar gets a `local_grammar.Constraint`,
compiled at admission on this thread: before each of its tokens is sampled, the tokens its
grammar forbids are masked out of its own logits row, so the other rows of the batch sample
exactly as they would alone. It ends when the grammar is complete or the model picks EOS (only
allowed once the grammar accepts). A reply that is a tool call is held back, not streamed, and
delivered as `ToolCall` items with ``finish_reason="tool_calls"``; a call cut off by
``max_tokens`` is dropped (``finish_reason="length"``).

This module never awaits and never runs on the event loop; it raises nothing to the caller.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import DynamicCache

from server.backends.base import GenerationItem, GenerationRequest, GenerationResult
from server.backends.local_grammar import Constraint, GrammarError, Grammars
from server.backends.local_model import LocalModel
from server.backends.local_sampling import Sampling, sample
from server.backends.local_text import TextStream
from server.backends.local_tools import CALL_OPEN, OutputPlan, parse_calls

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


@dataclass(eq=False, slots=True)
class _Row:
    """A sequence in the batch; touched only by the worker thread."""

    job: Job
    text: TextStream
    generator: torch.Generator
    prompt_tokens: int
    length: int  # tokens of this sequence held in the KV cache
    prefill_ms: float
    first_token_at: float
    constraint: Constraint | None = None
    holding: bool = False  # the reply is a tool call: kept back until it is complete
    next_token: int = 0
    completion_tokens: int = 0


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
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        # Counters for tests and metrics (read from any thread; written by the worker only).
        self.decoded_tokens = 0
        self.steps = 0
        # Tokens sampled under a grammar, and the time spent in it for them (mask and advance).
        self.masked_tokens = 0
        self.grammar_ns = 0
        self._thread = threading.Thread(target=self._run, name="sluice-local-decode", daemon=True)
        self._thread.start()

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
                forced = job.plan.calls == "forced"
                row = _Row(
                    job=job,
                    # Stop strings apply to text replies; a call's JSON is never cut by one.
                    text=TextStream(self._model.decode, () if forced else job.sampling.stop),
                    generator=job.sampling.generator(),
                    prompt_tokens=len(ids),
                    length=len(ids),
                    prefill_ms=(now - started) * 1000.0,
                    first_token_at=now,
                    constraint=constraint,
                    holding=forced,
                )
                if self._next(row, out.logits[index, -1]):
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
                if self._next(row, out.logits[index, -1]):
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

    def _next(self, row: _Row, logits: torch.Tensor) -> bool:
        """Sample and record the row's next token; False when the row finished."""
        constraint = row.constraint
        if constraint is None:
            return self._accept(row, sample(logits, row.job.sampling, row.generator))
        try:
            started = time.perf_counter_ns()
            masked = constraint.mask(logits)
            masked_at = time.perf_counter_ns()
            token = sample(masked, row.job.sampling, row.generator)
            sampled_at = time.perf_counter_ns()
            if token not in self._model.eos_ids:
                constraint.advance(token)
            self.grammar_ns += masked_at - started + time.perf_counter_ns() - sampled_at
            self.masked_tokens += 1
        except Exception as exc:  # this row's grammar failed: only this row ends
            log.exception("constrained sampling failed")
            row.job.deliver(exc)
            return False
        return self._accept(row, token)

    def _accept(self, row: _Row, token: int) -> bool:
        """Record a sampled token; False when the row finished (its result already delivered)."""
        self.decoded_tokens += 1
        if row.job.cancelled:
            return False
        if token in self._model.eos_ids:
            self._finish(row, "stop")
            return False
        row.completion_tokens += 1
        if row.completion_tokens == 1 and row.job.plan.calls == "auto":
            # The auto grammar lets only a call begin with "<": the first token decides.
            if self._model.decode([token]).startswith(CALL_OPEN[0]):
                row.holding, row.text = True, TextStream(self._model.decode)
        piece = row.text.push(token)
        if piece and not row.holding:
            row.job.deliver(piece)
        if row.text.stopped or (row.constraint is not None and row.constraint.complete):
            self._finish(row, "stop")
            return False
        if row.completion_tokens >= row.job.sampling.max_tokens:
            self._finish(row, "length")
            return False
        row.next_token = token
        return True

    def _finish(self, row: _Row, reason: Literal["stop", "length"]) -> None:
        tail = row.text.flush()
        finish: Literal["stop", "length", "tool_calls"] = reason
        if row.holding:
            if reason == "stop":  # complete: the grammar accepted it
                try:
                    calls = parse_calls(row.text.text)
                except (ValueError, KeyError, TypeError) as exc:
                    log.exception("a grammar-complete tool call did not parse")
                    row.job.deliver(exc)
                    return
                for call in calls:
                    row.job.deliver(call)
                finish = "tool_calls"
        elif tail:
            row.job.deliver(tail)
        now = time.perf_counter()
        row.job.deliver(
            GenerationResult(
                finish_reason=finish,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                prompt_eval_ms=row.prefill_ms,
                eval_ms=(now - row.first_token_at) * 1000.0,
                total_ms=(now - row.job.submitted) * 1000.0,
            )
        )

    def _join(self, rows: list[_Row], kv: KV) -> None:
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
