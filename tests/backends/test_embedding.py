"""Sentence embeddings: the real shipped MiniLM (marked ``models``) and the embedder's own logic."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from protocol.errors import ErrorCode, SluiceError
from server.backends.batcher import BatchRecord
from server.backends.embedding import (
    CALIBRATION,
    MINILM,
    SentenceEmbedder,
    calibrate,
    minilm_path,
    normalize_rows,
)
from server.backends.threads import ThreadTuner, thread_candidates
from server.dispatcher import encode_vectors
from server.settings import Settings

pytestmark = pytest.mark.timeout(120)


def settings(**overrides: object) -> Settings:
    return Settings(ollama_urls=[], **overrides)  # type: ignore[arg-type]


class _Remember(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


LOAD_LOG = _Remember()


@pytest.fixture(scope="module")
def minilm() -> Iterator[SentenceEmbedder]:
    logger = logging.getLogger("server.backends.embedding")
    logger.addHandler(LOAD_LOG)
    # setLevel, not `.level =`: only setLevel clears the logger's cached isEnabledFor answers,
    # which an earlier load in this process has already filled.
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        embedder = SentenceEmbedder.load(MINILM, minilm_path(), settings())
    finally:
        logger.removeHandler(LOAD_LOG)
        logger.setLevel(level)
    embedder.start()
    yield embedder
    asyncio.run(embedder.close())


def cosine(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.models
async def test_embeddings_have_the_right_shape_type_and_norm(minilm: SentenceEmbedder) -> None:
    texts = ["Hello there.", "A second, somewhat longer sentence about nothing much.", "Third."]
    vectors = await minilm.embed(texts)
    assert vectors.shape == (3, 384) and minilm.dimensions == 384
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert (await minilm.embed([])).shape == (0, 384)


@pytest.mark.models
async def test_paraphrases_are_close_and_unrelated_texts_are_not(minilm: SentenceEmbedder) -> None:
    # Paraphrases that keep most content words. Looser ones that swap words for synonyms ("sofa" /
    # "couch", "stock market fell" / "shares dropped") score 0.67-0.80 with this small model.
    pairs = [
        ("The cat is sleeping on the sofa.", "A cat is asleep on the sofa."),
        ("How do I reset my password?", "How can I reset my password?"),
        ("How do I reset my password?", "What are the steps to change my password?"),
        ("A man is playing a guitar on stage.", "On stage, a man plays the guitar."),
    ]
    unrelated = "Volcanic eruptions release large amounts of sulfur dioxide."
    vectors = await minilm.embed([text for pair in pairs for text in pair] + [unrelated])
    for i in range(len(pairs)):
        close = cosine(vectors[2 * i], vectors[2 * i + 1])
        far = cosine(vectors[2 * i], vectors[-1])
        print(f"paraphrase {close:.3f} vs unrelated {far:.3f}: {pairs[i][0]!r}")
        assert close > 0.8
        assert far < 0.3


@pytest.mark.models
async def test_concurrent_calls_share_passes_and_match_direct_encoding(minilm: SentenceEmbedder) -> None:
    texts = [f"Sentence number {i} talks about {'apples ' * (i % 4)}and more." for i in range(32)]
    before = minilm.batcher.stats.batches
    results = await asyncio.gather(*(minilm.embed([text]) for text in texts))
    passes = minilm.batcher.stats.batches - before
    assert passes < len(texts) / 2, passes
    direct = minilm.encode(texts)
    # Batched with padding vs one big batch: the same vectors up to float noise.
    np.testing.assert_allclose(np.vstack(results), direct, atol=1e-4)


@pytest.mark.models
def test_the_load_time_is_logged(minilm: SentenceEmbedder) -> None:
    assert any(
        re.match(r"loaded embed model all-MiniLM-L6-v2 \(384 dimensions\) from .* in \d+\.\d\d s", m)
        for m in LOAD_LOG.messages
    ), LOAD_LOG.messages


def test_a_bad_path_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(SluiceError) as caught:
        SentenceEmbedder.load("broken", str(tmp_path), settings())
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND
    assert str(tmp_path) not in caught.value.message


async def test_normalize_is_applied_per_request_on_raw_vectors() -> None:
    rows = {"a": [3.0, 4.0], "b": [0.0, 0.0], "c": [1.0, 0.0]}
    raw = np.array([rows[t] for t in "abc"], dtype=np.float32)

    def encode(texts: list[str]) -> npt.NDArray[np.float32]:
        return np.array([rows[t] for t in texts], dtype=np.float32)

    embedder = SentenceEmbedder("fake", encode, 2, settings())
    embedder.start()
    try:
        plain, unit = await asyncio.gather(
            embedder.embed(["a", "b", "c"], normalize=False), embedder.embed(["a", "b"], normalize=True)
        )
    finally:
        await embedder.close()
    np.testing.assert_array_equal(plain, raw)
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0]])
    assert unit.dtype == np.float32


async def test_a_wrong_shape_from_the_model_is_an_internal_error() -> None:
    embedder = SentenceEmbedder("fake", lambda texts: np.zeros((1, 3), np.float32), 2, settings())
    embedder.start()
    try:
        with pytest.raises(SluiceError) as caught:
            await embedder.embed(["a", "b"])
    finally:
        await embedder.close()
    assert caught.value.code is ErrorCode.INTERNAL


def test_the_embedder_follows_the_batching_settings() -> None:
    embedder = SentenceEmbedder(
        "fake",
        lambda texts: np.zeros((len(texts), 2), np.float32),
        2,
        settings(embed_max_batch=7, embed_max_batch_tokens=500, embed_max_queue=99),
    )
    batcher = embedder.batcher
    assert (batcher.max_batch, batcher.max_batch_tokens, batcher.max_queue) == (7, 500, 99)


@pytest.mark.models
async def test_the_batcher_is_given_token_counts_and_passes_match_sentence_transformers(
    minilm: SentenceEmbedder,
) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["Short.", "A much longer sentence, with quite a few more words in it than the first."]
    records: list[BatchRecord] = []
    minilm.batcher.add_observer(records.append)
    vectors = await minilm.embed(texts, normalize=False)
    tokenizer = SentenceTransformer(minilm_path(), device="cpu").tokenizer
    longest = max(len(tokenizer(text)["input_ids"]) for text in texts)
    assert records[-1].padded_tokens == 2 * longest  # rows x longest, in real tokens
    reference = SentenceTransformer(minilm_path(), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    assert minilm.tuner is not None and sum(minilm.tuner.chosen.values()) >= 1


@pytest.mark.models
def test_thread_counts_are_timed_at_load_for_the_common_sizes(minilm: SentenceEmbedder) -> None:
    assert minilm.tuner is not None
    if len(minilm.tuner.candidates) < 2:
        pytest.skip("one core: nothing to choose")
    # One size class per CALIBRATION entry, each timed with every thread count.
    assert len(minilm.tuner.measured_classes()) >= len(CALIBRATION) - 1


def test_calibration_times_each_count_after_a_warm_up_pass_of_that_count() -> None:
    tuner = ThreadTuner([1, 2], clock=FakeClock())
    seen: list[int] = []

    def encode(texts: list[str]) -> npt.NDArray[np.float32]:
        seen.append(len(texts))
        threads = tuner.choose(len(texts) * 26)
        tuner.record(len(texts) * 26, threads, 0.01)
        return np.zeros((len(texts), 2), np.float32)

    calibrate(encode, tuner)
    assert seen == [rows for rows, _ in CALIBRATION for _ in range(4)]
    assert tuner.measured_classes() == sorted({tuner.size_class(rows * 26) for rows, _ in CALIBRATION})


async def test_calibration_runs_on_the_worker_thread_before_start_returns() -> None:
    tuner = ThreadTuner([1, 2], clock=FakeClock())
    threads: list[str] = []

    def encode(texts: list[str]) -> npt.NDArray[np.float32]:
        threads.append(threading.current_thread().name)
        tuner.record(len(texts) * 26, tuner.choose(len(texts) * 26), 0.01)
        return np.zeros((len(texts), 2), np.float32)

    embedder = SentenceEmbedder("cal", encode, 2, settings(), tuner=tuner)
    assert threads == []  # nothing is timed before the worker starts
    embedder.start()
    try:
        # Timed where the passes run, and done by the time start returns.
        assert threads == ["batcher-cal"] * (4 * len(CALIBRATION))
        assert len(tuner.measured_classes()) == len(CALIBRATION)
        assert (await embedder.embed(["x"], normalize=False)).shape == (1, 2)
    finally:
        await embedder.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_thread_tuner_tries_each_count_then_keeps_the_fastest() -> None:
    clock = FakeClock()
    tuner = ThreadTuner([1, 2], explore_interval_s=10.0, clock=clock)
    cost = {1: 1.0, 2: 3.0}  # seconds per pass: one thread is faster here

    def one_pass(tokens: int) -> int:
        threads = tuner.choose(tokens)
        clock.now += cost[threads]
        tuner.record(tokens, threads, cost[threads])
        return threads

    # Each count: a warm-up pass (not counted), then a timed one; then the faster one.
    assert [one_pass(1000) for _ in range(4)] == [1, 1, 2, 2]
    steady = [one_pass(1000) for _ in range(60)]  # 60 s of passes
    # Re-checked after 10 s times how much slower it was (3x): about every 30 s.
    assert steady.count(2) in (1, 2) and steady.count(1) >= 58
    # Another size class is measured on its own.
    assert [one_pass(20) for _ in range(4)] == [1, 1, 2, 2]
    cost[1], cost[2] = 5.0, 1.0  # the load changed: two threads are now faster
    later = [one_pass(1000) for _ in range(40)]
    assert later[-10:].count(2) >= 9


def test_a_slow_first_pass_of_a_count_does_not_decide_it() -> None:
    clock = FakeClock()
    tuner = ThreadTuner([1, 2], clock=clock)
    # Two threads are faster, but their first pass (which starts the OpenMP team) took 20x as long.
    cost = iter([1.0, 1.0, 20.0, 0.5])
    for _ in range(4):
        threads = tuner.choose(500)
        tuner.record(500, threads, next(cost))
        clock.now += 1.0
    assert [tuner.choose(500) for _ in range(5)] == [2] * 5


def test_the_first_pass_of_a_count_on_another_thread_is_not_counted() -> None:
    clock = FakeClock()
    tuner = ThreadTuner([1, 2], clock=clock)
    for threads, seconds in ((1, 1.0), (1, 1.0), (2, 0.5), (2, 0.5)):  # calibrated on this thread
        assert tuner.choose(500) == threads
        tuner.record(500, threads, seconds)

    def worker() -> None:  # the batcher's thread: its first two-thread pass starts its own team
        assert tuner.choose(500) == 2
        tuner.record(500, 2, 30.0)
        tuner.record(500, 2, 0.5)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert [tuner.choose(500) for _ in range(5)] == [2] * 5
    assert tuner.chosen == {1: 2, 2: 4}


def test_more_threads_must_be_clearly_faster() -> None:
    clock = FakeClock()
    tuner = ThreadTuner([2, 1], margin=1.2, clock=clock)
    assert tuner.candidates == [1, 2]
    for _ in range(4):
        threads = tuner.choose(500)
        tuner.record(500, threads, {1: 1.0, 2: 0.9}[threads])  # two threads only 10% faster
        clock.now += 1.0
    assert [tuner.choose(500) for _ in range(5)] == [1] * 5


def test_a_fixed_thread_count_is_never_tuned() -> None:
    assert thread_candidates(3) == [3]
    tuner = ThreadTuner(thread_candidates(3))
    assert {tuner.choose(n) for n in (1, 100, 10_000)} == {3}
    assert thread_candidates(0)[0] == 1


@pytest.mark.parametrize("dimensions", [3, 4, 384])
def test_base64_vectors_are_each_rows_little_endian_float32(dimensions: int) -> None:
    # 3 and 384 dimensions take the whole-matrix path (rows of whole base64 blocks), 4 the per-row one.
    vectors = np.random.default_rng(dimensions).standard_normal((5, dimensions)).astype(">f4")
    encoded = encode_vectors(vectors, "base64")
    assert encoded == [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
    assert all(isinstance(text, str) for text in encoded)
    assert encode_vectors(vectors[:0], "base64") == []


def test_normalize_rows_keeps_zero_rows_zero() -> None:
    rows = normalize_rows(np.array([[0.0, 2.0], [0.0, 0.0]], dtype=np.float32))
    np.testing.assert_array_equal(rows, [[0.0, 1.0], [0.0, 0.0]])
