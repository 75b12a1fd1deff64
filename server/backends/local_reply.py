"""One sequence of the local decode loop: its sampled tokens become text, tool calls and a result.

A `Reply` samples the sequence's next token from its logits row (masked first by its
`local_grammar.Constraint` when the request has a grammar, so the other rows of the batch are
untouched), detokenizes it (`local_text.TextStream`), streams text pieces, holds back a reply
that is a tool call until it is complete, and delivers the final `GenerationResult`. A call cut
off by ``max_tokens`` is dropped (``finish_reason="length"``); a complete one arrives as
`ToolCall` items and ``finish_reason="tool_calls"``.

Runs on the decode thread only; the batch, its KV cache and its padding belong to `local_decode`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from server.backends.base import GenerationResult
from server.backends.local_grammar import Constraint
from server.backends.local_sampling import sample
from server.backends.local_text import TextStream
from server.backends.local_tools import CALL_OPEN, parse_calls

if TYPE_CHECKING:
    from server.backends.local_decode import Job

__all__ = ["DecodeCounters", "Reply"]

log = logging.getLogger(__name__)

Decode = Callable[[Sequence[int]], str]


@dataclass(slots=True)
class DecodeCounters:
    """Written by the decode thread, read from any thread (tests, metrics, benchmarks)."""

    decoded_tokens: int = 0
    # Tokens sampled under a grammar, and the time spent in it for them (mask and advance).
    masked_tokens: int = 0
    grammar_ns: int = 0


@dataclass(eq=False, slots=True)
class Reply:
    """A sequence in the batch; touched only by the decode thread."""

    job: Job
    decode: Decode
    eos_ids: frozenset[int]
    counters: DecodeCounters
    prompt_tokens: int
    prefill_ms: float
    first_token_at: float
    constraint: Constraint | None = None
    length: int = 0  # tokens of this sequence held in the KV cache
    next_token: int = 0
    completion_tokens: int = 0
    holding: bool = False  # the reply is a tool call: kept back until it is complete
    text: TextStream = field(init=False)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.length = self.prompt_tokens
        self.holding = self.job.plan.calls == "forced"
        # Stop strings apply to text replies; a call's JSON is never cut by one.
        self.text = TextStream(self.decode, () if self.holding else self.job.sampling.stop)
        self.generator = self.job.sampling.generator()

    def next(self, logits: torch.Tensor) -> bool:
        """Sample and record the next token from this row's logits; False when the reply ended
        (its result, or its error, already delivered)."""
        constraint = self.constraint
        if constraint is None:
            return self._accept(sample(logits, self.job.sampling, self.generator))
        try:
            started = time.perf_counter_ns()
            masked = constraint.mask(logits)
            masked_at = time.perf_counter_ns()
            token = sample(masked, self.job.sampling, self.generator)
            sampled_at = time.perf_counter_ns()
            if token not in self.eos_ids:
                constraint.advance(token)
            self.counters.grammar_ns += masked_at - started + time.perf_counter_ns() - sampled_at
            self.counters.masked_tokens += 1
        except Exception as exc:  # this row's grammar failed: only this row ends
            log.exception("constrained sampling failed")
            self.job.deliver(exc)
            return False
        return self._accept(token)

    def _accept(self, token: int) -> bool:
        self.counters.decoded_tokens += 1
        if self.job.cancelled:
            return False
        if token in self.eos_ids:
            self._finish("stop")
            return False
        self.completion_tokens += 1
        if self.completion_tokens == 1 and self.job.plan.calls == "auto":
            # The auto grammar lets only a call begin with "<": the first token decides.
            if self.decode([token]).startswith(CALL_OPEN[0]):
                self.holding, self.text = True, TextStream(self.decode)
        piece = self.text.push(token)
        if piece and not self.holding:
            self.job.deliver(piece)
        if self.text.stopped or (self.constraint is not None and self.constraint.complete):
            self._finish("stop")
            return False
        if self.completion_tokens >= self.job.sampling.max_tokens:
            self._finish("length")
            return False
        self.next_token = token
        return True

    def _finish(self, reason: Literal["stop", "length"]) -> None:
        tail = self.text.flush()
        finish: Literal["stop", "length", "tool_calls"] = reason
        if self.holding:
            if reason == "stop":  # complete: the grammar accepted it
                try:
                    calls = parse_calls(self.text.text)
                except (ValueError, KeyError, TypeError) as exc:
                    log.exception("a grammar-complete tool call did not parse")
                    self.job.deliver(exc)
                    return
                for call in calls:
                    self.job.deliver(call)
                finish = "tool_calls"
        elif tail:
            self.job.deliver(tail)
        now = time.perf_counter()
        self.job.deliver(
            GenerationResult(
                finish_reason=finish,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                prompt_eval_ms=self.prefill_ms,
                eval_ms=(now - self.first_token_at) * 1000.0,
                total_ms=(now - self.job.submitted) * 1000.0,
            )
        )
