"""Held deltas in the session runtime (the outbox's ``hold_s``), in-process with scripted backends:
a request's first delta goes out at once, later ones within the window are merged and released
as one delta (by the window's timer, or first by the terminal message or a cancel), a stream
slower than the window is never held, and the text and seqs stay exact."""

from __future__ import annotations

import asyncio
from typing import Any

from protocol.codec import encode, encode_delta
from protocol.messages import Cancel
from server.outbox import Outbox
from tests.server.fakes import FakeRegistry, ScriptedGenerator
from tests.server.test_runtime import (
    assert_contiguous,
    collect,
    gen,
    make_runtime,
    terminals,
    text_of,
    welcome,
)

Event = dict[str, Any]


def held_outbox(hold_s: float) -> Outbox:
    return Outbox(
        encode=encode, encode_delta=encode_delta, soft_bytes=64 * 1024, hard_bytes=1024 * 1024, hold_s=hold_s
    )


def deltas(events: list[Event]) -> list[str]:
    return [e["text"] for e in events if e["type"] == "delta"]


async def test_a_burst_goes_out_as_its_first_piece_then_one_merged_delta() -> None:
    pieces = [f"p{i} " for i in range(100)]
    runtime, _, _ = make_runtime(FakeRegistry(ScriptedGenerator(pieces=pieces)))
    box = held_outbox(0.5)
    assert runtime.attach(box, 0, welcome)
    runtime.handle(gen("g"))
    events = await collect(box, lambda ev: "g" in terminals(ev))
    # The rest came within the window: held, and numbered by the terminal message, before it.
    assert deltas(events) == ["p0 ", "".join(pieces[1:])]
    assert events[-1]["type"] == "done"
    assert_contiguous(events)


async def test_the_window_timer_releases_held_text_while_the_stream_goes_on() -> None:
    pieces = [f"{i}," for i in range(30)]
    runtime, _, _ = make_runtime(FakeRegistry(ScriptedGenerator(pieces=pieces, delay_s=0.01)))
    box = held_outbox(0.1)
    assert runtime.attach(box, 0, welcome)
    runtime.handle(gen("g"))
    events = await collect(box, lambda ev: "g" in terminals(ev))
    sent = deltas(events)
    # ~300 ms of pieces 10 ms apart in 100 ms windows: a few deltas, released by the timer.
    assert 3 <= len(sent) <= 15, sent
    assert sent[0] == "0," and text_of(events, "g") == "".join(pieces)
    assert_contiguous(events)


async def test_a_stream_slower_than_the_window_is_never_held() -> None:
    pieces = ["a", "b", "c", "d", "e"]
    runtime, _, _ = make_runtime(FakeRegistry(ScriptedGenerator(pieces=pieces, delay_s=0.05)))
    box = held_outbox(0.01)
    assert runtime.attach(box, 0, welcome)
    runtime.handle(gen("g"))
    events = await collect(box, lambda ev: "g" in terminals(ev))
    assert deltas(events) == pieces
    assert_contiguous(events)


async def test_a_cancel_sends_the_held_text_before_its_done() -> None:
    generator = ScriptedGenerator(pieces=[f"{i}." for i in range(1000)], delay_s=0.002)
    runtime, _, _ = make_runtime(FakeRegistry(generator))
    box = held_outbox(5.0)
    assert runtime.attach(box, 0, welcome)
    runtime.handle(gen("g"))
    first = await collect(box, lambda ev: len(ev) >= 2)
    await asyncio.sleep(0.05)  # more pieces come, all held
    runtime.handle(Cancel(type="cancel", id="g"))
    events = first + await collect(box, lambda ev: "g" in terminals(ev))
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "cancelled"
    sent = deltas(events)
    assert len(sent) == 2 and sent[0] == "0."
    # Everything relayed before the cancel, nothing after it, in order.
    relayed = events[-1]["usage"]["completion_tokens"]
    assert relayed > 2 and text_of(events, "g") == "".join(generator.pieces[:relayed])
    assert_contiguous(events)
    await runtime.close()
