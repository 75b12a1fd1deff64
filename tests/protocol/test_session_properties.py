"""Property test: any sequence of session operations keeps the contract's invariants.

seq is gap-free from 1; each accepted request gets at most one terminal message and nothing after
it; ``replay(k)`` is exactly the suffix of everything sent after k, or None exactly when part of it
was evicted or acknowledged away (or k is ahead of the session).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import (
    Ack,
    Cancel,
    Classification,
    Classify,
    Done,
    Embed,
    Embedding,
    Error,
    Generate,
    LabelScore,
    LoggedMessage,
    Ping,
    Timings,
    Usage,
)
from protocol.session import Accepted, CancelRequested, Ignored, Refused, Reply, Session, SessionLimits

IDS = ["a", "b", "c", "d"]
MAX_INFLIGHT = 3
CAPACITY = 6

ids = st.sampled_from(IDS)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.sampled_from(["generate", "embed", "classify"]), ids),
        st.tuples(st.just("start"), ids),
        st.tuples(st.just("delta"), ids),
        st.tuples(st.just("tool_call"), ids),
        st.tuples(st.just("finish"), ids, st.sampled_from(["tool_calls"])),
        st.tuples(st.just("finish"), ids, st.sampled_from(["stop", "length", "cancelled"])),
        st.tuples(st.just("fail"), ids),
        st.tuples(st.just("cancel"), ids),
        st.tuples(st.just("cancelled"), ids),
        st.tuples(st.just("ack"), st.integers(min_value=0, max_value=60)),
        st.tuples(st.just("ping")),
        st.tuples(st.just("refuse")),
        st.tuples(st.just("goaway")),
        st.tuples(st.just("replay"), st.integers(min_value=0, max_value=60)),
    ),
    max_size=80,
)

USAGE = Usage(prompt_tokens=1, completion_tokens=1)
TIMINGS = Timings(queue_ms=0.0, ttft_ms=None, total_ms=0.0)
TERMINAL = (Done, Embedding, Classification)


def request(kind: str, request_id: str) -> Generate | Embed | Classify:
    if kind == "generate":
        return Generate(type="generate", id=request_id, prompt="p")
    if kind == "embed":
        return Embed(type="embed", id=request_id, input="x")
    return Classify(type="classify", id=request_id, input="x", labels=["a", "b"])


def finish(s: Session, request_id: str, reason: Any) -> LoggedMessage | None:
    entry = s.inflight.get(request_id)
    kind = entry.kind if entry is not None else "generate"
    if kind == "embed":
        return s.embedding(request_id, model="m", dimensions=1, embeddings=[[0.0]])
    if kind == "classify":
        return s.classification(request_id, model="m", results=[[LabelScore(label="a", score=1.0)]])
    return s.done(request_id, finish_reason=reason, usage=USAGE, timings=TIMINGS, model="m")


@settings(max_examples=300, deadline=None)
@given(operations)
def test_random_operation_sequences_keep_the_invariants(ops: list[tuple[Any, ...]]) -> None:
    s = Session("p", SessionLimits(max_inflight=MAX_INFLIGHT, replay_events=CAPACITY))
    sent: list[LoggedMessage] = []  # every numbered event, in the order the session returned them
    inflight: dict[str, str] = {}  # the model: id → kind
    acked = 0
    open_terminals: dict[str, int] = {}  # terminals seen per id since its last acceptance

    for op in ops:
        event: LoggedMessage | None = None
        match op:
            case ("submit", kind, rid):
                outcome = s.receive(request(kind, rid))
                if rid in inflight:
                    assert isinstance(outcome, Refused) and outcome.event.code is ErrorCode.DUPLICATE_ID
                    event = outcome.event
                elif len(inflight) >= MAX_INFLIGHT:
                    assert isinstance(outcome, Refused) and outcome.event.code is ErrorCode.TOO_MANY_INFLIGHT
                    event = outcome.event
                else:
                    assert isinstance(outcome, Accepted)
                    inflight[rid] = kind
                    open_terminals[rid] = 0
            case ("start", rid):
                if rid in inflight and s.inflight[rid].state == "queued":
                    s.start(rid)
                    assert s.inflight[rid].state == "running"
            case ("delta", rid):
                if inflight.get(rid, "generate") == "generate":
                    event = s.delta(rid, "t")
                    assert (event is None) == (rid not in inflight)
            case ("tool_call", rid):
                if inflight.get(rid, "generate") == "generate":
                    before = s.inflight[rid].call_count if rid in inflight else 0
                    event = s.tool_call(rid, call_id=f"call_{len(sent)}", name="f", arguments="{}")
                    assert (event is None) == (rid not in inflight)
                    if event is not None:
                        assert event.index == before
            case ("finish", rid, reason):
                event = finish(s, rid, reason)
            case ("fail", rid):
                event = s.fail(rid, SluiceError(ErrorCode.UPSTREAM_ERROR, "x"))
            case ("cancel", rid):
                outcome = s.receive(Cancel(type="cancel", id=rid))
                assert outcome == (CancelRequested(rid) if rid in inflight else Ignored())
            case ("cancelled", rid):
                event = s.cancelled(rid, model="m")
            case ("ack", seq):
                assert s.receive(Ack(type="ack", seq=seq)) == Ignored()
                acked = max(acked, min(seq, len(sent)))
            case ("ping",):
                assert isinstance(s.receive(Ping(type="ping")), Reply)
            case ("refuse",):
                event = s.refuse(SluiceError(ErrorCode.RATE_LIMITED, "r"))
            case ("goaway",):
                event = s.goaway("drain", 1)
            case ("replay", k):
                pass
            case _:
                raise AssertionError(op)

        if event is not None:
            sent.append(event)
            request_id = getattr(event, "id", None)
            if request_id is not None:
                # Nothing carries an id after its terminal message, until the id is accepted again.
                assert request_id in inflight and open_terminals[request_id] == 0
                if isinstance(event, TERMINAL) or isinstance(event, Error):
                    open_terminals[request_id] += 1
                    del inflight[request_id]
        assert set(s.inflight) == set(inflight)

        # seq: gap-free from 1, and the session agrees about the newest one.
        assert [e.seq for e in sent] == list(range(1, len(sent) + 1))
        assert s.last_seq == len(sent)

        # replay(k) is the exact suffix or None when it cannot be complete.
        held_from = max(acked + 1, len(sent) - CAPACITY + 1, 1)
        for k in {0, held_from - 1, len(sent), len(sent) + 1, op[1] if op[0] == "replay" else 0}:
            replayed = s.replay(k)
            if held_from - 1 <= k <= len(sent):
                assert replayed == sent[k:]
            else:
                assert replayed is None

    assert all(count <= 1 for count in open_terminals.values())
