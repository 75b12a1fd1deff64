"""protocol.eventlog: the bounded in-memory log (eviction, trimming, complete-or-None reads)."""

from __future__ import annotations

import pytest

from protocol.eventlog import EventLog, MemoryEventLog
from protocol.messages import Delta


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


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MemoryEventLog(0)
    assert MemoryEventLog(7).capacity == 7
