"""The session registry (server/sessions.py): connect, resume, ownership, expiry, limits."""

from __future__ import annotations

import asyncio

import pytest

from protocol.close import CloseCode
from protocol.codec import encode
from protocol.errors import ErrorCode, SluiceError
from protocol.messages import Generate
from protocol.session import SessionLimits
from server.dispatcher import Dispatcher
from server.metrics import Metrics
from server.outbox import Outbox
from server.ratelimit import RateLimiter
from server.sessions import NotAttached, SessionRegistry
from server.settings import Settings
from tests.server.fakes import Clock, FakeRegistry, ScriptedGenerator, welcome


def make(
    registry: FakeRegistry | None = None, *, sessions_per_key: int = 0, ttl_s: float = 10
) -> tuple[SessionRegistry, Clock, Metrics]:
    settings = Settings(sessions_per_key=sessions_per_key)
    limiter = RateLimiter(settings)
    metrics = Metrics()
    dispatcher = Dispatcher(registry or FakeRegistry(), limiter=limiter, metrics=metrics)
    clock = Clock()
    sessions = SessionRegistry(
        limits=SessionLimits(max_inflight=8, replay_events=16),
        ttl_s=ttl_s,
        dispatcher=dispatcher,
        limiter=limiter,
        metrics=metrics,
        clock=clock,
    )
    return sessions, clock, metrics


def box() -> Outbox:
    return Outbox(encode=encode, soft_bytes=4096, hard_bytes=65536)


async def first_frame(outbox: Outbox) -> str:
    frame = await outbox.next_frame()
    assert isinstance(frame, str)
    return frame


async def test_new_session_then_resume_by_the_same_key() -> None:
    sessions, _, _ = make()
    first = await sessions.connect(box(), key_id="k", welcome=welcome)
    assert not first.resumed and len(sessions) == 1
    session_id = first.runtime.id
    first.runtime.refuse(SluiceError(ErrorCode.INVALID_MESSAGE, "x"))
    outbox = box()
    again = await sessions.connect(outbox, key_id="k", welcome=welcome, resume=session_id, last_seq=0)
    assert again.resumed and again.runtime is first.runtime
    assert '"resumed":true' in await first_frame(outbox)
    assert '"seq":1' in await first_frame(outbox)  # the replay follows the welcome
    await sessions.close()


async def test_another_key_or_an_unknown_id_gets_a_new_session() -> None:
    sessions, _, _ = make()
    mine = await sessions.connect(box(), key_id="k", welcome=welcome)
    theirs = await sessions.connect(box(), key_id="other", welcome=welcome, resume=mine.runtime.id)
    assert not theirs.resumed and theirs.runtime is not mine.runtime
    unknown = await sessions.connect(box(), key_id="k", welcome=welcome, resume="s_nope")
    assert not unknown.resumed and unknown.runtime.id != "s_nope"
    assert len(sessions) == 3
    await sessions.close()


async def test_resume_past_what_the_log_holds_is_a_new_session() -> None:
    sessions, _, _ = make()
    mine = await sessions.connect(box(), key_id="k", welcome=welcome)
    for _ in range(40):  # more than replay_events=16
        mine.runtime.refuse(SluiceError(ErrorCode.INVALID_MESSAGE, "x"))
    again = await sessions.connect(box(), key_id="k", welcome=welcome, resume=mine.runtime.id, last_seq=2)
    assert not again.resumed
    ahead = await sessions.connect(box(), key_id="k", welcome=welcome, resume=mine.runtime.id, last_seq=999)
    assert not ahead.resumed
    await sessions.close()


async def test_detached_sessions_expire_after_the_ttl_and_their_work_is_cancelled() -> None:
    gate = asyncio.Event()
    generator = ScriptedGenerator(gate=gate)
    sessions, clock, _ = make(FakeRegistry(generator))
    outbox = box()
    connected = await sessions.connect(outbox, key_id="k", welcome=welcome)
    runtime = connected.runtime
    runtime.handle(Generate(type="generate", id="g", prompt="hi"))
    await asyncio.sleep(0.02)
    clock.now += 60
    assert await sessions.sweep() == 0  # attached sessions never expire
    runtime.detach(outbox)
    clock.now += 9
    assert await sessions.sweep() == 0
    clock.now += 2
    assert await sessions.sweep() == 1
    assert len(sessions) == 0 and not runtime.busy
    assert generator.records[0].closed_early
    gone = await sessions.connect(box(), key_id="k", welcome=welcome, resume=runtime.id)
    assert not gone.resumed
    await sessions.close()


async def test_sessions_per_key_limit_and_release() -> None:
    sessions, _, _ = make(sessions_per_key=2)
    a = await sessions.connect(box(), key_id="k", welcome=welcome)
    await sessions.connect(box(), key_id="k", welcome=welcome)
    with pytest.raises(SluiceError) as refused:
        await sessions.connect(box(), key_id="k", welcome=welcome)
    assert refused.value.code is ErrorCode.RATE_LIMITED and refused.value.retry_after_ms
    await sessions.connect(box(), key_id="other", welcome=welcome)
    # Resuming an existing session needs no new slot.
    assert (await sessions.connect(box(), key_id="k", welcome=welcome, resume=a.runtime.id)).resumed
    assert await sessions.end(a.runtime.id)
    await sessions.connect(box(), key_id="k", welcome=welcome)
    await sessions.close()
    assert len(sessions) == 0


async def test_sweeper_task_runs_and_stops() -> None:
    sessions, clock, _ = make(ttl_s=0.2)  # sweeps every 0.05 s
    outbox = box()
    (await sessions.connect(outbox, key_id="k", welcome=welcome)).runtime.detach(outbox)
    clock.now += 1
    sessions.start_sweeper()
    for _ in range(100):
        if not len(sessions):
            break
        await asyncio.sleep(0.02)
    assert len(sessions) == 0
    await sessions.close()


async def test_open_or_resume_decides_like_connect_and_attaches_nothing() -> None:
    sessions, _, _ = make()
    mine = await sessions.connect(box(), key_id="k", welcome=welcome)
    mine.runtime.handle(Generate(type="generate", id="g", prompt="hi"))
    await asyncio.sleep(0.05)  # the scripted reply is logged
    last = mine.runtime.last_seq
    assert last > 0
    resumed = await sessions.open_or_resume(key_id="k", welcome=welcome, resume=mine.runtime.id, last_seq=1)
    assert (resumed.session, resumed.resumed, resumed.last_seq) == (mine.runtime.id, True, last)
    assert mine.runtime.attached  # the WebSocket stays attached: POST /v1/sessions attaches nothing
    ahead = await sessions.open_or_resume(
        key_id="k", welcome=welcome, resume=mine.runtime.id, last_seq=last + 5
    )
    theirs = await sessions.open_or_resume(key_id="other", welcome=welcome, resume=mine.runtime.id)
    fresh = await sessions.open_or_resume(key_id="k", welcome=welcome)
    for other in (ahead, theirs, fresh):
        assert other.resumed is False and other.session != mine.runtime.id and other.last_seq == 0
    assert len(sessions) == 4
    await sessions.close()


async def test_attach_takes_over_or_says_why_not() -> None:
    sessions, _, _ = make()
    first = box()
    mine = await sessions.connect(first, key_id="k", welcome=welcome)
    stream = box()
    attached = await sessions.attach(stream, session_id=mine.runtime.id, key_id="k", last_seq=0)
    assert attached is mine.runtime
    assert first.close_code is CloseCode.TAKEN_OVER
    unknown = await sessions.attach(box(), session_id="s_nope", key_id="k", last_seq=0)
    theirs = await sessions.attach(box(), session_id=mine.runtime.id, key_id="other", last_seq=0)
    ahead = await sessions.attach(box(), session_id=mine.runtime.id, key_id="k", last_seq=999)
    assert (unknown, theirs, ahead) == (NotAttached.UNKNOWN, NotAttached.UNKNOWN, NotAttached.INCOMPLETE)
    assert await sessions.find(mine.runtime.id, "k") is mine.runtime
    assert await sessions.find(mine.runtime.id, "other") is None
    await sessions.close()
