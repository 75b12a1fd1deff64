"""protocol.eventlog: the bounded in-memory log (eviction, trimming, complete-or-None reads)."""

from __future__ import annotations

import random

import pytest

from protocol.codec import encode
from protocol.eventlog import EventLog, LogBudget, MemoryEventLog, encoded_size, memory_cost
from protocol.messages import Delta, Done, Error, Generate, LoggedMessage, Timings, Usage
from protocol.session import Session, SessionLimits


def delta(seq: int) -> Delta:
    return Delta(id="a", seq=seq, text=str(seq))


def filled(capacity: int, count: int) -> MemoryEventLog:
    log = MemoryEventLog(capacity)
    for seq in range(1, count + 1):
        log.append(delta(seq))
    return log


def seqs(events: list[Delta] | None) -> list[int] | None:
    return None if events is None else [e.seq for e in events]


def test_is_an_event_log() -> None:
    assert isinstance(MemoryEventLog(1), EventLog)


def test_empty_log() -> None:
    log = MemoryEventLog(4)
    assert (log.last_seq, log.oldest_seq, len(log)) == (0, 1, 0)
    assert log.after(0) == []
    assert log.after(1) is None
    log.trim(10)
    assert (log.last_seq, log.oldest_seq) == (0, 1)


def test_after_returns_the_suffix() -> None:
    log = filled(10, 5)
    assert seqs(log.after(0)) == [1, 2, 3, 4, 5]
    assert seqs(log.after(3)) == [4, 5]
    assert log.after(5) == []
    assert log.after(6) is None


def test_eviction_makes_older_reads_incomplete() -> None:
    log = filled(3, 5)
    assert (log.oldest_seq, log.last_seq, len(log)) == (3, 5, 3)
    assert seqs(log.after(2)) == [3, 4, 5]  # everything after 2 is still held
    assert log.after(1) is None  # seq 2 is gone
    assert log.after(0) is None


def test_trim_drops_acknowledged_events() -> None:
    log = filled(10, 6)
    log.trim(2)
    assert (log.oldest_seq, len(log)) == (3, 4)
    assert seqs(log.after(2)) == [3, 4, 5, 6]
    assert log.after(1) is None
    log.trim(1)  # behind what is held: nothing changes
    assert log.oldest_seq == 3
    log.trim(100)  # beyond the end: clamped, everything dropped, numbering kept
    assert (log.oldest_seq, log.last_seq, len(log)) == (7, 6, 0)
    assert log.after(6) == []
    assert log.after(5) is None
    log.append(delta(7))
    assert seqs(log.after(6)) == [7]


def test_append_refuses_gaps_and_repeats() -> None:
    log = filled(4, 2)
    for bad in (2, 4, 0):
        with pytest.raises(ValueError):
            log.append(delta(bad))
    assert log.last_seq == 2


def test_a_log_may_start_after_a_seq_and_holds_nothing_before_it() -> None:
    log = MemoryEventLog(4, last_seq=40)
    assert (log.last_seq, log.oldest_seq, len(log)) == (40, 41, 0)
    assert log.after(40) == [] and log.after(39) is None
    with pytest.raises(ValueError):
        log.append(delta(1))
    log.append(delta(41))
    assert seqs(log.after(40)) == [41] and log.after(39) is None


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MemoryEventLog(0)
    assert MemoryEventLog(7).capacity == 7


# -- the window by size (PROTOCOL.md §2) -------------------------------------------------------


def test_encoded_size_is_the_frame_length_or_a_close_lower_bound_for_deltas() -> None:
    for event in (Delta(id="r1", seq=1, text=" tok"), Delta(id="a" * 64, seq=7, text="x" * 500)):
        assert encoded_size(event) == len(encode(event).encode())
    long_seq = Delta(id="r1", seq=123456789, text=" tok")
    assert encoded_size(long_seq) == len(encode(long_seq).encode()) - 8
    for text in ('say "hi"\n', "naïve ✓ 🙂", "\x00\\"):
        event = Delta(id="r", seq=7, text=text)
        assert 0 < encoded_size(event) <= len(encode(event).encode())
    done = Done(
        id="r",
        seq=9,
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=2),
        timings=Timings(queue_ms=1.0, ttft_ms=None, total_ms=3.0),
        model="m",
    )
    error = Error(seq=10, code="invalid_message", message="naïve", retryable=False)
    for event in (done, error):
        assert encoded_size(event) == len(encode(event).encode())


def _held(log: MemoryEventLog) -> list[Delta]:
    events = log.after(log.oldest_seq - 1)
    assert events is not None
    return events  # type: ignore[return-value]


def test_keeps_the_last_events_or_the_last_bytes_whichever_holds_more() -> None:
    rng = random.Random(12)
    capacity, floor = 8, 2_000
    log = MemoryEventLog(capacity, max_bytes=floor)
    for seq in range(1, 3_000):
        # Mostly small events, now and then a large one (a long merged delta).
        text = "x" * (rng.choice([1, 2, 5, 30]) if rng.random() < 0.9 else rng.randint(500, 3_000))
        log.append(Delta(id="a", seq=seq, text=text))
        held = _held(log)
        sizes = [encoded_size(e) for e in held]
        assert [e.seq for e in held] == list(range(log.oldest_seq, seq + 1))
        assert log.held_bytes == sum(sizes)
        # At least the last `capacity` events and the last `floor` bytes (or everything so far) ...
        assert len(held) >= min(capacity, seq)
        assert sum(sizes) >= floor or log.oldest_seq == 1
        # ... and nothing more: without the oldest, one of the two would no longer hold.
        if log.oldest_seq > 1:
            assert len(held) - 1 < capacity or sum(sizes[1:]) < floor


def test_by_count_only_when_max_bytes_is_zero() -> None:
    log = MemoryEventLog(3, max_bytes=0)
    for seq in range(1, 10):
        log.append(Delta(id="a", seq=seq, text="y" * 1_000))
    assert (log.oldest_seq, len(log)) == (7, 3)


def test_trim_and_eviction_keep_the_byte_count() -> None:
    log = MemoryEventLog(2, max_bytes=10_000)
    events = [Delta(id="a", seq=seq, text="z" * seq) for seq in range(1, 21)]
    for event in events:
        log.append(event)
    log.trim(5)
    assert log.oldest_seq == 6
    assert log.held_bytes == sum(encoded_size(e) for e in events[5:])
    log.trim(100)
    assert (len(log), log.held_bytes) == (0, 0)
    with pytest.raises(ValueError):
        MemoryEventLog(4, max_bytes=-1)


def test_the_issue_case_a_reader_stalled_20_s_at_500_tokens_per_second_resumes_exactly() -> None:
    # The defaults of PROTOCOL.md §2: 4,096 events, 4 MiB. At 500 tokens/s, 20 s of stall is
    # 10,000 one-token deltas logged after the last seq the reader saw.
    for replay_bytes, resumes in ((4 * 1024 * 1024, True), (0, False)):
        session = Session("s", SessionLimits(replay_events=4096, replay_bytes=replay_bytes))
        session.receive(_generate("g"))
        for n in range(50):  # what the reader read before it stalled
            session.delta("g", f" t{n}")
        seen = session.last_seq
        stalled = [session.delta("g", f" w{n}") for n in range(10_000)]
        replay = session.replay(seen)
        if not resumes:  # by count alone (the old log), the stall cannot be recovered
            assert replay is None
            continue
        assert replay is not None
        assert [e.seq for e in replay] == list(range(seen + 1, seen + 10_001))
        assert replay == stalled
        assert "".join(e.text for e in replay if isinstance(e, Delta)) == "".join(
            f" w{n}" for n in range(10_000)
        )


def _generate(request_id: str) -> Generate:
    return Generate(type="generate", id=request_id, prompt="p")


# -- the server-wide budget ------------------------------------------------------------------


def _budgeted(budget_bytes: int, *, names: str = "ab") -> tuple[dict[str, MemoryEventLog], LogBudget]:
    logs: dict[str, MemoryEventLog] = {}
    budget = LogBudget(budget_bytes, lambda: list(logs.values()))
    for name in names:
        logs[name] = MemoryEventLog(1_000, max_bytes=1 << 20, budget=budget)
    return logs, budget


def test_budget_sheds_the_logs_it_is_told_first_down_to_the_low_water_mark() -> None:
    logs, budget = _budgeted(400_000)
    cost = memory_cost(delta(1), 0) + 42  # about one small delta
    for seq in range(1, 61):
        logs["a"].append(delta(seq))
    a_before = logs["a"].held_cost
    assert budget.held == a_before and budget.reclaims == 0
    seq = 0
    while budget.reclaims == 0:
        seq += 1
        logs["b"].append(delta(seq))
    # "a" went first (and whole, being smaller than the excess); "b" only as far as needed.
    assert len(logs["a"]) == 0 and budget.shed_events >= 60
    assert budget.held <= budget.low_water
    assert budget.held == logs["a"].held_cost + logs["b"].held_cost
    assert budget.low_water - budget.held < 2 * cost
    # Never a partial replay: what was shed makes older reads None, the rest reads as before.
    assert logs["a"].after(0) is None and logs["a"].after(60) == []
    assert logs["b"].after(0) is None
    tail = logs["b"].after(logs["b"].oldest_seq - 1)
    assert tail is not None and tail[-1].seq == seq


def test_budget_accounting_follows_window_eviction_trim_and_release() -> None:
    logs, budget = _budgeted(20_000, names="abc")
    rng = random.Random(3)
    for _ in range(5_000):
        log = logs[rng.choice("abc")]
        action = rng.random()
        if action < 0.9:
            log.append(Delta(id="a", seq=log.last_seq + 1, text="q" * rng.randint(1, 400)))
        elif action < 0.97:
            log.trim(rng.randint(log.oldest_seq - 1, log.last_seq))
        else:
            log.release()
        assert budget.held == sum(one.held_cost for one in logs.values())
        assert budget.held <= budget.max_bytes
    assert budget.reclaims > 0


def test_budget_refuses_a_bound_below_one() -> None:
    with pytest.raises(ValueError):
        LogBudget(0, list)


@pytest.mark.parametrize("kind", ["delta", "done", "embedding"])
def test_the_memory_estimate_is_close_to_what_the_events_really_hold(kind: str) -> None:
    import tracemalloc

    from protocol.messages import Embedding

    def make(seq: int) -> LoggedMessage:
        if kind == "delta":
            # A fresh text per token, as a backend's are (a constant would be one shared object).
            return Delta(id="r1", seq=seq, text=f" tok{seq % 10}")
        if kind == "done":
            return Done(
                id="r1",
                seq=seq,
                finish_reason="stop",
                usage=Usage(prompt_tokens=1, completion_tokens=2),
                timings=Timings(queue_ms=1.0, ttft_ms=2.0, total_ms=3.0),
                model="m",
            )
        vector = [0.123456789 * k for k in range(384)]
        return Embedding(id="r1", seq=seq, model="m", dimensions=384, embeddings=[vector])

    count = 400 if kind == "embedding" else 20_000
    budget = LogBudget(1 << 40, list)
    log = MemoryEventLog(1, max_bytes=1 << 40, budget=budget)
    tracemalloc.start()
    try:
        for seq in range(1, count + 1):
            log.append(make(seq))
        real, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0.75 <= budget.held / real <= 1.35, (budget.held / count, real / count)


def test_append_delta_holds_what_append_of_the_delta_holds() -> None:
    budget_a = LogBudget(1 << 30, order=list)
    budget_b = LogBudget(1 << 30, order=list)
    by_model = MemoryEventLog(3, max_bytes=40, budget=budget_a)
    by_fields = MemoryEventLog(3, max_bytes=40, budget=budget_b)
    for seq in range(1, 9):
        text = " t" * seq
        by_model.append(Delta(id="g", seq=seq, text=text))
        by_fields.append_delta("g", seq, text)
    assert by_fields.after(0) is None and by_model.after(0) is None
    first = by_model.oldest_seq
    assert by_fields.oldest_seq == first and by_fields.after(first - 1) == by_model.after(first - 1)
    assert (by_fields.held_bytes, by_fields.held_cost) == (by_model.held_bytes, by_model.held_cost)
    assert budget_b.held == budget_a.held
    with pytest.raises(ValueError, match="does not follow"):
        by_fields.append_delta("g", 8, "again")
