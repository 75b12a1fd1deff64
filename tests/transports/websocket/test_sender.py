"""The WebSocket sender in-process: a burst goes out frame by frame without a wake-up per frame.

`Outbox.take_ready` hands over what is queued now; the send loop sends each frame as its own
ASGI message, in order (or, under a server offering the many-frames extension, all of them in one
send, and a frame pushed while the sender idles is written at once), and stops the outbox
(4008/1001 semantics stay the outbox's) when the peer is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

from protocol.close import CloseCode
from protocol.codec import encode
from protocol.messages import Delta
from server.outbox import Outbox
from server.services import Services
from server.settings import Settings
from server.transports.websocket import WebSocketConnection
from server.transports.wsframes import FRAMES_SEND


def outbox() -> Outbox:
    return Outbox(encode=encode, soft_bytes=10_000, hard_bytes=100_000)


def delta(seq: int) -> Delta:
    return Delta(id="r1", seq=seq, text=f"piece {seq}")


def test_take_ready_hands_over_what_is_queued_in_order_and_nothing_once_closed() -> None:
    box = outbox()
    assert box.take_ready() is None
    for seq in (1, 2, 3):
        box.push(delta(seq))
    assert [box.take_ready() for _ in range(4)] == [
        encode(delta(1)),
        encode(delta(2)),
        encode(delta(3)),
        None,
    ]
    assert box.queued_bytes == 0
    box.push(delta(4))
    box.fail(CloseCode.SLOW_CONSUMER, "test")
    assert box.take_ready() is None


def test_take_ready_fires_on_room_once_when_the_backlog_drops_below_the_soft_bound() -> None:
    box = Outbox(encode=encode, soft_bytes=60, hard_bytes=100_000)
    fired: list[int] = []
    box.on_room = lambda: fired.append(box.queued_bytes)
    for seq in (1, 2):
        box.push(delta(seq))
    assert not box.has_room
    box.take_ready()  # below the soft bound again: room, once
    box.take_ready()
    assert len(fired) == 1 and fired[0] < 60


class Recorder:
    def __init__(self, fail_after: int | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.fail_after = fail_after

    async def __call__(self, message: dict[str, Any]) -> None:
        if self.fail_after is not None and len(self.messages) >= self.fail_after:
            raise OSError("peer gone")
        self.messages.append(message)


def connection(send: Recorder) -> WebSocketConnection:
    services = cast(Services, SimpleNamespace(settings=Settings()))
    return WebSocketConnection(cast(Any, None), services, cast(Any, send))


async def test_a_burst_goes_out_as_one_message_per_frame_in_order() -> None:
    send, box = Recorder(), outbox()
    conn = connection(send)
    for seq in range(1, 6):
        box.push(delta(seq))
    sender = asyncio.create_task(conn._send_loop(box))
    await asyncio.sleep(0.01)
    assert [m["text"] for m in send.messages] == [encode(delta(seq)) for seq in range(1, 6)]
    assert all(m["type"] == "websocket.send" for m in send.messages)
    box.push(delta(6))  # after the burst: the sender was waiting and wakes for it
    await asyncio.sleep(0.01)
    assert send.messages[-1]["text"] == encode(delta(6))
    box.finish(CloseCode.GOING_AWAY, "done")
    await asyncio.wait_for(sender, 1)
    conn._disarm_stall()


async def test_a_peer_gone_mid_burst_fails_the_outbox_and_ends_the_sender() -> None:
    send, box = Recorder(fail_after=2), outbox()
    conn = connection(send)
    for seq in range(1, 6):
        box.push(delta(seq))
    await asyncio.wait_for(conn._send_loop(box), 1)
    assert len(send.messages) == 2
    assert box.closed and box.close_code is CloseCode.GOING_AWAY
    conn._disarm_stall()


class FramesServer:
    """A server offering the many-frames extension: records direct writes and batch sends."""

    def __init__(self) -> None:
        self.writable = True
        self.direct: list[list[str]] = []
        self.sent = Recorder()

    def write(self, frames: Sequence[str]) -> bool:
        if not self.writable:
            return False
        self.direct.append(list(frames))
        return True

    def connection(self) -> WebSocketConnection:
        services = cast(Services, SimpleNamespace(settings=Settings()))
        return WebSocketConnection(cast(Any, None), services, cast(Any, self.sent), self.write)


async def test_with_the_frames_extension_a_burst_is_one_send_and_an_idle_sender_is_bypassed() -> None:
    server, box = FramesServer(), outbox()
    conn = server.connection()
    for seq in range(1, 4):
        box.push(delta(seq))  # queued before the sender runs
    box.write_now = conn._write_one
    sender = asyncio.create_task(conn._send_loop(box))
    await asyncio.sleep(0.01)
    assert server.sent.messages == [{"type": FRAMES_SEND, "frames": [encode(delta(s)) for s in (1, 2, 3)]}]
    box.push(delta(4))  # the sender waits with nothing queued: written in this very step
    assert server.direct == [[encode(delta(4))]]
    server.writable = False  # the socket's buffer is full: queued, and the sender sends it
    box.push(delta(5))
    box.push(delta(6))
    assert box.backlog
    server.writable = True
    await asyncio.sleep(0.01)
    assert server.sent.messages[-1] == {"type": FRAMES_SEND, "frames": [encode(delta(5)), encode(delta(6))]}
    assert server.direct == [[encode(delta(4))]]
    box.finish(CloseCode.GOING_AWAY, "done")
    await asyncio.wait_for(sender, 1)
    conn._disarm_stall()


def test_write_now_is_used_only_while_the_sender_waits_with_nothing_queued() -> None:
    box, written = outbox(), []
    box.write_now = lambda frame: written.append(frame) is None
    box.push(delta(1))  # no sender waiting: queued
    assert written == [] and box.backlog
