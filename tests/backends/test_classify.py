"""Zero-shot classification: accuracy of the real MiniLM on a labelled set, score semantics, and the
NLI pipeline adapter (with a fake pipeline and with a tiny randomly initialised NLI model)."""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from protocol.errors import ErrorCode, SluiceError
from server.backends.base import Embedder
from server.backends.classify import EmbeddingClassifier, NliClassifier, scores_from_pipeline
from server.backends.embedding import MINILM, SentenceEmbedder, minilm_path
from server.settings import Settings
from tests.backends.classify_set import LABELLED, LABELS, MULTI_LABELLED

pytestmark = pytest.mark.timeout(120)


def settings(**overrides: object) -> Settings:
    return Settings(ollama_urls=[], **overrides)  # type: ignore[arg-type]


class BagOfWords(Embedder):
    """A deterministic fake: the sum of a fixed random vector per lower-cased word."""

    dimensions = 64

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def embed(self, texts: Sequence[str], *, normalize: bool = True) -> npt.NDArray[np.float32]:
        self.calls.append(list(texts))
        rows = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, text in zip(rows, texts, strict=True):
            for word in text.lower().replace(".", " ").split():
                row += np.random.default_rng(zlib.crc32(word.encode())).standard_normal(self.dimensions)
        norms = np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return (rows / norms).astype(np.float32) if normalize else rows


@pytest.fixture(scope="module")
def minilm() -> Iterator[SentenceEmbedder]:
    embedder = SentenceEmbedder.load(MINILM, minilm_path(), settings())
    embedder.start()
    yield embedder
    asyncio.run(embedder.close())


@pytest.mark.models
async def test_minilm_zero_shot_is_right_on_at_least_90_percent(minilm: SentenceEmbedder) -> None:
    classifier = EmbeddingClassifier(minilm)
    texts = [text for text, _ in LABELLED]
    results = await classifier.classify(texts, LABELS)
    wrong = [
        (text, gold, result[0][0])
        for (text, gold), result in zip(LABELLED, results, strict=True)
        if result[0][0] != gold
    ]
    accuracy = 1 - len(wrong) / len(LABELLED)
    print(f"\nzero-shot-minilm accuracy: {accuracy:.1%} on {len(LABELLED)} sentences, {len(LABELS)} labels")
    for text, gold, got in wrong:
        print(f"  wrong: {text!r}: expected {gold}, got {got}")
    assert len(LABELLED) >= 40 and len(set(LABELS)) >= 4
    assert accuracy >= 0.9
    for result in results:
        assert abs(sum(score for _, score in result) - 1.0) < 1e-6


@pytest.mark.models
async def test_minilm_multi_label_scores_both_topics_of_a_mixed_sentence(minilm: SentenceEmbedder) -> None:
    classifier = EmbeddingClassifier(minilm)
    results = await classifier.classify([text for text, _ in MULTI_LABELLED], LABELS, multi_label=True)
    for (text, topics), result in zip(MULTI_LABELLED, results, strict=True):
        print(f"  {text!r}: {[(label, round(score, 2)) for label, score in result]}")
        assert {label for label, _ in result[:2]} == topics
        assert all(score > 0.5 for label, score in result if label in topics)
        assert all(0.0 <= score <= 1.0 for _, score in result)
    # Independent scores: the off-topic labels of single-topic sentences score low.
    single = await classifier.classify(["The striker scored twice in the derby."], LABELS, multi_label=True)
    assert single[0][0][0] == "sports" and single[0][0][1] > 0.5
    assert all(score < 0.5 for label, score in single[0] if label != "sports")


async def test_single_label_scores_sum_to_one_and_are_sorted() -> None:
    classifier = EmbeddingClassifier(BagOfWords())
    results = await classifier.classify(
        ["I like sports and football", "rain and snow"], ["sports", "weather", "food"]
    )
    for result in results:
        assert abs(sum(score for _, score in result) - 1.0) < 1e-9
        assert [score for _, score in result] == sorted((score for _, score in result), reverse=True)
        assert sorted(label for label, _ in result) == ["food", "sports", "weather"]
    assert results[0][0][0] == "sports"


async def test_multi_label_scores_are_independent_of_the_other_labels() -> None:
    classifier = EmbeddingClassifier(BagOfWords())
    text = ["sports news and weather news"]
    two = dict((await classifier.classify(text, ["sports", "weather"], multi_label=True))[0])
    three = dict((await classifier.classify(text, ["sports", "weather", "cooking"], multi_label=True))[0])
    assert two["sports"] == pytest.approx(three["sports"]) and two["weather"] == pytest.approx(
        three["weather"]
    )
    assert all(0.0 <= score <= 1.0 for score in three.values())
    assert sum(three.values()) != pytest.approx(1.0)


async def test_temperature_sharpens_single_label_scores() -> None:
    embedder = BagOfWords()
    text, labels = ["football match tonight"], ["football", "politics"]
    sharp = (await EmbeddingClassifier(embedder, temperature=0.01).classify(text, labels))[0][0][1]
    soft = (await EmbeddingClassifier(embedder, temperature=1.0).classify(text, labels))[0][0][1]
    assert sharp > soft > 0.5


async def test_label_vectors_are_cached_least_recently_used_first_out() -> None:
    embedder = BagOfWords()
    classifier = EmbeddingClassifier(embedder, templates=("about {label}", "{label}"), cache_size=3)
    await classifier.classify(["x"], ["a", "b"])
    assert embedder.calls[-1] == ["x", "about a", "a", "about b", "b"]  # one call: texts and prompts
    await classifier.classify(["y"], ["b", "a"])
    assert embedder.calls[-1] == ["y"]  # both labels cached
    await classifier.classify(["z"], ["c", "d"])  # evicts "b": "a" was used after it
    assert classifier.cached_labels == 3
    await classifier.classify(["w"], ["b", "a"])
    assert embedder.calls[-1] == ["w", "about b", "b"]


async def test_duplicate_labels_are_scored_once_and_no_labels_is_refused() -> None:
    classifier = EmbeddingClassifier(BagOfWords())
    result = (await classifier.classify(["text"], ["a", "b", "a"]))[0]
    assert sorted(label for label, _ in result) == ["a", "b"]
    with pytest.raises(SluiceError) as caught:
        await classifier.classify(["text"], [])
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert await classifier.classify([], ["a", "b"]) == []


# -- NLI: there is no NLI model available offline here, so these use a fake pipeline object and a
# -- tiny randomly initialised BERT saved with MiniLM's tokenizer (real pipeline code, random scores).


class FakePipeline:
    """Answers like transformers' zero-shot pipeline: label order shuffled, scores from a table."""

    def __init__(self, table: dict[str, dict[str, float]]) -> None:
        self.table = table
        self.calls: list[tuple[list[str], list[str], bool, str]] = []
        self.gate: threading.Event | None = None  # set: a call with the text "gate" waits for it
        self.entered = threading.Event()

    def __call__(
        self, texts: list[str], *, candidate_labels: list[str], multi_label: bool, hypothesis_template: str
    ) -> object:
        self.calls.append((texts, candidate_labels, multi_label, hypothesis_template))
        if self.gate is not None and "gate" in texts:
            self.entered.set()
            self.gate.wait(10)
        out = []
        for text in texts:
            scores = {label: self.table[text][label] for label in candidate_labels}
            if not multi_label:
                total = sum(scores.values())
                scores = {label: score / total for label, score in scores.items()}
            ordered = sorted(scores, key=lambda label: label)  # not by score: the adapter must sort
            out.append({"sequence": text, "labels": ordered, "scores": [scores[label] for label in ordered]})
        return out[0] if len(out) == 1 else out


async def test_nli_results_are_mapped_sorted_and_batched_per_label_set() -> None:
    table = {
        "goal!": {"sports": 0.9, "weather": 0.2, "food": 0.1},
        "rain": {"sports": 0.1, "weather": 0.8, "food": 0.1},
    }
    pipe = FakePipeline({**table, "gate": {"sports": 0.5, "weather": 0.5}})
    classifier = NliClassifier("fake-nli", pipe, settings())
    classifier.start()
    try:
        # Hold the worker in a pass so that the three requests below meet in the next one.
        pipe.gate = threading.Event()
        held = asyncio.create_task(classifier.classify(["gate"], ["sports", "weather"]))
        assert await asyncio.to_thread(pipe.entered.wait, 5)
        waiting = asyncio.gather(
            classifier.classify(["goal!", "rain"], ["sports", "weather"]),
            classifier.classify(["goal!"], ["sports", "weather"], multi_label=True),
            classifier.classify(["rain"], ["food", "weather", "sports"]),
        )
        await asyncio.sleep(0.01)
        pipe.gate.set()
        await held
        single, multi, other = await waiting
        pipe.calls = [call for call in pipe.calls if call[0] != ["gate"]]
    finally:
        await classifier.close()
    assert single[0][0][0] == "sports" and single[1][0][0] == "weather"
    assert all(abs(sum(score for _, score in result) - 1) < 1e-9 for result in single + other)
    assert multi == [[("sports", 0.9), ("weather", 0.2)]]
    assert other[0][0][0] == "weather" and other[0][0][1] == pytest.approx(0.8)
    # One pass, one pipeline call per (labels, multi_label) group in it.
    assert sorted((len(texts), tuple(labels), multi) for texts, labels, multi, _ in pipe.calls) == [
        (1, ("food", "weather", "sports"), False),
        (1, ("sports", "weather"), True),
        (2, ("sports", "weather"), False),
    ]


def test_pipeline_output_is_checked() -> None:
    good = {"labels": ["b", "a"], "scores": [0.3, 0.7]}
    assert scores_from_pipeline(good, ["a", "b"]) == [("a", 0.7), ("b", 0.3)]
    for bad in ("text", {"labels": ["a"]}, {"labels": ["a", "c"], "scores": [0.5, 0.5]}):
        with pytest.raises((TypeError, ValueError)):
            scores_from_pipeline(bad, ["a", "b"])


async def test_a_failing_pipeline_is_an_internal_error() -> None:
    def broken(*args: Any, **kwargs: Any) -> object:
        raise RuntimeError("tensor shape mismatch at /secret/path")

    classifier = NliClassifier("broken-nli", broken, settings())
    classifier.start()
    try:
        with pytest.raises(SluiceError) as caught:
            await classifier.classify(["x"], ["a", "b"])
    finally:
        await classifier.close()
    assert caught.value.code is ErrorCode.INTERNAL and "secret" not in caught.value.message


@pytest.fixture(scope="module")
def tiny_nli_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    labels = {0: "contradiction", 1: "neutral", 2: "entailment"}
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        id2label=labels,
        label2id={name: i for i, name in labels.items()},
    )
    path = tmp_path_factory.mktemp("tiny-nli")
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.models
async def test_a_real_transformers_nli_pipeline_runs_through_the_adapter(tiny_nli_path: Path) -> None:
    classifier = NliClassifier.load("tiny-nli", str(tiny_nli_path), settings())
    classifier.start()
    try:
        single = await classifier.classify(
            ["I love football", "Rain tomorrow"], ["sports", "weather", "food"]
        )
        multi = await classifier.classify(["I love football"], ["sports", "weather"], multi_label=True)
    finally:
        await classifier.close()
    for result in single:
        assert sorted(label for label, _ in result) == ["food", "sports", "weather"]
        assert abs(sum(score for _, score in result) - 1.0) < 1e-5
        assert [score for _, score in result] == sorted((score for _, score in result), reverse=True)
    assert all(0.0 <= score <= 1.0 for _, score in multi[0]) and len(multi[0]) == 2


def test_a_missing_nli_model_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(SluiceError) as caught:
        NliClassifier.load("nope", str(tmp_path / "absent"), settings())
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND
