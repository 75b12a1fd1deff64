"""Constrained decoding for the local model: grammars become a token mask per decode step.

The engine is llguidance (chosen by measurement, see README): `Grammars` wraps the model's
tokenizer once, compiles grammar texts (Lark with ``%json`` blocks, built by `local_tools`)
into matchers and caches them by text, and hands each constrained sequence its own
`Constraint`: `mask` sets the logits of every token the grammar forbids to ``-inf`` before
sampling, and `advance` feeds the sampled token back. A JSON Schema is enforced exactly or
refused: llguidance reports keywords it does not implement, and `check` turns that (and an
invalid schema) into `GrammarError` with a message that names them and is safe to show a client.

Compiling runs on the decode thread (never on the event loop); nothing here knows about batches.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Iterable
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from server.backends.base import JsonSchema

__all__ = ["Constraint", "GrammarError", "Grammars", "json_block"]

# Compact, fixed separators: a small model given free whitespace may emit newlines forever.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[([^\]]*)\]")
_CACHE_SIZE = 64
_MESSAGE_CHARS = 200


class GrammarError(ValueError):
    """A schema or grammar the engine cannot enforce; the message names why and is safe to show."""


def json_block(schema: JsonSchema) -> str:
    """``%json {...}``: a Lark rule body matching exactly the instances of ``schema``.

    Our own ``x-guidance`` options replace any the schema carries, so a client cannot turn on
    the engine's lenient mode (which would skip keywords it cannot enforce).
    """
    if not isinstance(schema, dict):
        schema = dict(schema)
    options = {**{k: v for k, v in schema.items() if k != "x-guidance"}, "x-guidance": _JSON_OPTIONS}
    return "%json " + json.dumps(options, ensure_ascii=False, sort_keys=False)


class Constraint:
    """One sequence's grammar state: mask the logits, then advance by the sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int) -> None:
        self._matcher = matcher
        self._vocab = vocab
        self._bits = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of the 1-D ``logits`` with every token the grammar forbids now at ``-inf``."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        if self._matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self._matcher.get_error()}")
        bits = np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little")
        width = logits.shape[-1]
        if bits.shape[0] < width:  # logits past the tokenizer's vocabulary: never allowed
            bits = np.pad(bits, (0, width - bits.shape[0]))
        forbidden = torch.from_numpy(bits[:width] == 0)
        return logits.masked_fill(forbidden, float("-inf"))

    def advance(self, token: int) -> None:
        """Feed the sampled token; raises RuntimeError if the grammar forbids it (a bug, not bad input)."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"token {token} rejected by the grammar: {self._matcher.get_error()}")

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (EOS is allowed now)."""
        return self._matcher.is_accepting()

    @property
    def complete(self) -> bool:
        """Nothing but EOS can follow: the sequence ends here."""
        return self._matcher.is_stopped()


class Grammars:
    """Compiles grammars for one tokenizer; thread-safe, with an LRU cache keyed by grammar text."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, vocab: int) -> None:
        self._tokenizer = tokenizer
        self._vocab = vocab
        self._lock = threading.Lock()
        # A compiled matcher, or the engine's error message for a grammar it refused.
        self._compiled: collections.OrderedDict[str, llguidance.LLMatcher | str] = collections.OrderedDict()

    @classmethod
    def for_tokenizer(cls, hf_tokenizer: Any, eos_ids: Iterable[int]) -> Grammars:
        """Wrap a fast Hugging Face tokenizer (takes a few hundred ms: do it once, at load)."""
        eos = sorted(eos_ids)
        tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=eos)
        return cls(tokenizer, len(hf_tokenizer))

    def check(self, schema: JsonSchema, where: str) -> None:
        """Raise `GrammarError` naming ``where`` when ``schema`` cannot be enforced or is invalid."""
        try:
            self._matcher(f"start: {json_block(schema)}")
        except GrammarError as exc:
            raise GrammarError(_explain(str(exc), where)) from None

    def constraint(self, grammar: str) -> Constraint:
        """A fresh `Constraint` for a Lark grammar (compiled once, then copied from the cache)."""
        return Constraint(self._matcher(grammar).deep_copy(), self._vocab)

    def _matcher(self, grammar: str) -> llguidance.LLMatcher:
        with self._lock:
            cached = self._compiled.get(grammar)
            if cached is not None:
                self._compiled.move_to_end(grammar)
        if cached is None:
            cached = self._compile(grammar)
            with self._lock:
                self._compiled[grammar] = cached
                while len(self._compiled) > _CACHE_SIZE:
                    self._compiled.popitem(last=False)
        if isinstance(cached, str):
            raise GrammarError(cached)
        return cached

    def _compile(self, grammar: str) -> llguidance.LLMatcher | str:
        # Errors are cached too: a client retrying a bad schema costs one dict lookup.
        matcher = llguidance.LLMatcher(
            self._tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
        )
        if matcher.is_error():
            return matcher.get_error() or "rejected"
        return matcher


def _explain(error: str, where: str) -> str:
    found = _UNIMPLEMENTED.search(error)
    if found:
        keys = ", ".join(k.strip().strip('"') for k in found.group(1).split(","))
        return f"{where}: the embedded model cannot enforce the JSON Schema keyword(s) {keys}"
    detail = " ".join(line.strip() for line in error.splitlines() if line.strip()) or "rejected"
    return f"{where}: invalid or unsupported JSON Schema: {detail[:_MESSAGE_CHARS]}"
