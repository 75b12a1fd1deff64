"""The bounded outbound buffer (server/outbox.py): room, bounds, lazy replay, closing."""

from __future__ import annotations

import asyncio

import pytest

from protocol.close import CloseCode
from protocol.codec import encode, encode_delta
from protocol.messages import Delta, Embedding, Pong
from server.outbox import Outbox


def delta(seq: int, text: str = "x" * 90) -> Delta:
    return Delta(id="r", seq=seq, text=text)


def make(soft: int = 1000, hard: int = 3000) -> Outbox:
    return Outbox(encode=encode, soft_bytes=soft, hard_bytes=hard)


async def test_frames_come_out_in_order_and_room_tracks_soft_bound() -> None:
    outbox = make(soft=250)
    assert outbox.has_room
    for seq in range(1, 4):
        outbox.push(delta(seq))
    assert outbox.queued_bytes > 250
    assert not outbox.has_room
    seqs = []
    for _ in range(3):
        frame = await outbox.next_frame()
        assert isinstance(frame, str)
        seqs.append(int(frame.split('"seq":')[1].split(",")[0]))
    assert seqs == [1, 2, 3]
    assert outbox.queued_bytes == 0
    assert outbox.has_room


async def test_on_room_fires_once_when_room_comes_back() -> None:
    outbox = make(soft=250)
    calls: list[int] = []
    outbox.on_room = lambda: calls.append(outbox.queued_bytes)
    for seq in range(1, 5):
        outbox.push(delta(seq))
    assert not outbox.has_room  # marks the outbox as full
    for _ in range(4):
        await outbox.next_frame()
    assert len(calls) == 1
    assert calls[0] < 250


async def test_past_hard_bound_closes_4008_and_drops_everything() -> None:
    outbox = make(soft=200, hard=1000)
    seq = 0
    while not outbox.closed:
        seq += 1
        outbox.push(delta(seq))
        assert seq < 100
    assert outbox.close_code is CloseCode.SLOW_CONSUMER
    assert outbox.queued_bytes == 0
    assert outbox.dropped == seq
    assert await outbox.next_frame() is None
    outbox.push(delta(seq + 1))  # ignored once closed
    assert outbox.queued_bytes == 0


async def test_pending_text_counts_against_the_hard_bound() -> None:
    outbox = make(soft=200, hard=1000)
    outbox.push(delta(1))
    outbox.push(delta(2))
    assert not outbox.check_bound(pending_bytes=500)
    assert outbox.check_bound(pending_bytes=950)
    assert outbox.close_code is CloseCode.SLOW_CONSUMER


async def test_replay_is_lazy_uncounted_and_first() -> None:
    outbox = make(soft=100, hard=200)
    logged = [delta(seq, "y" * 500) for seq in range(1, 50)]
    outbox.push(Pong(nonce=1))
    outbox.push_replay(logged)
    # 49 x 500 bytes would be far past the hard bound if they were counted.
    assert not outbox.closed
    assert not outbox.has_room  # no live token is numbered while a replay is still going out
    first = await outbox.next_frame()
    assert first == '{"type":"pong","nonce":1}'
    replayed = [await outbox.next_frame() for _ in logged]
    assert replayed == [encode(event) for event in logged]
    assert outbox.has_room


async def test_next_frame_waits_for_a_push() -> None:
    outbox = make()
    waiter = asyncio.create_task(outbox.next_frame())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    outbox.push(delta(1))
    assert await asyncio.wait_for(waiter, 1) == encode(delta(1))


async def test_fail_wakes_a_waiting_sender_and_calls_on_close_once() -> None:
    outbox = make()
    closes: list[CloseCode | None] = []
    outbox.on_close = lambda: closes.append(outbox.close_code)
    waiter = asyncio.create_task(outbox.next_frame())
    await asyncio.sleep(0.01)
    outbox.fail(CloseCode.TAKEN_OVER, "taken over")
    assert await asyncio.wait_for(waiter, 1) is None
    assert closes == [CloseCode.TAKEN_OVER]
    outbox.fail(CloseCode.SLOW_CONSUMER, "later")  # the first reason stays
    assert outbox.close_code is CloseCode.TAKEN_OVER and len(closes) == 1


async def test_finish_sends_what_is_queued_then_closes() -> None:
    outbox = make()
    closes: list[CloseCode | None] = []
    outbox.on_close = lambda: closes.append(outbox.close_code)
    outbox.push(delta(1))
    outbox.push(delta(2))
    outbox.finish(CloseCode.SERVICE_RESTART, "bye")
    outbox.push(delta(3))  # nothing is queued after finish
    assert await outbox.next_frame() == encode(delta(1))
    assert not outbox.closed
    assert await outbox.next_frame() == encode(delta(2))
    assert closes == []
    assert await outbox.next_frame() is None
    assert outbox.close_code is CloseCode.SERVICE_RESTART and closes == [CloseCode.SERVICE_RESTART]


def test_bounds_must_be_ordered() -> None:
    with pytest.raises(ValueError):
        Outbox(encode=encode, soft_bytes=10, hard_bytes=5)


async def test_one_message_larger_than_the_hard_bound_is_let_through_but_not_a_backlog() -> None:
    outbox = make(soft=200, hard=1000)
    big = delta(1, "z" * 5000)
    outbox.push(big)
    assert not outbox.closed
    assert await outbox.next_frame() == encode(big)
    outbox.push(delta(2, "z" * 5000))
    small = len(encode(delta(3)))
    behind = 0
    for seq in range(3, 100):  # a backlog behind the big one: closed once it passes the bound
        outbox.push(delta(seq))
        behind += small
        if outbox.closed:
            break
    assert outbox.close_code is CloseCode.SLOW_CONSUMER
    assert 1000 < behind <= 1000 + small


def embedding(seq: int, rows: int = 64) -> Embedding:
    return Embedding(id=f"e{seq}", seq=seq, model="m", dimensions=384, embeddings=[[0.5] * 384] * rows)


async def test_burst_of_large_results_is_not_a_slow_consumer() -> None:
    # Each embedding encodes to ~100 KB, far past the hard bound: a burst of them, finished by
    # one micro-batch and read at full speed, must go out in order rather than close 4008.
    outbox = make(soft=1000, hard=3000)
    for seq in range(1, 9):
        outbox.push(embedding(seq))
    outbox.push(delta(9))
    assert not outbox.closed
    assert outbox.queued_bytes < 1000  # only the delta is counted: the results are in the log
    seqs = []
    for _ in range(9):
        frame = await outbox.next_frame()
        assert isinstance(frame, str)
        seqs.append(int(frame.split('"seq":')[1].split(",")[0]))
    assert seqs == list(range(1, 10))


async def test_results_past_the_log_size_close_4008() -> None:
    outbox = Outbox(encode=encode, soft_bytes=1000, hard_bytes=3000, max_refs=5)
    for seq in range(1, 6):
        outbox.push(embedding(seq, rows=1))
    assert not outbox.closed
    outbox.push(embedding(6, rows=1))
    assert outbox.close_code is CloseCode.SLOW_CONSUMER
    assert await outbox.next_frame() is None


async def test_a_pushed_frame_counts_and_queues_as_the_pushed_delta_would() -> None:
    assert make().sends_json
    assert not Outbox(encode=lambda message: b"x", soft_bytes=1, hard_bytes=1).sends_json
    framed, pushed = make(soft=250, hard=400), make(soft=250, hard=400)
    for seq in range(1, 4):
        framed.push_frame(encode(delta(seq)))
        pushed.push(delta(seq))
        assert framed.queued_bytes == pushed.queued_bytes and framed.has_room == pushed.has_room
    assert [await framed.next_frame() for _ in range(3)] == [await pushed.next_frame() for _ in range(3)]
    for seq in range(4, 9):  # past the hard bound: 4008, as a pushed delta
        framed.push_frame(encode(delta(seq)))
    assert framed.close_code == CloseCode.SLOW_CONSUMER


async def test_push_delta_from_fields_queues_writes_and_bounds_what_the_delta_would() -> None:
    by_model, by_fields = (
        make(soft=250, hard=1000),
        Outbox(encode=encode, encode_delta=encode_delta, soft_bytes=250, hard_bytes=1000),
    )
    for seq in range(1, 4):
        by_model.push(delta(seq))
        by_fields.push_delta("r", seq, "x" * 90)
    assert by_fields.queued_bytes == by_model.queued_bytes and not by_fields.has_room
    assert [await by_fields.next_frame() for _ in range(3)] == [encode(delta(s)) for s in (1, 2, 3)]
    written: list[object] = []
    by_fields.write_now = lambda frame: written.append(frame) is None
    waiter = asyncio.create_task(by_fields.next_frame())
    await asyncio.sleep(0)  # the sender waits with nothing queued: the frame is written at once
    by_fields.push_delta("r", 4, "y")
    assert written == [encode(Delta(id="r", seq=4, text="y"))] and not by_fields.backlog
    waiter.cancel()
    by_fields.write_now = None
    seq = 4
    while not by_fields.closed:  # past the hard bound: 4008, as for pushed deltas
        seq += 1
        by_fields.push_delta("r", seq, "x" * 90)
        assert seq < 100
    assert by_fields.close_code is CloseCode.SLOW_CONSUMER
    by_fields.push_delta("r", seq + 1, "late")  # closed: dropped
    assert by_fields.queued_bytes == 0


def test_push_delta_without_encode_delta_pushes_the_delta() -> None:
    class Recording(Outbox):
        def __init__(self) -> None:
            super().__init__(encode=encode, soft_bytes=1000, hard_bytes=3000)
            self.pushed: list[object] = []

        def push(self, message: object) -> None:  # type: ignore[override]
            self.pushed.append(message)

    box = Recording()
    box.push_delta("r", 7, "text")
    assert box.pushed == [Delta(id="r", seq=7, text="text")]
