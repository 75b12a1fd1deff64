"""protocol.session: numbering, in-flight rules, terminal-once, resume, ack and history. No sockets."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest

from protocol.errors import ErrorCode, SluiceError
from protocol.eventlog import MemoryEventLog
from protocol.lifecycle import LifecycleError, State
from protocol.messages import (
    Ack,
    Cancel,
    ChatMessage,
    Classify,
    Done,
    Embed,
    Error,
    Generate,
    Hello,
    LabelScore,
    LoggedMessage,
    Ping,
    Pong,
    Timings,
    Usage,
)
from protocol.session import (
    Accepted,
    CancelRequested,
    Ignored,
    Refused,
    Reply,
    Session,
    SessionLimits,
)

USAGE = Usage(prompt_tokens=2, completion_tokens=3)
TIMINGS = Timings(queue_ms=0.5, ttft_ms=2.0, total_ms=4.0)


def gen(request_id: str = "g", **fields: Any) -> Generate:
    fields.setdefault("prompt", "hi")
    return Generate(type="generate", id=request_id, **fields)


def emb(request_id: str = "e") -> Embed:
    return Embed(type="embed", id=request_id, input="x")


def cls(request_id: str = "c") -> Classify:
    return Classify(type="classify", id=request_id, input="x", labels=["a", "b"])


def session(max_inflight: int = 8, replay_events: int = 100, **limits: Any) -> Session:
    return Session("s1", SessionLimits(max_inflight=max_inflight, replay_events=replay_events, **limits))


def done(s: Session, request_id: str = "g", finish_reason: Any = "stop") -> Done | None:
    return s.done(request_id, finish_reason=finish_reason, usage=USAGE, timings=TIMINGS, model="m")


def accept(s: Session, request: Any) -> None:
    assert s.receive(request) == Accepted(request)


# ---------------------------------------------------------------------------------------------
# numbering and logging


def test_seq_starts_at_one_and_never_skips_across_every_kind_of_event() -> None:
    s = session()
    assert s.last_seq == 0 and s.replay(0) == []
    accept(s, gen("g"))
    accept(s, emb("e"))
    accept(s, cls("c"))
    accept(s, gen("x"))
    events = [
        s.delta("g", "a"),
        s.refuse(SluiceError(ErrorCode.RATE_LIMITED, "slow", ref="z")),
        s.embedding("e", model="m", dimensions=1, embeddings=[[1.0]]),
        s.delta("g", "b"),
        s.classification("c", model="m", results=[[LabelScore(label="a", score=1.0)]]),
        done(s, "g"),
        s.fail("x", SluiceError(ErrorCode.UPSTREAM_ERROR, "boom")),
        s.goaway("draining", 100),
    ]
    assert [e.seq for e in events if e is not None] == list(range(1, 9))
    assert s.last_seq == 8
    assert s.replay(0) == events


def test_every_event_is_logged_before_it_is_returned() -> None:
    log = MemoryEventLog(100)
    s = Session("s", SessionLimits(), log)
    accept(s, gen("g"))
    for text in "abc":
        event = s.delta("g", text)
        assert event is not None
        assert log.last_seq == event.seq and log.after(event.seq - 1) == [event]
    final = done(s)
    assert final is not None and log.after(final.seq - 1) == [final]


def test_session_continues_the_numbering_of_a_log_it_is_given() -> None:
    log = MemoryEventLog(10)
    first = Session("s", SessionLimits(), log)
    first.goaway("x", 1)
    first.goaway("y", 1)
    again = Session("s", SessionLimits(), log)
    assert again.last_seq == 2
    assert again.goaway("z", 1).seq == 3


# ---------------------------------------------------------------------------------------------
# receive


def test_request_is_accepted_and_queued() -> None:
    s = session()
    request = gen("g")
    assert s.receive(request) == Accepted(request)
    entry = s.inflight["g"]
    assert (entry.request, entry.kind, entry.state) == (request, "generate", State.QUEUED)
    assert s.last_seq == 0  # accepting sends nothing


def test_ping_and_unknown_cancel_and_hello() -> None:
    s = session()
    assert s.receive(Ping(type="ping", nonce="n1")) == Reply(Pong(nonce="n1"))
    assert s.receive(Ping(type="ping")) == Reply(Pong())
    assert s.receive(Cancel(type="cancel", id="nobody")) == Ignored()
    assert s.last_seq == 0  # pong and ignored cancels are not numbered
    outcome = s.receive(Hello(type="hello"))
    assert isinstance(outcome, Refused)
    assert (outcome.event.code, outcome.event.seq, outcome.event.id) == (ErrorCode.INVALID_MESSAGE, 1, None)


def test_duplicate_id_in_flight_is_refused_without_touching_the_running_request() -> None:
    s = session()
    accept(s, gen("a"))
    s.delta("a", "x")
    for duplicate in (gen("a", prompt="other"), emb("a"), cls("a")):
        outcome = s.receive(duplicate)
        assert isinstance(outcome, Refused)
        error = outcome.event
        assert (error.code, error.id, error.ref, error.retryable) == (
            ErrorCode.DUPLICATE_ID,
            None,
            "a",
            False,
        )
    assert s.inflight["a"].request.prompt == "hi"
    assert s.delta("a", "y") is not None
    assert done(s, "a") is not None


def test_id_can_be_reused_after_its_request_finished() -> None:
    s = session()
    for finish in (
        lambda: done(s, "a"),
        lambda: s.fail("a", SluiceError(ErrorCode.TIMEOUT, "t")),
        lambda: s.cancelled("a", model="m"),
    ):
        accept(s, gen("a"))
        assert finish() is not None
        assert "a" not in s.inflight
    accept(s, emb("a"))


def test_inflight_limit() -> None:
    s = session(max_inflight=2)
    accept(s, gen("a"))
    accept(s, emb("b"))
    outcome = s.receive(cls("c"))
    assert isinstance(outcome, Refused)
    assert (outcome.event.code, outcome.event.ref, outcome.event.retryable) == (
        ErrorCode.TOO_MANY_INFLIGHT,
        "c",
        True,
    )
    assert set(s.inflight) == {"a", "b"}
    s.embedding("b", model="m", dimensions=1, embeddings=[[0.0]])
    accept(s, cls("c"))


def test_cancel_in_flight_asks_to_stop_and_changes_nothing_yet() -> None:
    s = session()
    accept(s, gen("a"))
    assert s.receive(Cancel(type="cancel", id="a")) == CancelRequested("a")
    assert s.receive(Cancel(type="cancel", id="a")) == CancelRequested("a")  # idempotent while in flight
    assert s.inflight["a"].state is State.QUEUED and s.last_seq == 0
    s.cancelled("a", model="m")
    assert s.receive(Cancel(type="cancel", id="a")) == Ignored()


def test_refuse_numbers_an_id_less_error_with_ref() -> None:
    s = session()
    error = s.refuse(SluiceError(ErrorCode.RATE_LIMITED, "later", retry_after_ms=250, ref="r"))
    assert error == Error(
        seq=1, ref="r", code=ErrorCode.RATE_LIMITED, message="later", retryable=True, retry_after_ms=250
    )
    assert s.replay(0) == [error]


# ---------------------------------------------------------------------------------------------
# lifecycle and terminal-once


def test_start_moves_to_running_and_output_implies_start() -> None:
    s = session()
    accept(s, gen("a"))
    accept(s, gen("b"))
    s.start("a")
    assert s.inflight["a"].state is State.RUNNING
    with pytest.raises(LifecycleError):
        s.start("a")  # a caller bug, not a client error
    assert s.inflight["a"].state is State.RUNNING
    s.delta("b", "x")
    assert s.inflight["b"].state is State.RUNNING
    s.start("nobody")  # ended or unknown: nothing to do


def test_results_from_queued_requests_are_accepted() -> None:
    s = session()
    accept(s, emb("e"))
    assert s.embedding("e", model="m", dimensions=1, embeddings=[[1.0]]) is not None
    accept(s, gen("g"))
    assert done(s, "g") is not None


@pytest.mark.parametrize(
    "first",
    [
        lambda s: done(s),
        lambda s: done(s, finish_reason="length"),
        lambda s: s.fail("g", SluiceError(ErrorCode.UPSTREAM_ERROR, "x")),
        lambda s: s.cancelled("g", model="m"),
        lambda s: done(s, finish_reason="cancelled"),
    ],
)
def test_nothing_after_the_terminal_message_of_a_generation(first: Any) -> None:
    s = session()
    accept(s, gen("g"))
    s.delta("g", "x")
    terminal = first(s)
    assert terminal is not None
    seq = s.last_seq
    assert s.delta("g", "late") is None
    assert done(s) is None
    assert s.fail("g", SluiceError(ErrorCode.INTERNAL, "x")) is None
    assert s.cancelled("g", model="m") is None
    assert s.last_seq == seq
    assert [e for e in s.replay(0) or [] if getattr(e, "id", None) == "g"][-1] == terminal


@pytest.mark.parametrize("kind", ["embed", "classify"])
def test_nothing_after_the_terminal_message_of_embed_and_classify(kind: str) -> None:
    s = session()
    request = emb("r") if kind == "embed" else cls("r")
    accept(s, request)
    assert s.cancelled("r", model="m") is not None
    assert s.embedding("r", model="m", dimensions=1, embeddings=[[1.0]]) is None
    assert s.classification("r", model="m", results=[]) is None
    assert s.fail("r", SluiceError(ErrorCode.TIMEOUT, "t")) is None
    assert s.last_seq == 1


def test_cancel_racing_done_gives_exactly_one_terminal() -> None:
    s = session()
    accept(s, gen("g"))
    s.start("g")
    assert s.receive(Cancel(type="cancel", id="g")) == CancelRequested("g")
    final = done(s)  # the generation finished before the cancel reached it
    assert final is not None and final.finish_reason == "stop"
    assert s.cancelled("g", model="m") is None  # the cancel path reports too, and loses
    terminals = [e for e in s.replay(0) or [] if isinstance(e, Done | Error)]
    assert terminals == [final]


def test_done_racing_cancel_gives_exactly_one_terminal() -> None:
    s = session()
    accept(s, gen("g"))
    s.start("g")
    s.receive(Cancel(type="cancel", id="g"))
    cancelled = s.cancelled("g", model="m")
    assert isinstance(cancelled, Done) and cancelled.finish_reason == "cancelled"
    assert done(s) is None
    assert s.replay(0) == [cancelled]


def test_cancelled_generation_is_a_done() -> None:
    s = session()
    accept(s, gen("g"))
    plain = s.cancelled("g", model="m")
    assert isinstance(plain, Done)
    assert (plain.finish_reason, plain.usage, plain.timings.ttft_ms, plain.model) == (
        "cancelled",
        Usage(prompt_tokens=0, completion_tokens=0),
        None,
        "m",
    )
    accept(s, gen("h"))
    s.start("h")
    full = s.cancelled("h", model="m", usage=USAGE, timings=TIMINGS)
    assert isinstance(full, Done) and (full.usage, full.timings) == (USAGE, TIMINGS)


@pytest.mark.parametrize("request_", [emb("r"), cls("r")])
def test_cancelled_embed_or_classify_is_an_error(request_: Any) -> None:
    s = session()
    accept(s, request_)
    error = s.cancelled("r", model="m")
    assert isinstance(error, Error)
    assert (error.id, error.ref, error.code, error.retryable) == ("r", None, ErrorCode.CANCELLED, False)


def test_fail_is_the_terminal_error_with_id() -> None:
    s = session()
    accept(s, gen("g"))
    error = s.fail("g", SluiceError(ErrorCode.OVERLOADED, "busy", retry_after_ms=50, ref="ignored"))
    assert error == Error(
        id="g", seq=1, code=ErrorCode.OVERLOADED, message="busy", retryable=True, retry_after_ms=50
    )


def test_a_request_lost_before_it_reached_the_session_ends_with_a_logged_error() -> None:
    s = session()
    accept(s, gen("g"))
    stopped = SluiceError(ErrorCode.INTERNAL, "the node that took it stopped", retryable=True)
    assert s.lost("g", stopped) is None  # one of that id runs here: its own end is to come
    error = s.lost("other", stopped)
    assert error == Error(id="other", seq=1, code=ErrorCode.INTERNAL, message=stopped.message, retryable=True)
    assert s.replay(0) == [error] and "g" in s.inflight


def test_reporting_the_wrong_kind_of_result_is_a_caller_bug() -> None:
    s = session()
    accept(s, emb("e"))
    accept(s, gen("g"))
    with pytest.raises(ValueError):
        s.delta("e", "x")
    with pytest.raises(ValueError):
        s.classification("e", model="m", results=[])
    with pytest.raises(ValueError):
        s.embedding("g", model="m", dimensions=1, embeddings=[[0.0]])
    assert set(s.inflight) == {"e", "g"} and s.last_seq == 0


# ---------------------------------------------------------------------------------------------
# resume


def test_replay_after_a_seq() -> None:
    s = session()
    accept(s, gen("g"))
    events = [s.delta("g", str(i)) for i in range(5)]
    assert s.replay(0) == events
    assert s.replay(3) == events[3:]
    assert s.replay(5) == []


def test_replay_beyond_last_seq_or_negative_is_impossible() -> None:
    s = session()
    assert s.replay(1) is None
    s.goaway("x", 1)
    assert s.replay(2) is None
    assert s.replay(-1) is None


def test_replay_with_a_gap_is_never_partial() -> None:
    s = session(replay_events=3)
    accept(s, gen("g"))
    events = [s.delta("g", str(i)) for i in range(6)]  # seq 1..6, log holds 4..6
    assert s.replay(3) == events[3:]
    assert s.replay(2) is None
    assert s.replay(0) is None


def test_ack_trims_the_log() -> None:
    s = session()
    accept(s, gen("g"))
    events = [s.delta("g", str(i)) for i in range(5)]
    assert s.receive(Ack(type="ack", seq=2)) == Ignored()
    assert s.replay(2) == events[2:]
    assert s.replay(1) is None
    assert s.receive(Ack(type="ack", seq=0)) == Ignored()  # behind the log: nothing happens
    assert s.replay(2) == events[2:]


def test_ack_beyond_last_seq_is_clamped() -> None:
    s = session()
    accept(s, gen("g"))
    s.delta("g", "a")
    s.delta("g", "b")
    s.receive(Ack(type="ack", seq=1000))
    assert s.replay(2) == []
    assert s.replay(1) is None
    later = s.delta("g", "c")
    assert later is not None and later.seq == 3  # numbering is untouched by a bogus ack
    assert s.replay(2) == [later]


# ---------------------------------------------------------------------------------------------
# conversation and history


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


def system(text: str) -> ChatMessage:
    return ChatMessage(role="system", content=text)


def run_turn(s: Session, request: Generate, pieces: list[str], finish_reason: Any = "stop") -> None:
    accept(s, request)
    for piece in pieces:
        s.delta(request.id, piece)
    if finish_reason == "fail":
        s.fail(request.id, SluiceError(ErrorCode.UPSTREAM_ERROR, "x"))
    elif finish_reason == "cancel":
        s.cancelled(request.id, model="m")
    else:
        done(s, request.id, finish_reason)


def test_conversation_without_history() -> None:
    s = session()
    assert s.conversation(gen(prompt="hi")) == [user("hi")]
    assert s.conversation(gen(prompt="hi", system="sys")) == [system("sys"), user("hi")]
    turns = [system("a"), user("b"), assistant("c"), user("d")]
    assert s.conversation(gen(prompt=None, messages=turns)) == turns
    run_turn(s, gen("t", prompt="remember me"), ["ok"])
    assert s.history == ()  # a turn without history: true is not kept
    assert s.conversation(gen(prompt="x")) == [user("x")]


def test_history_keeps_finished_turns_in_order() -> None:
    s = session()
    run_turn(s, gen("1", prompt="I am Ada", history=True, system="be kind"), ["Hello ", "Ada"])
    run_turn(s, gen("2", prompt="longer", history=True), ["cut"], "length")
    request = gen("3", prompt="who am I?", history=True, system="be brief")
    assert s.conversation(request) == [
        system("be brief"),
        user("I am Ada"),
        assistant("Hello Ada"),
        user("longer"),
        assistant("cut"),
        user("who am I?"),
    ]
    # A request without history: true neither sees nor extends the history.
    assert s.conversation(gen("4", prompt="alone")) == [user("alone")]


def test_a_session_handed_a_history_goes_on_from_it() -> None:
    kept = [user("I am Ada"), assistant("Hello Ada")]
    s = Session("s1", SessionLimits(history_messages=3), None, kept)
    assert s.history == tuple(kept)
    run_turn(s, gen("1", prompt="who am I?", history=True), ["Ada"])
    # Bounded as any history: the oldest turn goes first.
    assert s.history == (assistant("Hello Ada"), user("who am I?"), assistant("Ada"))


def test_history_takes_message_turns_but_not_their_system_messages() -> None:
    s = session()
    run_turn(s, gen("1", prompt=None, messages=[system("s"), user("q1")], history=True), ["a1"])
    assert s.history == (user("q1"), assistant("a1"))
    request = gen("2", prompt=None, messages=[system("s2"), user("q2")], history=True)
    assert s.conversation(request) == [user("q1"), assistant("a1"), system("s2"), user("q2")]


@pytest.mark.parametrize("ending", ["fail", "cancel", "cancelled"])
def test_unfinished_turns_are_not_remembered(ending: str) -> None:
    s = session()
    run_turn(s, gen("1", prompt="kept", history=True), ["yes"])
    run_turn(s, gen("2", prompt="lost", history=True), ["partial"], ending)
    assert s.history == (user("kept"), assistant("yes"))


def test_history_is_bounded() -> None:
    s = session(history_messages=4)
    for i in range(5):
        run_turn(s, gen(str(i), prompt=f"q{i}", history=True), [f"a{i}"])
    assert s.history == (user("q3"), assistant("a3"), user("q4"), assistant("a4"))


# ---------------------------------------------------------------------------------------------
# footprint


def test_idle_sessions_are_small() -> None:
    # DESIGN.md: 10,000 idle sessions within 40 KB each for the whole server; the protocol state
    # must be a small part of that.
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    sessions = [Session(f"session-{i:05d}", SessionLimits()) for i in range(10_000)]
    per_session = (tracemalloc.get_traced_memory()[0] - before) / len(sessions)
    tracemalloc.stop()
    assert per_session < 2_048, f"{per_session:.0f} bytes per idle session"


def test_delta_after_terminal_does_not_grow_the_log() -> None:
    s = session()
    accept(s, gen("g"))
    final = done(s)
    for _ in range(100):
        assert s.delta("g", "x") is None
    assert s.replay(0) == [final]


class _ListLog:
    """An `EventLog` that is not a `MemoryEventLog` (as a store elsewhere is): it gets models."""

    def __init__(self) -> None:
        self.events: list[LoggedMessage] = []

    def append(self, event: LoggedMessage) -> None:
        self.events.append(event)

    def after(self, seq: int) -> list[LoggedMessage] | None:
        return [e for e in self.events if e.seq > seq]

    def trim(self, upto: int) -> None:
        pass

    @property
    def oldest_seq(self) -> int:
        return 1

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0


@pytest.mark.parametrize("log", [None, "list"])
def test_numbered_delta_logs_exactly_what_delta_logs(log: str | None) -> None:
    by_model = Session("a", SessionLimits(), _ListLog() if log else None)
    by_fields = Session("b", SessionLimits(), _ListLog() if log else None)
    for s in (by_model, by_fields):
        accept(s, gen("g", history=True))
    events = [by_model.delta("g", text) for text in ("x", "y", "z")]
    seqs = [by_fields.numbered_delta("g", text) for text in ("x", "y", "z")]
    assert seqs == [e.seq for e in events if e is not None] == [1, 2, 3]
    assert by_fields.replay(0) == by_model.replay(0) == events
    assert by_fields.last_seq == 3
    done(by_model, "g")
    done(by_fields, "g")
    assert by_fields.history == by_model.history  # the reply is kept for history alike
    assert by_fields.numbered_delta("g", "late") is None  # ended: nothing is numbered


def test_numbered_delta_starts_a_queued_request_and_refuses_another_kind() -> None:
    s = session()
    accept(s, gen("g"))
    accept(s, emb("e"))
    assert s.inflight["g"].state is State.QUEUED
    assert s.numbered_delta("g", "x") == 1
    assert s.inflight["g"].state is State.RUNNING
    with pytest.raises(ValueError, match="embed request"):
        s.numbered_delta("e", "x")
