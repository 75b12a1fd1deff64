"""Sampling for the local model: request options resolved once, then one token per logits row.

Defaults when a request leaves an option unset are the SmolLM2-135M-Instruct model card's
(temperature 0.2, top_p 0.9, no top_k): a 135M model rambles at the 0.7 to 0.8 that larger models
use. Temperature 0 means greedy decoding. Every request samples with its own `torch.Generator`,
so a seed reproduces the same text whether the request runs alone or inside a batch.

Bad options raise `InvalidOptions` with a message safe to show the client; the backend's one
error-mapping function turns it into ``invalid_request``. Nothing here knows about batches.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from server.backends.base import SamplingOptions

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_P",
    "InvalidOptions",
    "Sampling",
    "resolve",
    "sample",
]

DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_TOKENS = 512


class InvalidOptions(ValueError):
    """An option the local model cannot honour; the message names it and is safe to show."""


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: tuple[str, ...]
    seed: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return generator


def resolve(options: SamplingOptions, *, max_context: int) -> Sampling:
    """Fill in defaults and check ranges; ``max_tokens`` is capped to what the context holds."""
    temperature = DEFAULT_TEMPERATURE if options.temperature is None else float(options.temperature)
    if not math.isfinite(temperature) or temperature < 0.0:
        raise InvalidOptions("options.temperature must be a finite number >= 0")
    top_p = DEFAULT_TOP_P if options.top_p is None else float(options.top_p)
    if not (0.0 < top_p <= 1.0):
        raise InvalidOptions("options.top_p must be in (0, 1]")
    top_k = 0 if options.top_k is None else options.top_k
    if top_k < 0:
        raise InvalidOptions("options.top_k must be >= 0 (0 turns it off)")
    max_tokens = DEFAULT_MAX_TOKENS if options.max_tokens is None else options.max_tokens
    if max_tokens < 1:
        raise InvalidOptions("options.max_tokens must be >= 1")
    # A seed of any size is accepted (JSON clients send what they like); torch takes 64 bits.
    seed = secrets.randbits(63) if options.seed is None else options.seed % (1 << 64)
    return Sampling(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_tokens=min(max_tokens, max_context - 1),
        stop=tuple(s for s in options.stop if s),
        seed=seed,
    )


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token id from a 1-D row of logits."""
    if sampling.greedy:
        return int(logits.argmax())
    scaled = logits.float() / sampling.temperature
    if 0 < sampling.top_k < scaled.numel():
        # Only the k best can be drawn, so sorting those k is enough for top_p too.
        values, ids = torch.topk(scaled, sampling.top_k)
    else:
        values, ids = torch.sort(scaled, descending=True)
    probs = torch.softmax(values, dim=-1)
    if sampling.top_p < 1.0:
        # Keep the smallest head whose mass reaches top_p (the first token always stays).
        before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(before >= sampling.top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(ids[choice])
