"""Zero-shot classification: by embedding similarity (default) or through a local NLI model.

`EmbeddingClassifier` (model ``zero-shot-minilm``) embeds each label through a few prompt
templates, averages them into one cached unit vector per label, and compares texts to labels by
cosine similarity. Single-label scores are a softmax over the similarities with a temperature (they
sum to 1); multi-label scores are independent, ``sigmoid(scale * (cosine - shift))`` in [0, 1].
It shares its embedder, and so the embedder's micro-batcher, with plain ``embed`` requests.

`NliClassifier` serves any local transformers NLI model through the ``zero-shot-classification``
pipeline, configured as ``name=path`` in ``settings.nli_classify_models``; its pipeline calls run on
its own micro-batcher's worker thread.

Nothing here runs a forward pass on the event loop or reads the environment.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.errors import ErrorCode, SluiceError
from server.backends.base import Classifier, Embedder, LabelScores
from server.backends.batcher import MicroBatcher
from server.backends.embedding import normalize_rows
from server.backends.threads import set_torch_threads
from server.settings import Settings

__all__ = [
    "TEMPLATES",
    "ZERO_SHOT_MINILM",
    "EmbeddingClassifier",
    "NliClassifier",
    "scores_from_pipeline",
]

log = logging.getLogger(__name__)

ZERO_SHOT_MINILM = "zero-shot-minilm"

# Averaging a few phrasings makes a label vector less sensitive to any one template; on the
# labelled set in tests/backends/classify_set.py these three beat each of them alone.
TEMPLATES: tuple[str, ...] = ("This text is about {label}.", "{label}", "A sentence about {label}.")

# Calibrated on tests/backends/classify_set.py with TEMPLATES by a class-balanced logistic fit of
# "this label applies" on the cosine (scale 43, shift 0.123): the cosine of a text with its own
# label has p10 = 0.15, with the other labels p90 = 0.09. Balanced means no prior on how many of the
# asked labels apply; the slope is rounded down a little to temper overconfidence.
MULTI_LABEL_SHIFT = 0.12
MULTI_LABEL_SCALE = 40.0
# Cosine gaps between labels are a few tenths; 0.05 turns a 0.1 gap into a ~7x probability ratio.
SOFTMAX_TEMPERATURE = 0.05


def _unique(labels: Sequence[str]) -> list[str]:
    unique = list(dict.fromkeys(labels))
    if not unique:
        raise SluiceError(ErrorCode.INVALID_REQUEST, "classify needs at least one label")
    return unique


def _ranked(labels: Sequence[str], scores: npt.NDArray[np.float64]) -> LabelScores:
    order = np.argsort(-scores, kind="stable")
    return [(labels[i], float(scores[i])) for i in order]


class EmbeddingClassifier(Classifier):
    """Zero-shot scores from cosine similarity between text and label-prompt embeddings."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        templates: Sequence[str] = TEMPLATES,
        temperature: float = SOFTMAX_TEMPERATURE,
        scale: float = MULTI_LABEL_SCALE,
        shift: float = MULTI_LABEL_SHIFT,
        cache_size: int = 4096,
    ) -> None:
        if not templates or temperature <= 0 or cache_size < 1:
            raise ValueError("need templates, a positive temperature and a positive cache size")
        self.embedder = embedder
        self.templates = tuple(templates)
        self.temperature = temperature
        self.scale = scale
        self.shift = shift
        self.cache_size = cache_size
        self._label_cache: OrderedDict[str, npt.NDArray[np.float32]] = OrderedDict()

    @property
    def cached_labels(self) -> int:
        return len(self._label_cache)

    async def classify(
        self, texts: Sequence[str], labels: Sequence[str], *, multi_label: bool = False
    ) -> list[LabelScores]:
        unique = _unique(labels)
        if not texts:
            return []
        # Look the cached labels up before awaiting: another request may evict them meanwhile.
        vectors_of = {label: self._recall(label) for label in unique if label in self._label_cache}
        missing = [label for label in unique if label not in vectors_of]
        prompts = [template.format(label=label) for label in missing for template in self.templates]
        # Texts and any uncached label prompts go in one call, so they share one batcher pass.
        vectors = await self.embedder.embed([*texts, *prompts], normalize=True)
        text_vectors = vectors[: len(texts)]
        if missing:
            per_label = vectors[len(texts) :].reshape(len(missing), len(self.templates), -1).mean(axis=1)
            for label, vector in zip(missing, normalize_rows(per_label), strict=True):
                vectors_of[label] = vector
                self._remember(label, vector)
        label_vectors = np.stack([vectors_of[label] for label in unique])
        cosine = (text_vectors @ label_vectors.T).astype(np.float64)
        if multi_label:
            scores = 1.0 / (1.0 + np.exp(-self.scale * (cosine - self.shift)))
        else:
            logits = cosine / self.temperature
            logits -= logits.max(axis=1, keepdims=True)
            weights = np.exp(logits)
            scores = weights / weights.sum(axis=1, keepdims=True)
        return [_ranked(unique, row) for row in scores]

    def _remember(self, label: str, vector: npt.NDArray[np.float32]) -> None:
        self._label_cache[label] = vector
        self._label_cache.move_to_end(label)
        while len(self._label_cache) > self.cache_size:
            self._label_cache.popitem(last=False)

    def _recall(self, label: str) -> npt.NDArray[np.float32]:
        self._label_cache.move_to_end(label)
        return self._label_cache[label]


def scores_from_pipeline(output: object, labels: Sequence[str]) -> LabelScores:
    """Map one result of the transformers zero-shot pipeline to (label, score) pairs, desc."""
    if not isinstance(output, dict):
        raise TypeError("zero-shot pipeline returned a non-dict result")
    got_labels, got_scores = output.get("labels"), output.get("scores")
    if (
        not isinstance(got_labels, list)
        or not isinstance(got_scores, list)
        or len(got_labels) != len(got_scores)
    ):
        raise TypeError("zero-shot pipeline result lacks matching labels and scores")
    pairs = {
        str(label): min(1.0, max(0.0, float(score)))
        for label, score in zip(got_labels, got_scores, strict=True)
    }
    if set(pairs) != set(labels):
        raise ValueError("zero-shot pipeline scored other labels than asked")
    return sorted(pairs.items(), key=lambda pair: pair[1], reverse=True)


@dataclass(frozen=True, slots=True)
class _NliItem:
    text: str
    labels: tuple[str, ...]
    multi_label: bool


def _nli_lengths(items: Sequence[_NliItem]) -> list[int]:
    """Estimated tokens per item for the batcher's cap: about four characters a token, plus the
    hypothesis, for each of its text-label pairs (the pipeline runs one row per pair)."""
    return [(len(item.text) // 4 + 16) * len(item.labels) for item in items]


class NliClassifier(Classifier):
    """A transformers ``zero-shot-classification`` pipeline behind a micro-batcher.

    ``pipeline`` is called as ``pipeline(texts, candidate_labels=[...], multi_label=bool,
    hypothesis_template=...)`` on the worker thread; it returns one dict (``labels``, ``scores``)
    per text, or a bare dict for a single text.
    """

    def __init__(
        self,
        name: str,
        pipeline: Callable[..., Any],
        settings: Settings,
        *,
        hypothesis_template: str = "This example is about {}.",
    ) -> None:
        self.name = name
        self.pipeline = pipeline
        self.hypothesis_template = hypothesis_template
        self.batcher: MicroBatcher[_NliItem, LabelScores] = MicroBatcher.from_settings(
            name,
            self._forward,
            settings,
            lengths=_nli_lengths,
            on_thread_start=functools.partial(set_torch_threads, settings.torch_threads),
        )

    @classmethod
    def load(cls, name: str, path: str, settings: Settings) -> NliClassifier:
        """Build the pipeline from a local model folder (blocking; call it off the event loop)."""
        started = time.perf_counter()
        try:
            from transformers import pipeline

            pipe = pipeline("zero-shot-classification", model=path, device="cpu", local_files_only=True)
        except Exception as exc:
            log.error("NLI model %s failed to load from %s", name, path, exc_info=exc)
            raise SluiceError(
                ErrorCode.MODEL_NOT_FOUND, f"classify model {name} could not be loaded"
            ) from exc
        log.debug("loaded NLI classify model %s from %s in %.2f s", name, path, time.perf_counter() - started)
        return cls(name, pipe, settings)

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()

    async def classify(
        self, texts: Sequence[str], labels: Sequence[str], *, multi_label: bool = False
    ) -> list[LabelScores]:
        unique = tuple(_unique(labels))
        return await self.batcher.submit([_NliItem(text, unique, multi_label) for text in texts])

    def _forward(self, items: list[_NliItem]) -> list[LabelScores]:
        # One pipeline call per distinct (labels, multi_label) in the batch: the pipeline takes a
        # single candidate-label list per call.
        groups: dict[tuple[tuple[str, ...], bool], list[int]] = {}
        for position, item in enumerate(items):
            groups.setdefault((item.labels, item.multi_label), []).append(position)
        results: list[LabelScores] = [[] for _ in items]
        for (labels, multi_label), positions in groups.items():
            output = self.pipeline(
                [items[p].text for p in positions],
                candidate_labels=list(labels),
                multi_label=multi_label,
                hypothesis_template=self.hypothesis_template,
            )
            outputs = [output] if isinstance(output, dict) else list(output)
            if len(outputs) != len(positions):
                raise ValueError("zero-shot pipeline returned the wrong number of results")
            for position, one in zip(positions, outputs, strict=True):
                results[position] = scores_from_pipeline(one, labels)
        return results
