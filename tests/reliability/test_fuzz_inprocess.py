"""Fuzzing the edge in-process: ≥ 100k frames through `protocol.codec.decode` and a `Session`.

Every frame either decodes or fails with a `SluiceError` carrying an `ErrorCode` (anything else is
an untyped error: a crash the server would have to catch blindly). What decodes goes into a
session whose work is simulated at random (start, deltas, results, failures, cancels, late
reports after the end), and after every step the session keeps its contract: seq gap-free from 1,
at most one terminal per request and nothing for its id after it, ``inflight`` exactly the
requests not yet ended, ``replay(k)`` exactly the events after ``k`` (or ``None`` exactly when
eviction or an ``ack`` removed some of them), and every event encodes to a valid server message.
A seeded generator (`tests.reliability.fuzzframes`) makes the bulk; hypothesis adds its own
shapes and shrinks what it finds.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import decode, encode
from protocol.errors import ErrorCode, SluiceError
from protocol.lifecycle import State
from protocol.messages import (
    Classification,
    Done,
    Embedding,
    Error,
    FinishReason,
    Goaway,
    LabelScore,
    LoggedMessage,
    Pong,
    Timings,
    Usage,
)
from protocol.session import Accepted, CancelRequested, Ignored, Refused, Reply, Session, SessionLimits
from tests.reliability.checks import parse_server_message
from tests.reliability.fuzzframes import KINDS, TYPES, Frame, FrameFuzzer

MAX_BYTES = 4096
LIMITS = SessionLimits(max_inflight=8, replay_events=64, history_messages=16)
FRAMES = 100_000
# Well under a minute on the shared 2-core machine (it takes ~10 s there when idle).
TIME_LIMIT_S = 50.0
USAGE = Usage(prompt_tokens=3, completion_tokens=5)
TIMINGS = Timings(queue_ms=0.1, ttft_ms=1.0, total_ms=2.0)
TERMINAL = (Done, Embedding, Classification)


class SessionHarness:
    """A session fed fuzzed frames, with the server's side of the work simulated at random."""

    def __init__(self, rng: random.Random, limits: SessionLimits = LIMITS) -> None:
        self.rng = rng
        self.limits = limits
        self.session = Session("s_fuzz", limits)
        self.sent: list[LoggedMessage] = []
        self.open: dict[str, str] = {}  # request id -> kind, as the harness believes
        self.ended: dict[str, str] = {}  # ids that ended (and are not open again) -> kind
        self.trimmed = 0  # newest seq an ack removed from the log
        self.outcomes: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()

    # -- frames in ---------------------------------------------------------------------------

    def feed(self, frame: Frame | str | bytes) -> None:
        data = frame.data if isinstance(frame, Frame) else frame
        try:
            message = decode(data, max_bytes=MAX_BYTES)
        except SluiceError as exc:
            assert type(exc) is SluiceError and isinstance(exc.code, ErrorCode), repr(exc)
            assert exc.code in (
                ErrorCode.MESSAGE_TOO_LARGE,
                ErrorCode.INVALID_MESSAGE,
                ErrorCode.UNKNOWN_TYPE,
                ErrorCode.UNSUPPORTED_PROTOCOL,
            ), exc.code
            assert exc.ref is None or isinstance(exc.ref, str)
            assert len(exc.message) <= 400, "an error message must not reflect large input"
            self.codes[exc.code.value] += 1
            # What the transports do with a frame that does not decode.
            refusal = self.session.refuse(exc)
            assert refusal.ref == exc.ref and refusal.code is exc.code
            self._emitted(refusal)
            return
        self.codes["decoded:" + message.type] += 1
        outcome = self.session.receive(message)
        self.outcomes[type(outcome).__name__] += 1
        match outcome:
            case Accepted(request=request):
                assert request is message
                assert request.id not in self.open, f"{request.id!r} accepted while in flight"
                self.open[request.id] = request.type
                self.ended.pop(request.id, None)
            case CancelRequested(id=request_id):
                assert request_id in self.open
                self._report_cancelled(request_id)
            case Reply(message=pong):
                assert isinstance(pong, Pong) and message.type == "ping"
                assert pong.nonce == message.nonce
            case Refused(event=event):
                assert event.id is None
                assert event.code in (ErrorCode.DUPLICATE_ID, ErrorCode.TOO_MANY_INFLIGHT) or (
                    message.type == "hello" and event.code is ErrorCode.INVALID_MESSAGE
                ), event
                if event.code is ErrorCode.DUPLICATE_ID:
                    assert event.ref in self.open
                if event.code is ErrorCode.TOO_MANY_INFLIGHT:
                    assert len(self.open) >= self.limits.max_inflight
                self._emitted(event)
            case Ignored():
                if message.type == "ack":
                    self.trimmed = max(self.trimmed, min(message.seq, len(self.sent)))
                elif message.type == "cancel":
                    assert message.id not in self.open
            case _:
                raise AssertionError(f"unexpected outcome {outcome!r}")

    # -- the server's side, simulated --------------------------------------------------------

    def work(self) -> None:
        """One random report of progress (or of something late, after the end)."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.02 and self.ended:
            self._late(rng.choice(list(self.ended)))
            return
        if roll < 0.03:
            self._emitted(self.session.goaway("fuzz", 100))
            return
        if not self.open:
            return
        request_id = rng.choice(list(self.open))
        kind = self.open[request_id]
        pick = rng.random()
        session = self.session
        if pick < 0.15:
            # The server starts each request once (starting twice is a server bug, and raises).
            if session.inflight[request_id].state is State.QUEUED:
                session.start(request_id)
        elif kind == "generate" and pick < 0.85:
            self._emitted(session.delta(request_id, rng.choice(("a", " b", "東", "😀", "", "x" * 50))))
        elif pick < 0.92:
            self._finish(request_id, kind)
        elif pick < 0.97:
            self._emitted(session.fail(request_id, SluiceError(ErrorCode.UPSTREAM_ERROR, "boom")))
        else:
            self._report_cancelled(request_id)

    def _finish(self, request_id: str, kind: str) -> None:
        session = self.session
        if kind == "generate":
            reason: FinishReason = self.rng.choice(("stop", "length", "cancelled"))
            event: LoggedMessage | None = session.done(
                request_id, finish_reason=reason, usage=USAGE, timings=TIMINGS, model="m"
            )
        elif kind == "embed":
            event = session.embedding(request_id, model="m", dimensions=2, embeddings=[[0.5, -0.5]])
        else:
            results = [[LabelScore(label="x", score=0.75), LabelScore(label="y", score=0.25)]]
            event = session.classification(request_id, model="m", results=results)
        self._emitted(event)

    def _report_cancelled(self, request_id: str) -> None:
        event = self.session.cancelled(request_id, model="m", usage=USAGE, timings=TIMINGS)
        assert event is not None
        kind = self.open[request_id]
        if kind == "generate":
            assert isinstance(event, Done) and event.finish_reason == "cancelled"
        else:
            assert isinstance(event, Error) and event.code is ErrorCode.CANCELLED
        self._emitted(event)

    def _late(self, request_id: str) -> None:
        """Reports for a request that already ended change nothing and number nothing."""
        session = self.session
        kind = self.ended[request_id]
        before = session.last_seq
        late: list[object] = [
            session.fail(request_id, SluiceError.internal()),
            session.cancelled(request_id, model="m"),
        ]
        if kind == "generate":
            late.append(session.delta(request_id, "late"))
            late.append(
                session.done(request_id, finish_reason="stop", usage=USAGE, timings=TIMINGS, model="m")
            )
        elif kind == "embed":
            late.append(session.embedding(request_id, model="m", dimensions=1, embeddings=[[1.0]]))
        else:
            late.append(session.classification(request_id, model="m", results=[]))
        session.start(request_id)
        assert late == [None] * len(late), f"late report for ended {request_id!r} produced {late}"
        assert session.last_seq == before

    # -- invariants --------------------------------------------------------------------------

    def _emitted(self, event: LoggedMessage | None) -> None:
        assert event is not None, "a report for a request in flight must produce its event"
        expected_seq = len(self.sent) + 1
        assert event.seq == expected_seq == self.session.last_seq, (event.seq, expected_seq)
        request_id = getattr(event, "id", None)
        if request_id is not None:
            assert request_id in self.open, f"event for {request_id!r}, which is not in flight: {event}"
            if isinstance(event, TERMINAL) or isinstance(event, Error):
                self.ended[request_id] = self.open.pop(request_id)
        else:
            assert isinstance(event, Error | Goaway), event
        self.sent.append(event)
        wire = parse_server_message(encode(event))
        assert wire["seq"] == event.seq and wire["type"] == event.type

    def check(self) -> None:
        assert set(self.session.inflight) == set(self.open)
        for request_id, entry in self.session.inflight.items():
            assert entry.kind == self.open[request_id]

    def check_replay(self, k: int) -> None:
        last = len(self.sent)
        replay = self.session.replay(k)
        oldest = max(1, last - self.limits.replay_events + 1, self.trimmed + 1)
        complete = oldest - 1 <= k <= last
        if not complete:
            assert replay is None, f"replay({k}) should be impossible (oldest {oldest}, last {last})"
            return
        assert replay is not None, f"replay({k}) refused (oldest {oldest}, last {last})"
        assert [e.seq for e in replay] == list(range(k + 1, last + 1))
        # Equal, not identical: the log keeps a delta as (id, text) and rebuilds it when read.
        assert all(type(a) is type(b) and a == b for a, b in zip(replay, self.sent[k:], strict=True))


def run_frames(harness: SessionHarness, frames: list[Frame] | list[str | bytes]) -> None:
    rng = harness.rng
    for index, frame in enumerate(frames):
        try:
            harness.feed(frame)
            for _ in range(rng.randint(0, 2)):
                harness.work()
            harness.check()
            if index % 37 == 0:
                harness.check_replay(rng.randint(0, len(harness.sent) + 2))
        except Exception as exc:
            raise AssertionError(f"frame {index} ({frame!r:.300}) broke the edge: {exc!r}") from exc


def test_100k_seeded_frames_fail_only_with_typed_errors_and_keep_session_invariants() -> None:
    started = time.perf_counter()
    kinds: Counter[str] = Counter()
    harness_count = 0
    outcomes: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    total = 0
    seed = 0
    while total < FRAMES:
        # A fresh session now and then: early messages (first hello, empty log) get their share.
        seed += 1
        fuzzer = FrameFuzzer(seed, max_bytes=MAX_BYTES)
        harness = SessionHarness(random.Random(seed))
        frames = list(fuzzer.frames(min(5_000, FRAMES - total)))
        kinds.update(frame.kind for frame in frames)
        run_frames(harness, frames)
        harness.check_replay(0)
        outcomes += harness.outcomes
        codes += harness.codes
        total += len(frames)
        harness_count += 1
    elapsed = time.perf_counter() - started
    print(f"\n{total} frames in {elapsed:.1f} s over {harness_count} sessions; kinds {dict(kinds)}")
    print(f"outcomes {dict(outcomes)}; codes {dict(codes)}")
    assert total >= FRAMES
    assert set(kinds) == set(KINDS), "every kind of frame was made"
    # The generator reaches every branch that matters: accepted work, each refusal, each decode error.
    for outcome in ("Accepted", "CancelRequested", "Reply", "Refused", "Ignored"):
        assert outcomes[outcome] > 100, outcome
    for code in ("message_too_large", "invalid_message", "unknown_type", "unsupported_protocol"):
        assert codes[code] > 100, code
    assert elapsed < TIME_LIMIT_S, f"100k frames took {elapsed:.1f} s"


# ---------------------------------------------------------------------------------------------
# hypothesis: its own shapes, shrunk to the smallest failing frame.

FIELD_NAMES = st.sampled_from(
    [
        *("type", "id", "model", "prompt", "messages", "input", "labels", "options", "seq", "nonce"),
        *("protocol", "session", "last_seq", "role", "content", "max_tokens", "stop", "history", "encoding"),
    ]
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(TYPES),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(FIELD_NAMES | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES) | st.text(max_size=8)},
    optional={
        "id": st.sampled_from(["a", "b", "c"]) | st.text(max_size=70) | json_values,
        "prompt": st.text(max_size=30) | json_values,
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.text(max_size=9), "content": json_values}), max_size=3
        )
        | json_values,
        "input": st.text(max_size=10) | st.lists(st.text(max_size=10), max_size=3) | json_values,
        "labels": st.lists(st.text(max_size=5), max_size=4) | json_values,
        "options": st.dictionaries(
            st.sampled_from(["temperature", "top_p", "top_k", "max_tokens", "stop", "seed"]),
            json_values,
            max_size=3,
        )
        | json_values,
        "seq": json_values,
        "nonce": json_values,
        "protocol": st.integers(min_value=-2, max_value=3) | json_values,
        "last_seq": json_values,
        "session": json_values,
    },
)
frames = (
    messages.map(lambda m: orjson.dumps(m).decode())
    | messages.map(orjson.dumps)
    | json_values.map(orjson.dumps)
    | st.binary(max_size=64)
    | st.text(max_size=64)
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames, min_size=1, max_size=40), st.integers(min_value=0, max_value=2**32))
def test_hypothesis_frames_fail_only_with_typed_errors_and_keep_session_invariants(
    batch: list[str | bytes], seed: int
) -> None:
    harness = SessionHarness(random.Random(seed), SessionLimits(max_inflight=3, replay_events=8))
    run_frames(harness, batch)
    harness.check_replay(0)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_frame_alone(kind: str) -> None:
    """Each kind on its own, so a failure names the kind of input that caused it."""
    fuzzer = FrameFuzzer(1234, max_bytes=MAX_BYTES, kinds=(kind,))
    run_frames(SessionHarness(random.Random(kind)), list(fuzzer.frames(500)))
