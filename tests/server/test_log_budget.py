"""The replay window by size and the server-wide bound on log memory, in-process: the registry's
`LogBudget` order (detached sessions first), its accounting, and PROTOCOL.md §2's case of a
reader that stalls during a fast stream and still resumes exactly."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from protocol.codec import encode
from protocol.errors import ErrorCode, SluiceError
from protocol.eventlog import MemoryEventLog
from protocol.session import SessionLimits
from server.app import create_app
from server.dispatcher import Dispatcher
from server.metrics import Metrics
from server.outbox import Outbox
from server.ratelimit import RateLimiter
from server.runtime import SessionRuntime
from server.sessions import SessionRegistry
from server.settings import Settings
from tests.server.fakes import Clock, FakeRegistry, ScriptedGenerator, welcome


def make(budget_bytes: int) -> tuple[SessionRegistry, Clock]:
    settings = Settings()
    limiter = RateLimiter(settings)
    metrics = Metrics()
    clock = Clock()
    sessions = SessionRegistry(
        # A window far larger than the budget: only the budget sheds here.
        limits=SessionLimits(max_inflight=8, replay_events=100_000, replay_bytes=0),
        ttl_s=600,
        dispatcher=Dispatcher(FakeRegistry(), limiter=limiter, metrics=metrics),
        limiter=limiter,
        metrics=metrics,
        clock=clock,
        log_budget_bytes=budget_bytes,
    )
    return sessions, clock


def box() -> Outbox:
    return Outbox(encode=encode, soft_bytes=1 << 20, hard_bytes=1 << 30, max_refs=1 << 20)


def log_of(runtime: SessionRuntime) -> MemoryEventLog:
    log = runtime.session.log
    assert isinstance(log, MemoryEventLog)
    return log


def fill(runtime: SessionRuntime, count: int) -> None:
    for _ in range(count):
        runtime.refuse(SluiceError(ErrorCode.INVALID_MESSAGE, "x" * 100))


async def test_detached_sessions_are_shed_first_and_a_resume_needing_them_is_a_new_session() -> None:
    sessions, clock = make(1_000_000)
    budget = sessions.log_budget
    assert budget is not None
    older, newer = box(), box()
    detached_long = (await sessions.connect(older, key_id="k", welcome=welcome)).runtime
    detached_recent = (await sessions.connect(newer, key_id="k", welcome=welcome)).runtime
    attached = (await sessions.connect(box(), key_id="k", welcome=welcome)).runtime
    fill(detached_long, 30)
    fill(detached_recent, 30)
    detached_long.detach(older)
    clock.now += 5
    detached_recent.detach(newer)
    # The attached session writes until the budget is reached once.
    while budget.reclaims == 0:
        fill(attached, 1)
    assert budget.held <= budget.low_water
    assert budget.held == sum(log_of(r).held_cost for r in (detached_long, detached_recent, attached))
    # The longest detached went first (whole), then the other as far as needed; the attached
    # session lost nothing.
    assert len(log_of(detached_long)) == 0
    assert 0 < len(log_of(detached_recent)) < 30
    assert log_of(attached).oldest_seq == 1
    # A resume that needs a shed event gets a new session; one that needs none resumes.
    lost = await sessions.connect(box(), key_id="k", welcome=welcome, resume=detached_long.id, last_seq=0)
    assert not lost.resumed
    caught_up = await sessions.connect(
        box(), key_id="k", welcome=welcome, resume=detached_long.id, last_seq=detached_long.last_seq
    )
    assert caught_up.resumed and caught_up.runtime is detached_long
    await sessions.close()


async def test_attached_logs_are_shed_last_the_largest_first_and_ending_a_session_frees_its_log() -> None:
    sessions, _ = make(600_000)
    budget = sessions.log_budget
    assert budget is not None
    small = (await sessions.connect(box(), key_id="k", welcome=welcome)).runtime
    large = (await sessions.connect(box(), key_id="k", welcome=welcome)).runtime
    fill(small, 20)
    while budget.reclaims == 0:
        fill(large, 1)
    assert log_of(small).oldest_seq == 1 and log_of(large).oldest_seq > 1
    assert budget.held <= budget.low_water
    await sessions.end(large.id)
    assert budget.held == log_of(small).held_cost
    await sessions.close()
    assert budget.held == 0


async def test_no_budget_when_the_setting_is_zero() -> None:
    sessions, _ = make(0)
    assert sessions.log_budget is None
    runtime = (await sessions.connect(box(), key_id="k", welcome=welcome)).runtime
    fill(runtime, 10)
    assert log_of(runtime).held_cost == 0 and len(log_of(runtime)) == 10
    await sessions.close()


def _stall_then_resume(settings: Settings, tokens: int) -> tuple[bool, list[dict[str, object]]]:
    """Read 50 deltas, stop reading while the rest of a ``tokens``-delta stream is sent, drop the
    connection, resume from the last seq read: (resumed, what came after the welcome)."""
    generator = ScriptedGenerator(pieces=[f" t{n}" for n in range(tokens)])
    with TestClient(create_app(settings, registry=FakeRegistry(generator))) as client:
        with client.websocket_connect("/v1/ws", subprotocols=["sluice.v1"]) as ws:
            ws.send_text('{"type":"generate","id":"g","prompt":"hi"}')
            first = ws.receive_json()
            assert first["limits"]["replay_bytes"] == settings.replay_bytes
            seen = [ws.receive_json() for _ in range(50)]
            session, last_seq = first["session"], seen[-1]["seq"]
            deadline = time.monotonic() + 60
            while not (generator.records and generator.records[0].finished):  # the stall
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with client.websocket_connect("/v1/ws", subprotocols=["sluice.v1"]) as ws:
            ws.send_text(f'{{"type":"hello","protocol":1,"session":"{session}","last_seq":{last_seq}}}')
            again = ws.receive_json()
            if not again["resumed"]:
                return False, []
            events = []
            while not events or events[-1]["type"] != "done":
                events.append(ws.receive_json())
            return True, events


def test_a_reader_stalled_during_10000_one_token_deltas_resumes_exactly() -> None:
    # PROTOCOL.md §2: 20 s of stall at 500 tokens/s. Each token is sent as its own delta while
    # the connection looks alive: outbound bounds as large as the kernel's socket buffers can be
    # on loopback, so nothing merges (the case the issue measured). The scripted stream comes
    # all at once; a real one at 500 tokens/s is 2 ms a token, slower than the delta hold window
    # (1 ms), so none of its deltas is held: no hold here either.
    tokens = 10_000
    roomy = {"outbound_soft_bytes": 64 << 20, "outbound_hard_bytes": 128 << 20, "delta_hold_s": 0.0}
    resumed, events = _stall_then_resume(Settings(**roomy), tokens)
    assert resumed
    assert [e["seq"] for e in events] == list(range(51, tokens + 2))
    assert "".join(str(e["text"]) for e in events[:-1]) == "".join(f" t{n}" for n in range(50, tokens))
    assert events[-1]["type"] == "done"
    # By count alone (replay_bytes 0: the 4,096-event log of before), the same stall is lost.
    assert _stall_then_resume(Settings(replay_bytes=0, **roomy), tokens) == (False, [])
