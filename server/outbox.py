"""The bounded outbound buffer of one connection: backpressure between a session and its peer.

A transport's sender takes frames from its `Outbox` one at a time (`next_frame`) and writes them
to the peer; the session runtime pushes into it without ever awaiting. Everything pushed is
already numbered and in the session's event log (or is an unnumbered ``welcome``/``pong``), so
the outbox may drop what it holds at any time without losing anything a resuming client needs.

Bounds, all in bytes of encoded frames:

- below ``soft_bytes`` the outbox `has_room`: the runtime numbers each token as its own delta;
- at or above it (or while a replay is still being sent) the runtime keeps new text pending and
  merges it into one delta per request, numbered when room comes back (`on_room`);
- past ``hard_bytes`` (queued frames plus what the runtime holds pending) the outbox closes
  itself with 4008 (`CloseCode.SLOW_CONSUMER`) and drops its frames.

A replay is queued as references to messages the log already holds and encoded one at a time as
it is sent, so a 4,096-event replay costs no extra memory and does not count against the bounds.
Live results (everything logged but deltas: embeddings, classifications, done, errors) are queued
the same way: a burst of large results that a reader takes at full speed must not look like a
slow consumer. Their number is bounded instead (``max_refs``, the size of the event log): past
it the log no longer holds what the outbox refers to, and the outbox fails 4008.

A transport that can write without awaiting sets `write_now`: while its sender waits with nothing
queued, `push` hands the new frame to it at once (no wake-up of the sender per token) and queues
the frame only when it refuses, as it must whenever the write could not complete without waiting
(the peer's buffer is full), so backpressure reaches the bounds above exactly as before.

A live delta may be pushed as its fields (`push_delta`: request id, seq, text) with the
transport's ``encode_delta``, so that no message model is built per token; it is queued, bounded
and written exactly as the `Delta` it stands for would be.

A transport may also ask for deltas to be held briefly (``hold_s``, from `Settings.delta_hold_s`):
the outbox only carries the window; the runtime applies it per request (see `server.runtime`),
merging a fast request's tokens with the same merger it uses under backpressure.

The outbox never times anything and never numbers a message. Whoever drains it must
bound each write by ``outbound_stall_s`` and call `fail` with `CloseCode.SLOW_CONSUMER` when a
write takes longer: a peer that stops reading blocks the write, not the outbox.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import TypeAlias

from protocol.close import CloseCode
from protocol.codec import encode
from protocol.messages import Delta, LoggedMessage, Pong, Welcome

__all__ = ["Frame", "OutboundMessage", "Outbox"]

OutboundMessage: TypeAlias = LoggedMessage | Welcome | Pong
Frame: TypeAlias = str | bytes


class Outbox:
    """Frames waiting for one connection's sender, in the order they must reach the peer."""

    __slots__ = (
        "_bytes",
        "_close_code",
        "_close_reason",
        "_encode",
        "_encode_delta",
        "_finishing",
        "_frames",
        "_full",
        "_hard",
        "_max_refs",
        "_refs",
        "_replay_left",
        "_soft",
        "_waiter",
        "dropped",
        "hold_s",
        "on_close",
        "on_room",
        "write_now",
    )

    def __init__(
        self,
        *,
        encode: Callable[[OutboundMessage], Frame],
        soft_bytes: int,
        hard_bytes: int,
        max_refs: int = 4096,
        encode_delta: Callable[[str, int, str], Frame] | None = None,
        hold_s: float = 0.0,
    ) -> None:
        if not 0 < soft_bytes <= hard_bytes:
            raise ValueError("need 0 < soft_bytes <= hard_bytes")
        self._encode = encode
        # `encode` of a delta from its fields (request id, seq, text), when the transport has one.
        self._encode_delta = encode_delta
        self._soft = soft_bytes
        self._hard = hard_bytes
        self._max_refs = max_refs
        # A request's delta that follows its previous one by less than this is held and merged
        # (0: never); the runtime applies it, see `server.runtime`.
        self.hold_s = hold_s
        # Encoded frames with their sizes, replays (runs of logged messages, encoded when taken)
        # and single live results (logged, encoded when taken), in the order they were queued.
        self._frames: deque[tuple[Frame, int] | deque[LoggedMessage] | LoggedMessage] = deque()
        self._replay_left = 0
        self._refs = 0
        self._bytes = 0
        self._full = False
        # The sender's wait for the next frame, while it waits (a future, not an Event: an idle
        # connection should hold no deque of waiters).
        self._waiter: asyncio.Future[None] | None = None
        self._close_code: CloseCode | None = None
        self._close_reason = ""
        self._finishing: tuple[CloseCode, str] | None = None
        # Frames dropped unsent when the outbox was failed (they stay in the event log).
        self.dropped = 0
        # Called (synchronously, from `next_frame`) when the outbox had no room and has room again.
        self.on_room: Callable[[], None] | None = None
        # Called once when the outbox closes (`fail`, or `finish` once drained): the transport
        # stops its sender, which may be stuck writing to a peer that does not read.
        self.on_close: Callable[[], None] | None = None
        # The transport's synchronous write, when it has one: while the sender waits with nothing
        # queued, a new frame is handed to it and queued only if it refuses (returns False).
        self.write_now: Callable[[Frame], bool] | None = None

    # -- state -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._close_code is not None

    @property
    def close_code(self) -> CloseCode | None:
        return self._close_code

    @property
    def close_reason(self) -> str:
        return self._close_reason

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def replaying(self) -> bool:
        return self._replay_left > 0

    @property
    def backlog(self) -> bool:
        """Whether `next_frame` would return at once."""
        return bool(self._frames)

    @property
    def has_room(self) -> bool:
        """Whether a new token may be numbered and queued now rather than merged later. A "no"
        also arms `on_room`, which then fires once when room comes back."""
        room = self._close_code is None and not self._replay_left and self._bytes < self._soft
        if not room:
            self._full = True
        return room

    @property
    def sends_json(self) -> bool:
        """Whether a message's frame here is its JSON as `protocol.codec.encode` writes it (so a
        delta already in that form can be `push_frame`d as it is)."""
        return self._encode is encode

    # -- producer side (never awaits) --------------------------------------------------------

    def push(self, message: OutboundMessage) -> None:
        """Queue one message behind everything queued so far; past the hard bound, fail 4008."""
        if self._close_code is not None or self._finishing is not None:
            return
        if self.write_now is not None and self._sender_idle() and self.write_now(self._encode(message)):
            return
        if not isinstance(message, Delta | Welcome | Pong):
            self._frames.append(message)
            self._refs += 1
            if self._refs > self._max_refs:
                self.fail(CloseCode.SLOW_CONSUMER, "outbound buffer limit reached")
            else:
                self._wake()
            return
        self._queue_frame(self._encode(message))

    def push_delta(self, request_id: str, seq: int, text: str) -> None:
        """`push` of ``Delta(id=request_id, seq=seq, text=text)`` (already logged), from its fields:
        with an ``encode_delta`` no model is built (the runtime's path for every live token)."""
        encode_delta = self._encode_delta
        if encode_delta is None:
            self.push(Delta(id=request_id, seq=seq, text=text))
            return
        if self._close_code is not None or self._finishing is not None:
            return
        frame = encode_delta(request_id, seq, text)
        # `_sender_idle`, inlined: this runs once per token.
        write_now, waiter = self.write_now, self._waiter
        if (
            write_now is not None
            and waiter is not None
            and not waiter.done()
            and not self._frames
            and write_now(frame)
        ):
            return
        self._queue_frame(frame)

    def push_frame(self, frame: Frame) -> None:
        """`push` of a delta already encoded as this outbox's ``encode`` would (a cluster relay's
        feed carries them so): the same order, bounds and write-at-once."""
        if self._close_code is not None or self._finishing is not None:
            return
        if self.write_now is not None and self._sender_idle() and self.write_now(frame):
            return
        self._queue_frame(frame)

    def _queue_frame(self, frame: Frame) -> None:
        size = len(frame)
        self._frames.append((frame, size))
        self._bytes += size
        if not self.check_bound():
            self._wake()

    def push_replay(self, messages: Iterable[LoggedMessage]) -> None:
        """Queue logged messages to send again, behind what is queued; they are encoded as they are
        taken and not counted against the bounds (the log holds them anyway)."""
        if self._close_code is not None or self._finishing is not None:
            return
        run = deque(messages)
        if run:
            self._frames.append(run)
            self._replay_left += len(run)
            self._full = True
            self._wake()

    def check_bound(self, pending_bytes: int = 0) -> bool:
        """Fail 4008 when the backlog is past the hard bound; whether it failed.

        The backlog is what waits behind the message at the head of the queue, plus the
        runtime's ``pending_bytes`` (text it holds to merge), so that merging cannot grow without
        limit either. The head itself is not counted: a single message larger than the bound (a
        large embedding) cannot be split and must still go out. The most a connection holds is
        the hard bound plus one message."""
        if self._close_code is not None:
            return False
        head = self._frames[0] if self._frames else None
        head_bytes = head[1] if isinstance(head, tuple) else 0
        over = self._bytes - head_bytes + pending_bytes > self._hard
        if over:
            self.fail(CloseCode.SLOW_CONSUMER, "outbound buffer limit reached")
        return over

    def fail(self, code: CloseCode, reason: str) -> None:
        """Close now: drop everything queued (it is all in the event log) and wake the sender."""
        if self._close_code is not None:
            return
        self._close_code = code
        self._close_reason = reason
        self.dropped += sum(len(item) if isinstance(item, deque) else 1 for item in self._frames)
        self._frames.clear()
        self._replay_left = 0
        self._refs = 0
        self._bytes = 0
        self.on_room = None
        self._wake()
        self._closed()

    def finish(self, code: CloseCode, reason: str) -> None:
        """Close once everything queued so far has been taken; nothing more is queued after."""
        if self._close_code is not None or self._finishing is not None:
            return
        self._finishing = (code, reason)
        self._wake()

    # -- consumer side -----------------------------------------------------------------------

    def take_ready(self) -> Frame | None:
        """The next frame if one is queued now, else None (the sender then awaits `next_frame`)."""
        if self._close_code is not None or not self._frames:
            return None
        return self._take()

    async def next_frame(self) -> Frame | None:
        """The next frame to write, or None once the outbox is closed (see `close_code`)."""
        while True:
            if self._close_code is not None:
                return None
            if self._frames:
                return self._take()
            if self._finishing is not None:
                self._close_code, self._close_reason = self._finishing
                self._closed()
                return None
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _sender_idle(self) -> bool:
        """Whether the sender is waiting with nothing queued: a frame written now keeps the order."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._frames

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _closed(self) -> None:
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()

    def _take(self) -> Frame:
        head = self._frames[0]
        frame: Frame
        if isinstance(head, deque):
            frame = self._encode(head.popleft())
            self._replay_left -= 1
            if not head:
                self._frames.popleft()
        elif isinstance(head, tuple):
            self._frames.popleft()
            frame, size = head
            self._bytes -= size
        else:
            self._frames.popleft()
            self._refs -= 1
            frame = self._encode(head)
        self._room_check()
        return frame

    def _room_check(self) -> None:
        if self._full and not self._replay_left and self._bytes < self._soft:
            self._full = False
            if self.on_room is not None:
                self.on_room()
