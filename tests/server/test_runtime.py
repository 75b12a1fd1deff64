"""The session runtime (server/runtime.py) in-process, with fake backends and a real pure Session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from protocol.close import CloseCode
from protocol.codec import encode, encode_delta
from protocol.errors import ErrorCode, SluiceError
from protocol.messages import (
    Cancel,
    Classify,
    Embed,
    Generate,
    Limits,
    Models,
    Ping,
    ServerInfo,
    Welcome,
)
from protocol.session import Session, SessionLimits
from server.dispatcher import Dispatcher
from server.draining import DrainState
from server.metrics import Metrics
from server.outbox import Outbox
from server.ratelimit import RateLimiter
from server.runtime import DETACHED_CHUNK_CHARS, SessionRuntime
from server.settings import Settings
from tests.server.fakes import FakeEmbedder, FakeRegistry, ScriptedGenerator

Event = dict[str, Any]


def welcome(session_id: str, last_seq: int) -> Welcome:
    return Welcome(
        session=session_id,
        resumed=False,
        last_seq=last_seq,
        server=ServerInfo(version="test"),
        limits=Limits(max_message_bytes=1024, max_inflight=8, replay_events=4096, session_ttl_s=60),
        models=Models(generate=[], embed=[], classify=[]),
    )


def make_runtime(
    registry: FakeRegistry | None = None,
    *,
    settings: Settings | None = None,
    replay_events: int = 4096,
    drain: DrainState | None = None,
) -> tuple[SessionRuntime, FakeRegistry, Dispatcher]:
    registry = registry or FakeRegistry()
    settings = settings or Settings()
    dispatcher = Dispatcher(registry, limiter=RateLimiter(settings), metrics=Metrics(), drain=drain)
    session = Session("s1", SessionLimits(max_inflight=8, replay_events=replay_events))
    runtime = SessionRuntime(session, dispatcher=dispatcher, metrics=Metrics(), key_id="k")
    return runtime, registry, dispatcher


def outbox(soft: int = 64 * 1024, hard: int = 1024 * 1024) -> Outbox:
    return Outbox(encode=encode, encode_delta=encode_delta, soft_bytes=soft, hard_bytes=hard)


async def collect(box: Outbox, until: Callable[[list[Event]], bool], within: float = 5.0) -> list[Event]:
    events: list[Event] = []
    async with asyncio.timeout(within):
        while not until(events):
            frame = await box.next_frame()
            if frame is None:
                break
            events.append(orjson.loads(frame))
    return events


def terminals(events: list[Event]) -> dict[str, Event]:
    ends: dict[str, Event] = {}
    for event in events:
        if event["type"] in ("done", "embedding", "classification") or (
            event["type"] == "error" and "id" in event
        ):
            assert event["id"] not in ends, f"second terminal for {event['id']}"
            ends[event["id"]] = event
    return ends


def text_of(events: list[Event], request_id: str) -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta" and e["id"] == request_id)


def assert_contiguous(events: list[Event], start: int = 1) -> None:
    seqs = [e["seq"] for e in events if "seq" in e]
    assert seqs == list(range(start, start + len(seqs)))


def gen(request_id: str, **fields: Any) -> Generate:
    return Generate(type="generate", id=request_id, **({"prompt": "hi"} | fields))


async def test_requests_of_all_kinds_run_concurrently_and_end_once() -> None:
    runtime, _, _ = make_runtime(FakeRegistry(ScriptedGenerator(pieces=["a", "b", "c"], delay_s=0.01)))
    box = outbox()
    assert runtime.attach(box, 0, welcome)
    runtime.handle(gen("g"))
    runtime.handle(Embed(type="embed", id="e", input=["x", "yy"], encoding="base64"))
    runtime.handle(Classify(type="classify", id="c", input="z", labels=["p", "q"]))
    runtime.handle(Ping(type="ping", nonce="n1"))
    events = await collect(box, lambda ev: len(terminals(ev)) == 3)
    assert events[0]["type"] == "welcome"
    assert {"type": "pong", "nonce": "n1"} in events
    ends = terminals(events)
    assert ends["g"]["type"] == "done" and ends["g"]["finish_reason"] == "stop"
    assert text_of(events, "g") == "abc"
    assert ends["e"]["dimensions"] == 4 and len(ends["e"]["embeddings"]) == 2
    assert isinstance(ends["e"]["embeddings"][0], str)
    assert ends["c"]["results"] == [[{"label": "p", "score": 0.5}, {"label": "q", "score": 0.5}]]
    # The embed and classify answers came while the generation was still streaming.
    done_at = events.index(ends["g"])
    assert events.index(ends["e"]) < done_at and events.index(ends["c"]) < done_at
    assert_contiguous(events)
    await runtime.close()


async def test_tokens_merge_while_the_outbox_is_full_and_the_text_stays_exact() -> None:
    pieces = [f"t{i} " for i in range(300)]
    runtime, _, _ = make_runtime(FakeRegistry(ScriptedGenerator(pieces=pieces)))
    box = outbox(soft=1024, hard=1024 * 1024)
    runtime.attach(box, 0, welcome)
    runtime.handle(gen("g"))
    # Nobody reads for a while: the outbox fills past its soft bound and the rest merges.
    await asyncio.sleep(0.2)
    events = await collect(box, lambda ev: "g" in terminals(ev))
    deltas = [e for e in events if e["type"] == "delta"]
    assert text_of(events, "g") == "".join(pieces)
    assert len(deltas) < len(pieces) / 2
    assert events[-1]["type"] == "done"
    assert_contiguous(events)
    await runtime.close()


async def test_hard_bound_closes_4008_and_a_resume_gets_every_token() -> None:
    pieces = [f"piece-{i} " for i in range(2000)]
    runtime, _, _ = make_runtime(FakeRegistry(ScriptedGenerator(pieces=pieces)))
    first = outbox(soft=1024, hard=4096)
    runtime.attach(first, 0, welcome)
    runtime.handle(gen("g"))
    for _ in range(250):
        if first.closed:
            break
        await asyncio.sleep(0.02)
    assert first.close_code is CloseCode.SLOW_CONSUMER
    assert runtime.pending_chars <= 4096  # the bound holds pending text too
    runtime.detach(first)
    await asyncio.sleep(0.1)  # the generation ends while nobody is attached
    second = outbox()
    assert runtime.attach(second, 0, welcome)
    events = await collect(second, lambda ev: "g" in terminals(ev))
    assert text_of(events, "g") == "".join(pieces)
    assert_contiguous(events)
    await runtime.close()


async def test_detached_text_is_numbered_in_large_chunks() -> None:
    pieces = ["0123456789"] * (DETACHED_CHUNK_CHARS // 10 * 3)
    runtime, _, _ = make_runtime(FakeRegistry(ScriptedGenerator(pieces=pieces)))
    runtime.handle(gen("g"))  # never attached
    for _ in range(100):
        if not runtime.busy:
            break
        await asyncio.sleep(0.02)
    logged = runtime.session.replay(0)
    assert logged is not None
    deltas = [e for e in logged if e.type == "delta"]
    assert 3 <= len(deltas) <= 4
    assert "".join(e.text for e in deltas) == "".join(pieces)
    assert logged[-1].type == "done"


async def test_resume_between_snapshot_and_live_loses_and_repeats_nothing() -> None:
    pieces = [f"w{i} " for i in range(60)]
    runtime, _, _ = make_runtime(FakeRegistry(ScriptedGenerator(pieces=pieces, delay_s=0.002)))
    seen: list[Event] = []
    for _round in range(6):
        box = outbox()
        assert runtime.attach(box, seen[-1]["seq"] if seen else 0, welcome)
        if not seen:
            runtime.handle(gen("g"))
        got = await collect(box, lambda ev: len(ev) >= 6 or "g" in terminals(ev))
        assert got[0]["type"] == "welcome"
        seen.extend(got[1:])
        runtime.detach(box)
        if "g" in terminals(seen):
            break
        await asyncio.sleep(0.01)
    else:
        box = outbox()
        runtime.attach(box, seen[-1]["seq"], welcome)
        seen.extend((await collect(box, lambda ev: "g" in terminals(ev)))[1:])
    assert_contiguous(seen)
    assert text_of(seen, "g") == "".join(pieces)
    await runtime.close()


async def test_second_attach_takes_over_with_4009() -> None:
    runtime, _, _ = make_runtime()
    first, second = outbox(), outbox()
    runtime.attach(first, 0, welcome)
    runtime.attach(second, 0, welcome)
    assert first.close_code is CloseCode.TAKEN_OVER
    runtime.detach(first)  # the old connection going away must not detach the new one
    assert runtime.attached and runtime.outbox is second
    await runtime.close()


async def test_incomplete_replay_refuses_to_attach_and_changes_nothing() -> None:
    runtime, _, _ = make_runtime(replay_events=16)
    first = outbox()
    runtime.attach(first, 0, welcome)
    for n in range(40):
        runtime.handle(Cancel(type="cancel", id=f"x{n}"))  # ignored: nothing logged
        runtime.refuse(SluiceError(ErrorCode.INVALID_MESSAGE, "bad"))
    assert not runtime.attach(outbox(), 1, welcome)
    assert runtime.outbox is first and not first.closed
    await runtime.close()


async def test_cancel_ends_with_one_done_cancelled_and_closes_the_stream() -> None:
    gate = asyncio.Event()
    registry = FakeRegistry(ScriptedGenerator(pieces=["a", "b", "c"], gate=gate))
    runtime, _, _ = make_runtime(registry)
    box = outbox()
    runtime.attach(box, 0, welcome)
    runtime.handle(gen("g"))
    await asyncio.sleep(0.05)
    runtime.handle(Cancel(type="cancel", id="g"))
    runtime.handle(Cancel(type="cancel", id="g"))  # idempotent
    gate.set()
    events = await collect(box, lambda ev: "g" in terminals(ev))
    assert terminals(events)["g"]["finish_reason"] == "cancelled"
    await asyncio.sleep(0.05)
    assert not runtime.busy
    assert registry.gen.records[0].closed_early  # type: ignore[attr-defined]
    assert box.queued_bytes == 0  # nothing for the id after its terminal message
    await runtime.close()


async def test_cancelled_embed_ends_with_error_cancelled() -> None:
    embedder = FakeEmbedder(delay_s=5.0)
    runtime, _, _ = make_runtime(FakeRegistry(embedder=embedder))
    box = outbox()
    runtime.attach(box, 0, welcome)
    runtime.handle(Embed(type="embed", id="e", input="x"))
    await asyncio.sleep(0.05)
    runtime.handle(Cancel(type="cancel", id="e"))
    events = await collect(box, lambda ev: "e" in terminals(ev))
    end = terminals(events)["e"]
    assert end["type"] == "error" and end["code"] == "cancelled"
    await asyncio.sleep(0.05)
    assert embedder.cancelled == 1
    await runtime.close()


async def test_cancel_after_completion_is_ignored() -> None:
    runtime, _, _ = make_runtime()
    box = outbox()
    runtime.attach(box, 0, welcome)
    runtime.handle(gen("g"))
    events = await collect(box, lambda ev: "g" in terminals(ev))
    runtime.handle(Cancel(type="cancel", id="g"))
    assert box.queued_bytes == 0
    assert terminals(events)["g"]["finish_reason"] == "stop"
    await runtime.close()


async def test_unexpected_backend_exception_is_internal_without_its_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = ScriptedGenerator(pieces=["a", "b"], fail_after=1, fail_with=RuntimeError("secret detail"))
    runtime, _, _ = make_runtime(FakeRegistry(broken))
    box = outbox()
    runtime.attach(box, 0, welcome)
    with caplog.at_level(logging.ERROR, logger="sluice.dispatcher"):
        runtime.handle(gen("g"))
        events = await collect(box, lambda ev: "g" in terminals(ev))
    end = terminals(events)["g"]
    assert end["type"] == "error" and end["code"] == "internal"
    assert "secret" not in orjson.dumps(events).decode()
    assert text_of(events, "g") == "a"
    record = next(r for r in caplog.records if r.name == "sluice.dispatcher")
    assert getattr(record, "session", None) == "s1" and getattr(record, "request", None) == "g"
    await runtime.close()


async def test_backend_sluice_error_is_the_terminal_error() -> None:
    runtime, _, _ = make_runtime()
    box = outbox()
    runtime.attach(box, 0, welcome)
    runtime.handle(gen("g", model="nope"))
    events = await collect(box, lambda ev: "g" in terminals(ev))
    end = terminals(events)["g"]
    assert end["code"] == "model_not_found" and end["id"] == "g"
    await runtime.close()


async def test_rate_limited_and_draining_requests_are_refused_without_id() -> None:
    drain = DrainState()
    runtime, _, _ = make_runtime(settings=Settings(requests_per_minute=2), drain=drain)
    box = outbox()
    runtime.attach(box, 0, welcome)
    for n in range(3):
        runtime.handle(gen(f"g{n}"))
    drain.begin()
    runtime.handle(gen("late"))
    events = await collect(box, lambda ev: len(terminals(ev)) == 2 and len(ev) >= 10)
    refusals = [e for e in events if e["type"] == "error" and "id" not in e]
    assert [(e["ref"], e["code"]) for e in refusals] == [("g2", "rate_limited"), ("late", "shutting_down")]
    assert refusals[0]["retry_after_ms"] > 0 and refusals[0]["retryable"]
    await runtime.close()


async def test_history_turns_reach_the_backend() -> None:
    registry = FakeRegistry(ScriptedGenerator(pieces=["Paris"]))
    runtime, _, _ = make_runtime(registry)
    box = outbox()
    runtime.attach(box, 0, welcome)
    runtime.handle(gen("a", prompt="Capital of France?", history=True, system="Be brief."))
    await collect(box, lambda ev: "a" in terminals(ev))
    runtime.handle(gen("b", prompt="And of Italy?", history=True))
    await collect(box, lambda ev: "b" in terminals(ev))
    second = registry.gen.records[1].request  # type: ignore[attr-defined]
    assert second.prompt is None and second.messages is not None
    assert [(t.role, t.content) for t in second.messages] == [
        ("user", "Capital of France?"),
        ("assistant", "Paris"),
        ("user", "And of Italy?"),
    ]
    first = registry.gen.records[0].request  # type: ignore[attr-defined]
    assert [(t.role, t.content) for t in first.messages] == [
        ("system", "Be brief."),
        ("user", "Capital of France?"),
    ]
    await runtime.close()


async def test_fail_all_and_finish_connection_for_drain() -> None:
    gate = asyncio.Event()
    runtime, _, _ = make_runtime(FakeRegistry(ScriptedGenerator(gate=gate)))
    box = outbox()
    runtime.attach(box, 0, welcome)
    runtime.handle(gen("g"))
    await asyncio.sleep(0.02)
    runtime.goaway("draining", 500)
    runtime.fail_all(SluiceError(ErrorCode.SHUTTING_DOWN, "bye"))
    runtime.finish_connection(CloseCode.SERVICE_RESTART, "restart")
    events = await collect(box, lambda ev: False)
    assert [e["type"] for e in events] == ["welcome", "goaway", "error"]
    assert events[2]["id"] == "g" and events[2]["code"] == "shutting_down"
    assert box.close_code is CloseCode.SERVICE_RESTART
    await runtime.close()
