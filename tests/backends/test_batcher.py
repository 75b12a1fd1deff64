"""The micro-batcher with a fake forward function: continuous batching, token caps, buckets,
routing, dropping, bounds."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from protocol.errors import ErrorCode, SluiceError
from server.backends.batch_plan import FLOOR, Buckets, length_class
from server.backends.batcher import BatchRecord, MicroBatcher, forward_error
from server.settings import Settings

pytestmark = pytest.mark.timeout(30)


class Recorder:
    """A forward function that records every batch it sees; optionally blocks or fails."""

    def __init__(self, fail_on: str | None = None, exc: Exception | None = None) -> None:
        self.batches: list[list[str]] = []
        self.fail_on = fail_on
        self.exc = exc or RuntimeError("boom")
        self.gate: threading.Event | None = None  # set: forward waits for it on "gate" items
        self.entered = threading.Event()

    def __call__(self, items: list[str]) -> Sequence[str]:
        self.batches.append(list(items))
        if self.gate is not None and "gate" in items:
            self.entered.set()
            self.gate.wait(10)
        if self.fail_on is not None and self.fail_on in items:
            raise self.exc
        return [item.upper() for item in items]

    @property
    def seen(self) -> list[str]:
        return [item for batch in self.batches for item in batch]


Factory = Callable[..., MicroBatcher[str, str]]


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    made: list[MicroBatcher[str, str]] = []

    def factory(
        forward: Callable[[list[str]], Sequence[str]],
        *,
        max_batch: int = 64,
        max_batch_tokens: int = 16384,
        max_queue: int = 1000,
        sort: bool = True,
        pass_overhead_tokens: int = 64,
    ) -> MicroBatcher[str, str]:
        batcher: MicroBatcher[str, str] = MicroBatcher(
            "fake",
            forward,
            max_batch=max_batch,
            max_batch_tokens=max_batch_tokens,
            max_queue=max_queue,
            lengths=(lambda items: [len(item) for item in items]) if sort else None,
            pass_overhead_tokens=pass_overhead_tokens,
        )
        batcher.start()
        made.append(batcher)
        return batcher

    yield factory
    for batcher in made:
        await batcher.close()


async def hold_worker(batcher: MicroBatcher[str, str], recorder: Recorder) -> asyncio.Task[list[str]]:
    """Start a pass that blocks on ``recorder.gate`` and return once the worker is inside it."""
    recorder.gate = threading.Event()
    task = asyncio.create_task(batcher.submit(["gate"]))
    assert await asyncio.to_thread(recorder.entered.wait, 5)
    return task


async def release(recorder: Recorder, gate: asyncio.Task[list[str]]) -> None:
    """Let the held pass finish (what was submitted meanwhile runs next)."""
    assert recorder.gate is not None
    recorder.gate.set()
    assert await gate == ["GATE"]


def after_gate(recorder: Recorder) -> list[list[str]]:
    return [batch for batch in recorder.batches if batch != ["gate"]]


async def test_results_are_routed_to_their_requests_under_concurrency(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=16)
    requests = [[f"r{i}-t{j}-{'x' * ((i * 7 + j) % 5)}" for j in range(1 + i % 4)] for i in range(60)]
    results = await asyncio.gather(*(batcher.submit(texts) for texts in requests))
    for texts, got in zip(requests, results, strict=True):
        assert got == [text.upper() for text in texts]
    assert sorted(recorder.seen) == sorted(text for texts in requests for text in texts)
    assert batcher.stats.items == sum(map(len, requests))
    assert batcher.stats.batches == len(recorder.batches) < 60  # batching happened


async def test_max_batch_is_respected(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=4)
    gate = await hold_worker(batcher, recorder)
    waiting = [asyncio.create_task(batcher.submit([f"t{i}"])) for i in range(10)]
    await asyncio.sleep(0.01)
    await release(recorder, gate)
    assert await asyncio.gather(*waiting) == [[f"T{i}"] for i in range(10)]
    assert [len(batch) for batch in after_gate(recorder)] == [4, 4, 2]
    # Cumulative "le" buckets, the held one-item pass included.
    assert [batcher.stats.size_buckets[b] for b in (1, 2, 4)] == [1, 2, 4]


async def test_an_idle_worker_runs_a_lone_request_at_once(make: Factory) -> None:
    """No fixed wait for company: the pass of a lone text starts as soon as the worker wakes
    (the old batcher waited ``max_wait_ms``, 5 ms by default, before every such pass)."""
    recorder = Recorder()
    records: list[BatchRecord] = []
    batcher = make(recorder)
    batcher.add_observer(records.append)
    for i in range(20):
        assert await batcher.submit([f"only{i}"]) == [f"ONLY{i}"]
    assert [len(batch) for batch in recorder.batches] == [1] * 20
    assert statistics.median(record.queue_wait_ms for record in records) < 2.0


async def test_what_arrives_during_a_pass_makes_up_the_next_pass(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=64)
    gate = await hold_worker(batcher, recorder)
    waiting = [asyncio.create_task(batcher.submit([f"t{i}"])) for i in range(8)]
    await asyncio.sleep(0.01)
    assert batcher.queued == 8
    await release(recorder, gate)
    await asyncio.gather(*waiting)
    assert after_gate(recorder) == [[f"t{i}" for i in range(8)]]


async def test_items_are_sorted_by_length_within_a_batch(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=10)
    gate = await hold_worker(batcher, recorder)
    texts = ["ccc", "a", "eeeee", "bb", "dddd"]
    waiting = [asyncio.create_task(batcher.submit([text])) for text in texts]
    await asyncio.sleep(0.01)
    await release(recorder, gate)
    results = await asyncio.gather(*waiting)
    assert after_gate(recorder) == [["a", "bb", "ccc", "dddd", "eeeee"]]
    assert results == [[text.upper()] for text in texts]


async def test_padded_tokens_per_pass_stay_under_the_cap(make: Factory) -> None:
    recorder = Recorder()
    records: list[BatchRecord] = []
    batcher = make(recorder, max_batch=64, max_batch_tokens=40, pass_overhead_tokens=0)
    batcher.add_observer(records.append)
    gate = await hold_worker(batcher, recorder)
    texts = ["x" * (1 + (i * 5) % 9) + str(i) for i in range(30)]  # 2 to 11 characters
    waiting = [asyncio.create_task(batcher.submit([text])) for text in texts]
    await asyncio.sleep(0.01)
    await release(recorder, gate)
    assert await asyncio.gather(*waiting) == [[text.upper()] for text in texts]
    passes = after_gate(recorder)
    assert sorted(recorder.seen) == sorted([*texts, "gate"])
    assert all(len(batch) * max(map(len, batch)) <= 40 for batch in passes), passes
    assert len(passes) < len(texts) / 3  # still batched, just capped
    assert batcher.stats.padded_tokens_max <= 40
    assert all(
        r.padded_tokens == r.size * max(map(len, b)) for r, b in zip(records, recorder.batches, strict=True)
    )


async def test_a_text_longer_than_the_cap_runs_alone(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_tokens=10)
    gate = await hold_worker(batcher, recorder)
    waiting = [asyncio.create_task(batcher.submit([text])) for text in ("a", "y" * 30, "b")]
    await asyncio.sleep(0.01)
    await release(recorder, gate)
    assert await asyncio.gather(*waiting) == [["A"], ["Y" * 30], ["B"]]
    assert ["y" * 30] in after_gate(recorder)


async def test_one_long_text_does_not_pad_the_short_ones(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder)
    gate = await hold_worker(batcher, recorder)
    long = "L" * 200
    shorts = [f"s{i}" for i in range(10)]
    waiting = [asyncio.create_task(batcher.submit([text])) for text in (long, *shorts)]
    await asyncio.sleep(0.01)
    await release(recorder, gate)
    await asyncio.gather(*waiting)
    # The oldest item's bucket goes first; the short texts share the next pass.
    assert after_gate(recorder) == [[long], shorts]
    assert batcher.stats.padded_tokens_sum == len("gate") + 200 + 10 * 2


async def test_buckets_go_oldest_first(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder)
    gate = await hold_worker(batcher, recorder)
    order = ["s1", "M" * 100, "s2", "L" * 300, "s3"]
    waiting = [asyncio.create_task(batcher.submit([text])) for text in order]
    await asyncio.sleep(0.01)
    await release(recorder, gate)
    await asyncio.gather(*waiting)
    assert after_gate(recorder) == [["s1", "s2", "s3"], ["M" * 100], ["L" * 300]]


async def test_neighbouring_buckets_merge_when_padding_is_cheaper_than_a_pass(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder, pass_overhead_tokens=64)
    gate = await hold_worker(batcher, recorder)
    texts = ["a" * (FLOOR - 1), "b" * FLOOR, "c" * (FLOOR + 1)]
    assert length_class(len(texts[0])) != length_class(len(texts[1]))
    waiting = [asyncio.create_task(batcher.submit([text])) for text in texts]
    await asyncio.sleep(0.01)
    await release(recorder, gate)
    await asyncio.gather(*waiting)
    assert after_gate(recorder) == [texts]


def test_the_planner_caps_rows_and_tokens_and_skips_dead_owners() -> None:
    buckets: Buckets[str] = Buckets(max_rows=3, max_tokens=100, pass_overhead_tokens=0)
    buckets.add("a", [10, 10, 10, 10])
    buckets.add("dead", [10, 10])
    buckets.add("b", [40])
    alive = lambda owner: owner != "dead"  # noqa: E731
    passes = []
    while taken := buckets.take(alive):
        passes.append([(slot.owner, slot.index, slot.length) for slot in taken])
    assert passes == [
        [("a", 0, 10), ("a", 1, 10), ("a", 2, 10)],
        [("a", 3, 10)],
        [("b", 0, 40)],
    ]
    assert buckets.owners() == []


async def test_a_failing_length_function_fails_only_its_request() -> None:
    def lengths(items: Sequence[str]) -> list[int]:
        if "bad" in items:
            raise ValueError("cannot tokenize")
        return [len(item) for item in items]

    batcher: MicroBatcher[str, str] = MicroBatcher(
        "t", lambda items: [item.upper() for item in items], max_batch=4, max_queue=16, lengths=lengths
    )
    batcher.start()
    try:
        bad, good = await asyncio.gather(
            batcher.submit(["bad"]), batcher.submit(["good"]), return_exceptions=True
        )
    finally:
        await batcher.close()
    assert isinstance(bad, SluiceError) and bad.code is ErrorCode.INTERNAL
    assert good == ["GOOD"] and batcher.queued == 0


async def test_requests_that_arrive_together_are_measured_in_one_lengths_call() -> None:
    calls: list[list[str]] = []
    recorder = Recorder()

    def lengths(items: Sequence[str]) -> list[int]:
        calls.append(list(items))
        return [len(item) for item in items]

    batcher: MicroBatcher[str, str] = MicroBatcher("t", recorder, max_batch=8, max_queue=16, lengths=lengths)
    batcher.start()
    try:
        gate = await hold_worker(batcher, recorder)
        waiting = [asyncio.create_task(batcher.submit(texts)) for texts in (["a", "bb"], ["ccc"], ["dd"])]
        await asyncio.sleep(0.01)
        await release(recorder, gate)
        assert await asyncio.gather(*waiting) == [["A", "BB"], ["CCC"], ["DD"]]
    finally:
        await batcher.close()
    assert calls == [["gate"], ["a", "bb", "ccc", "dd"]]


def test_from_settings_follows_the_batching_settings() -> None:
    settings = Settings(ollama_urls=[], embed_max_batch=7, embed_max_batch_tokens=900, embed_max_queue=99)  # type: ignore[call-arg]
    started: list[bool] = []
    batcher: MicroBatcher[str, str] = MicroBatcher.from_settings(
        "t", lambda items: items, settings, on_thread_start=lambda: started.append(True)
    )
    assert (batcher.max_batch, batcher.max_batch_tokens, batcher.max_queue) == (7, 900, 99)
    assert batcher.on_thread_start is not None


async def test_a_large_request_is_split_across_passes(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=3, sort=False)
    texts = [f"t{i}" for i in range(8)]
    assert await batcher.submit(texts) == [text.upper() for text in texts]
    assert recorder.batches == [["t0", "t1", "t2"], ["t3", "t4", "t5"], ["t6", "t7"]]


async def test_a_cancelled_request_is_dropped_before_it_runs(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=4)
    gate = await hold_worker(batcher, recorder)
    victim = asyncio.create_task(batcher.submit(["drop-1", "drop-2"]))
    survivor = asyncio.create_task(batcher.submit(["keep"]))
    await asyncio.sleep(0.01)
    assert batcher.queued == 3
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert batcher.queued == 1
    assert recorder.gate is not None
    recorder.gate.set()
    assert await survivor == ["KEEP"]
    assert await gate == ["GATE"]
    assert "drop-1" not in recorder.seen and "drop-2" not in recorder.seen
    assert batcher.stats.dropped_items == 2


async def test_a_cancelled_split_request_drops_only_what_has_not_run(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=2, sort=False)
    recorder.gate = threading.Event()
    task = asyncio.create_task(batcher.submit(["gate", "a", "b", "c", "d"]))
    assert await asyncio.to_thread(recorder.entered.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    recorder.gate.set()
    assert await batcher.submit(["after"]) == ["AFTER"]
    assert recorder.batches == [["gate", "a"], ["after"]]
    assert batcher.stats.dropped_items == 3


async def test_a_full_queue_answers_overloaded(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=2, max_queue=4)
    gate = await hold_worker(batcher, recorder)
    queued = [asyncio.create_task(batcher.submit([f"q{i}", f"q{i}!"])) for i in range(2)]
    await asyncio.sleep(0.01)
    assert batcher.queued == 4
    with pytest.raises(SluiceError) as caught:
        await batcher.submit(["one too many"])
    assert caught.value.code is ErrorCode.OVERLOADED and caught.value.retryable
    assert batcher.stats.rejected_requests == 1
    assert recorder.gate is not None
    recorder.gate.set()
    assert await asyncio.gather(*queued) == [["Q0", "Q0!"], ["Q1", "Q1!"]]
    await gate
    assert await batcher.submit(["room again"]) == ["ROOM AGAIN"]


async def test_a_request_larger_than_the_queue_is_refused(make: Factory) -> None:
    batcher = make(Recorder(), max_queue=3)
    with pytest.raises(SluiceError) as caught:
        await batcher.submit(["a", "b", "c", "d"])
    assert caught.value.code is ErrorCode.OVERLOADED


async def test_a_failed_pass_fails_only_the_requests_in_it(make: Factory) -> None:
    recorder = Recorder(fail_on="boom")
    batcher = make(recorder, max_batch=2, sort=False)
    gate = await hold_worker(batcher, recorder)
    same_batch = [asyncio.create_task(batcher.submit([text])) for text in ("boom", "neighbour")]
    later = asyncio.create_task(batcher.submit(["later"]))
    await asyncio.sleep(0.01)
    assert recorder.gate is not None
    recorder.gate.set()
    outcomes = await asyncio.gather(*same_batch, return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, SluiceError) and outcome.code is ErrorCode.INTERNAL
        assert "boom" not in outcome.message
    assert await later == ["LATER"]
    assert await gate == ["GATE"]
    assert batcher.stats.failed_batches == 1
    assert await batcher.submit(["still works"]) == ["STILL WORKS"]


async def test_a_failed_split_request_does_not_run_its_rest(make: Factory) -> None:
    recorder = Recorder(fail_on="boom")
    batcher = make(recorder, max_batch=2, sort=False)
    with pytest.raises(SluiceError):
        await batcher.submit(["x", "boom", "y", "z"])
    assert recorder.batches == [["x", "boom"]]
    assert batcher.queued == 0


async def test_a_wrong_number_of_results_is_an_internal_error(make: Factory) -> None:
    batcher = make(lambda items: ["only one"])
    with pytest.raises(SluiceError) as caught:
        await batcher.submit(["a", "b"])
    assert caught.value.code is ErrorCode.INTERNAL


def test_forward_errors_map_in_one_place() -> None:
    own = SluiceError(ErrorCode.INVALID_REQUEST, "bad input")
    assert forward_error(own) is own
    assert forward_error(MemoryError()).code is ErrorCode.OVERLOADED
    mapped = forward_error(ValueError("secret detail"))
    assert mapped.code is ErrorCode.INTERNAL and "secret" not in mapped.message


async def test_close_fails_waiting_requests_and_refuses_new_ones(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=1)
    gate = await hold_worker(batcher, recorder)
    waiting = asyncio.create_task(batcher.submit(["waiting"]))
    await asyncio.sleep(0.01)
    assert recorder.gate is not None
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0.01)
    recorder.gate.set()
    await closing
    with pytest.raises(SluiceError) as caught:
        await waiting
    assert caught.value.code is ErrorCode.SHUTTING_DOWN
    assert await gate == ["GATE"]  # the pass already running still delivers
    with pytest.raises(SluiceError) as caught:
        await batcher.submit(["late"])
    assert caught.value.code is ErrorCode.SHUTTING_DOWN


async def test_observers_see_every_pass(make: Factory) -> None:
    records: list[BatchRecord] = []
    batcher = make(Recorder(), max_batch=3, sort=False)
    batcher.add_observer(records.append)
    await batcher.submit(["a", "b", "c", "d"])
    for _ in range(200):  # observers run after the results are handed back
        if len(records) == 2:
            break
        await asyncio.sleep(0.01)
    assert [(r.model, r.size, r.requests, r.ok) for r in records] == [
        ("fake", 3, 1, True),
        ("fake", 1, 1, True),
    ]
    assert all(r.run_ms >= 0 and r.queue_wait_ms >= 0 for r in records)


async def test_empty_submit_returns_at_once(make: Factory) -> None:
    recorder = Recorder()
    batcher = make(recorder)
    assert await batcher.submit([]) == []
    assert recorder.batches == []


async def test_on_thread_start_runs_first_on_the_worker_thread() -> None:
    seen: list[str] = []

    def forward(items: Sequence[str]) -> list[str]:
        seen.append(f"forward:{threading.current_thread().name}")
        return list(items)

    batcher: MicroBatcher[str, str] = MicroBatcher("t", forward, max_batch=4, max_queue=16)
    batcher.on_thread_start = lambda: seen.append(f"start:{threading.current_thread().name}")
    batcher.start()
    try:
        assert await batcher.submit(["a"]) == ["a"]
    finally:
        await batcher.close()
    assert seen == ["start:batcher-t", "forward:batcher-t"]


async def test_start_returns_after_on_thread_start_and_survives_its_failure() -> None:
    seen: list[str] = []

    def set_up() -> None:
        time.sleep(0.05)
        seen.append("set up")
        raise RuntimeError("calibration broke")

    batcher: MicroBatcher[str, str] = MicroBatcher("t", lambda items: list(items), max_batch=4, max_queue=16)
    batcher.on_thread_start = set_up
    batcher.start()
    assert seen == ["set up"]  # before start returned
    try:
        assert await batcher.submit(["a"]) == ["a"]  # the worker runs passes all the same
    finally:
        await batcher.close()
