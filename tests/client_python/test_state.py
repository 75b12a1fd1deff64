"""`ClientState` without sockets: seq, duplicates, resume, resend, cancel."""

from __future__ import annotations

from sluice_client.state import ClientState, Deliver, Drain, Fail, Stray
from sluice_client.wire import Unknown

from protocol.errors import ErrorCode
from protocol.messages import (
    Cancel,
    Delta,
    Done,
    Embed,
    Embedding,
    Error,
    Generate,
    Goaway,
    Limits,
    Models,
    ServerInfo,
    Timings,
    ToolCall,
    Usage,
    Welcome,
)


def welcome(session: str = "s1", *, resumed: bool = False, last_seq: int = 0) -> Welcome:
    return Welcome(
        session=session,
        resumed=resumed,
        last_seq=last_seq,
        server=ServerInfo(version="t"),
        limits=Limits(max_message_bytes=1 << 20, max_inflight=8, replay_events=64, session_ttl_s=120),
        models=Models(generate=[], embed=[], classify=[]),
    )


def gen(request_id: str, *, history: bool = False) -> Generate:
    return Generate(type="generate", id=request_id, prompt="p", history=history)


def delta(request_id: str, seq: int, text: str = "x") -> Delta:
    return Delta(id=request_id, seq=seq, text=text)


def done(request_id: str, seq: int) -> Done:
    return Done(
        id=request_id,
        seq=seq,
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=1),
        timings=Timings(queue_ms=0, ttft_ms=0, total_ms=0),
        model="m",
    )


def started(*requests: Generate | Embed) -> ClientState:
    state = ClientState()
    assert state.welcomed(welcome()) == []
    for request in requests:
        state.add(request)
        state.sending(request)
    return state


def test_events_route_by_id_and_terminal_ends_the_request() -> None:
    state = started(gen("a"), gen("b"))
    assert state.receive(delta("a", 1)) == [Deliver("a", delta("a", 1))]
    assert state.receive(delta("b", 2)) == [Deliver("b", delta("b", 2))]
    assert state.receive(done("a", 3)) == [Deliver("a", done("a", 3))]
    assert list(state.pending) == ["b"] and state.last_seq == 3


def test_replayed_events_at_or_below_last_seq_are_dropped() -> None:
    state = started(gen("a"))
    state.receive(delta("a", 1))
    state.receive(delta("a", 2))
    assert state.receive(delta("a", 2)) == []
    assert state.receive(delta("a", 1)) == []
    assert state.receive(delta("a", 3)) != []


def test_unknown_types_still_advance_seq() -> None:
    state = started()
    assert state.receive(Unknown("future", 1)) == []
    assert state.last_seq == 1
    assert state.receive(Unknown("future", None)) == []


def test_resume_resends_only_unconfirmed_requests_after_the_replay() -> None:
    state = started(gen("seen"), gen("unseen"))
    state.receive(delta("seen", 1))
    state.add(gen("queued"))  # submitted while disconnected: never sent
    assert state.welcomed(welcome(resumed=True, last_seq=3)) == []
    assert not state.replayed
    state.receive(delta("seen", 2))
    state.receive(delta("seen", 3))
    assert state.replayed
    messages, ended = state.flush()
    assert [m.id for m in messages] == ["unseen", "queued"] and ended == []


def test_duplicate_id_for_a_resend_means_the_server_has_it() -> None:
    state = started(gen("a"))
    state.welcomed(welcome(resumed=True, last_seq=0))
    state.sending(state.pending["a"].request)  # the resend
    refused = Error(ref="a", seq=1, code=ErrorCode.DUPLICATE_ID, message="dup", retryable=False)
    assert state.receive(refused) == []
    assert state.pending["a"].confirmed
    # A duplicate_id for a request sent once is a real refusal.
    fresh = started(gen("b"))
    failed = fresh.receive(Error(ref="b", seq=1, code=ErrorCode.DUPLICATE_ID, message="dup", retryable=False))
    assert [type(action) for action in failed] == [Fail] and "b" not in fresh.pending


def test_new_session_fails_requests_with_output_and_resends_the_rest() -> None:
    state = started(gen("partial"), gen("nothing yet"), gen("chat", history=True))
    state.receive(delta("partial", 1))
    lost = state.welcomed(welcome("s2", resumed=False, last_seq=0))
    assert {f.id for f in lost} == {"partial", "chat"}
    assert all(f.error.retryable and f.error.code is ErrorCode.UPSTREAM_UNAVAILABLE for f in lost)
    assert state.session == "s2" and state.last_seq == 0
    messages, _ = state.flush()
    assert [m.id for m in messages] == ["nothing yet"]
    assert state.pending["nothing yet"].sends == 0


def test_errors_with_id_fail_that_request_only() -> None:
    state = started(gen("a"), gen("b"))
    actions = state.receive(Error(id="a", seq=1, code=ErrorCode.TIMEOUT, message="slow", retryable=True))
    assert len(actions) == 1 and isinstance(actions[0], Fail)
    assert actions[0].error.code is ErrorCode.TIMEOUT and actions[0].error.retryable
    assert list(state.pending) == ["b"]
    # An id-less refusal naming an id not in flight touches nothing.
    assert (
        state.receive(Error(ref="zzz", seq=2, code=ErrorCode.INVALID_MESSAGE, message="?", retryable=False))
        == []
    )


def test_cancel_outcomes() -> None:
    state = started(gen("sent"))
    state.add(gen("unsent"))
    assert state.cancel("unsent") == "local" and "unsent" not in state.pending
    assert state.cancel("sent") == "send"
    assert state.cancel("sent") == "none"
    assert state.cancel("never") == "none"
    # After a reconnect the cancel is repeated; unconfirmed, it ends here.
    state.welcomed(welcome(resumed=True, last_seq=0))
    messages, ended = state.flush()
    assert messages == [Cancel(type="cancel", id="sent")] and ended == ["sent"]


def test_output_for_unknown_requests_is_cancelled_once() -> None:
    state = started()
    assert state.receive(delta("ghost", 1)) == [Stray("ghost")]
    assert state.receive(delta("ghost", 2)) == []
    assert state.receive(done("ghost", 3)) == []


def test_goaway_drains() -> None:
    state = started()
    assert state.receive(Goaway(seq=1, reason="deploy", retry_after_ms=250)) == [Drain(250)]


def test_refused_by_transport() -> None:
    request = Embed(type="embed", id="e", input=["x"])
    state = started(request)
    from sluice_client.errors import SluiceError

    error = SluiceError(ErrorCode.TOO_MANY_INFLIGHT, "busy")
    assert state.refused(request, error) == [Fail("e", error)]
    assert state.refused(request, error) == []
    state.add(request)
    state.sending(request)
    embedding = Embedding(id="e", seq=1, model="m", dimensions=1, embeddings=[[0.5]])
    assert state.receive(embedding) == [Deliver("e", embedding)]


def test_fail_all() -> None:
    from sluice_client.errors import connection_failed

    state = started(gen("a"), gen("b"))
    failed = state.fail_all(connection_failed("gone"))
    assert [f.id for f in failed] == ["a", "b"] and state.pending == {}


def test_tool_calls_route_like_deltas_and_confirm_the_request() -> None:
    state = started(gen("a"))
    call = ToolCall(id="a", seq=1, index=0, call_id="c-1", name="f", arguments="{}")
    assert state.receive(call) == [Deliver("a", call)]
    assert state.pending["a"].confirmed and "a" in state.pending
    assert state.receive(call) == []  # a replayed duplicate
    assert state.flush() == ([], [])  # confirmed: not sent again after a resume
    assert state.receive(ToolCall(id="gone", seq=2, index=0, call_id="c-2", name="f", arguments="{}")) == [
        Stray("gone")
    ]
