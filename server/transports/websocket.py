"""The WebSocket transport, ``GET /v1/ws``: one session per connection, one message per text frame.

A thin loop, as STYLE.md asks: receive text → `protocol.codec.decode` → `SessionRuntime.handle`
(which consults the pure session and starts or cancels work through the dispatcher); the
runtime's events reach the socket through the connection's `Outbox`, drained by a sender task
that encodes nothing itself. Reading never waits on writing, so a client that stops reading can
still cancel, and one that never reads is closed 4008 once the outbox's hard bound is passed or
a write is stuck for ``outbound_stall_s``.

The sender is the hot path (once per token). Under a server that offers the
`server.transports.wsframes.FRAMES` extension (sluice's own uvicorn protocol) the outbox writes a
frame straight to the socket while the sender is idle (`Outbox.write_now`: no wake-up of the
sender per token), and a woken sender hands every frame already queued to one ``send``, each its
own text frame, written together. Elsewhere it sends every frame already queued, each as its own
``websocket.send``, before it waits again. Either way data frames go to the ASGI ``send`` itself
(starlette's ``WebSocket.send`` only re-checks, per frame, a state that cannot change while the
session is live; the handshake and the close still go through it).

Before the handshake completes, `server.admission.admit` checks the drain state (closed
1012), the Origin and an ``Authorization`` header or ``?ticket=`` (closed 1008). Without either,
and with auth on, the first message must be a ``hello`` carrying ``token``. The first message decides the session: a
``hello`` may resume one (``session``, ``last_seq``), anything else opens a new one implicitly
and is then handled as usual; ``welcome`` is always the first frame the client gets.

Liveness: uvicorn sends WebSocket pings every ``ws_ping_interval_s`` and closes a peer that does
not answer within ``ws_ping_timeout_s``; the reader then sees the disconnect and the session is
detached (it lives on for ``session_ttl_s``). Frames past ``max_frame_bytes`` are closed 1009 by
uvicorn itself. This module must never let a client-caused exception escape or stall the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from protocol.close import CloseCode
from protocol.codec import decode, encode, encode_delta
from protocol.errors import ErrorCode, SluiceError
from protocol.messages import ClientMessage, Hello
from server.admission import Admission, admit
from server.outbox import Frame, Outbox
from server.seam import SessionHandle
from server.services import Services, services_of
from server.transports.wsframes import FRAMES, FRAMES_SEND

__all__ = ["SUBPROTOCOL", "SessionSocket", "WebSocketConnection", "session_socket"]

log = logging.getLogger("sluice.ws")

SUBPROTOCOL = "sluice.v1"
# How long an unauthenticated connection may wait before sending its hello.
AUTH_TIMEOUT_S = 10.0
# At least this long to get a close frame past a peer that reads slowly.
_MIN_CLOSE_WAIT_S = 5.0
_BINARY = SluiceError(ErrorCode.INVALID_MESSAGE, "binary frames are not supported: send JSON in text frames")


class SessionSocket:
    """The ASGI app of ``GET /v1/ws``.

    Mounted as a plain ASGI route (``WebSocketRoute("/v1/ws", session_socket)``) rather
    than a FastAPI endpoint: the per-connection layers of a FastAPI route (dependency solving, an
    exit stack) would stay alive as long as the socket, a few KiB per idle session."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        frames = scope.get("extensions", {}).get(FRAMES)
        write_frames = frames.get("write") if isinstance(frames, dict) else None
        write_one = frames.get("write_one") if isinstance(frames, dict) else None
        await WebSocketConnection(websocket, services_of(websocket), send, write_frames, write_one).serve()


session_socket = SessionSocket()


class _Disconnected(Exception):
    """The peer went away."""


class WebSocketConnection:
    """One client connection, from handshake to close."""

    def __init__(
        self,
        websocket: WebSocket,
        services: Services,
        send: Send | None = None,
        write_frames: Callable[[Sequence[str]], bool] | None = None,
        write_one: Callable[[Frame], bool] | None = None,
    ) -> None:
        self._ws = websocket
        # The ASGI send of this connection, for data frames (see the module docstring).
        self._asgi_send = send
        self._services = services
        self._settings = services.settings
        self._loop = asyncio.get_running_loop()
        self._send_started: float | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stopping_read = False
        # The server's many-frames write (`FRAMES`), when it offers one (then `send` is its send).
        self._write_frames = write_frames if send is not None else None
        # Its one-frame form (`Outbox.write_now` itself: no wrapper per token), when it has one.
        self._write_now = (write_one or self._write_one) if self._write_frames is not None else None

    async def serve(self) -> None:
        ws, services = self._ws, self._services
        offered = ws.scope.get("subprotocols") or ()
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        try:
            admission = admit(ws, services)
        except SluiceError as exc:
            await self._refuse(subprotocol, _refusal_code(exc), exc.code.value)
            return
        await ws.accept(subprotocol=subprotocol)
        services.metrics.connection_opened("websocket")
        try:
            await self._session(admission)
        except _Disconnected:
            pass
        except Exception:
            log.exception("websocket connection failed")
            await self._close(CloseCode.INTERNAL, "internal error")
        finally:
            services.metrics.connection_closed("websocket")

    # -- opening the session -----------------------------------------------------------------

    async def _session(self, admission: Admission) -> None:
        services = self._services
        try:
            async with asyncio.timeout(None if admission.verified else AUTH_TIMEOUT_S):
                first = await self._next_message()
        except TimeoutError:
            await self._close(CloseCode.POLICY, "unauthorized")
            return
        hello = first if isinstance(first, Hello) else None
        resume = hello.session if hello is not None else None
        outbox = Outbox(
            encode=encode,
            encode_delta=encode_delta,
            soft_bytes=self._settings.outbound_soft_bytes,
            hard_bytes=self._settings.outbound_hard_bytes,
            max_refs=self._settings.replay_events,
            hold_s=self._settings.delta_hold_s,
        )
        try:
            key_id = admission.key_for(session=resume, token=hello.token if hello is not None else None)
            connected = await services.sessions.connect(
                outbox,
                key_id=key_id,
                welcome=services.welcome,
                resume=resume,
                last_seq=hello.last_seq if hello is not None else None,
            )
        except SluiceError as exc:  # bad credentials, too many sessions, no session store
            await self._close(_refusal_code(exc), exc.code.value)
            return
        runtime = connected.runtime
        if hello is None:
            self._feed(runtime, first)
        del first, hello  # this frame lives as long as the socket: keep it small
        await self._pump(runtime, outbox)

    # -- the two loops -----------------------------------------------------------------------

    async def _pump(self, runtime: SessionHandle, outbox: Outbox) -> None:
        """Read in this task, write in another, until either side ends.

        Two tasks per connection and no more (idle sessions must stay small): when the outbox
        closes (slow consumer, takeover, drain) or the sender fails, the sender's end cancels
        this task's read, which is then told apart from a cancellation from outside."""
        reading = asyncio.current_task()
        assert reading is not None
        sender = asyncio.create_task(self._send_loop(outbox))

        def stop_reading(_: object = None) -> None:
            if not self._stopping_read:
                self._stopping_read = True
                reading.cancel()

        def stop_sending() -> None:  # a sender stuck writing to a silent peer stops too
            sender.cancel()

        sender.add_done_callback(stop_reading)
        outbox.on_close = stop_sending
        outbox.write_now = self._write_now
        peer_left = False
        try:
            peer_left = await self._read_loop(runtime)
        except asyncio.CancelledError:
            if not self._stopping_read or reading.uncancel() > 0:
                raise  # cancelled from outside (server shutdown): not ours to swallow
        finally:
            # From here on the session's events go to its log only (or to a newer connection).
            runtime.detach(outbox)
            outbox.write_now = None
            self._stopping_read = True  # the sender's end must not cancel the close below
            sender.remove_done_callback(stop_reading)
            self._disarm_stall()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        if not sender.cancelled() and sender.exception() is not None:
            log.error("websocket sender failed", exc_info=sender.exception(), extra={"session": runtime.id})
            outbox.fail(CloseCode.INTERNAL, "internal error")
        if peer_left:
            return  # nothing left to close
        if not outbox.closed:
            outbox.fail(CloseCode.GOING_AWAY, "connection ended")
        code = outbox.close_code or CloseCode.GOING_AWAY
        if code is CloseCode.SLOW_CONSUMER:
            self._services.metrics.outbound_close_slow()
            log.info("closing a slow consumer", extra={"session": runtime.id})
        await self._close(code, outbox.close_reason)

    async def _read_loop(self, runtime: SessionHandle) -> bool:
        """Feed the runtime until the peer goes away (True)."""
        while True:
            try:
                item = await self._next_message()
            except _Disconnected:
                return True
            self._feed(runtime, item)

    async def _send_loop(self, outbox: Outbox) -> None:
        loop = self._loop
        send = self._send if self._write_frames is None else self._send_batch
        frame: Frame | None
        while (frame := await outbox.next_frame()) is not None:
            if self._stall_timer is None:
                self._arm_stall(outbox, self._settings.outbound_stall_s)
            try:
                # Everything queued now goes out before the next wait: no wake-up per frame.
                while frame is not None:
                    self._send_started = loop.time()
                    frame = await send(frame, outbox)
            except (WebSocketDisconnect, OSError, RuntimeError):
                outbox.fail(CloseCode.GOING_AWAY, "connection lost")
                return
            self._send_started = None

    def _write_one(self, frame: Frame) -> bool:
        """`Outbox.write_now`: ``frame`` written at once when the socket takes it without waiting."""
        assert self._write_frames is not None
        return isinstance(frame, str) and self._write_frames((frame,))

    async def _send_batch(self, frame: Frame, outbox: Outbox) -> Frame | None:
        """Send ``frame`` and every text frame queued behind it in one write; the next frame
        left (a binary one), or None."""
        assert self._asgi_send is not None
        if not isinstance(frame, str):
            await self._ws.send_bytes(frame)
            return outbox.take_ready()
        frames = [frame]
        following = outbox.take_ready()
        while isinstance(following, str):
            frames.append(following)
            following = outbox.take_ready()
        await self._asgi_send({"type": FRAMES_SEND, "frames": frames})
        return following

    async def _send(self, frame: Frame, outbox: Outbox) -> Frame | None:
        """Send ``frame`` as its own message; the next frame queued, or None."""
        send = self._asgi_send
        if send is not None and isinstance(frame, str):
            # uvicorn raises ClientDisconnected (an OSError) once the peer is gone.
            await send({"type": "websocket.send", "text": frame})
        elif isinstance(frame, str):
            await self._ws.send_text(frame)
        else:
            await self._ws.send_bytes(frame)
        return outbox.take_ready()

    # -- stall watchdog: one timer per stall period while sending, none while idle ------------

    def _arm_stall(self, outbox: Outbox, delay: float) -> None:
        self._stall_timer = self._loop.call_later(delay, self._check_stall, outbox)

    def _check_stall(self, outbox: Outbox) -> None:
        self._stall_timer = None
        started = self._send_started
        if started is None or outbox.closed:
            return
        stuck_for = self._loop.time() - started
        limit = self._settings.outbound_stall_s
        if stuck_for >= limit:
            outbox.fail(CloseCode.SLOW_CONSUMER, "client stopped reading")
        else:
            self._arm_stall(outbox, limit - stuck_for)

    def _disarm_stall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    # -- frames in ---------------------------------------------------------------------------

    async def _next_message(self) -> ClientMessage | SluiceError:
        """The next client message, or the error its frame deserves; raises `_Disconnected`."""
        message = await self._ws.receive()
        if message["type"] == "websocket.disconnect":
            raise _Disconnected
        text = message.get("text")
        if text is None:
            return _BINARY
        try:
            return decode(text, max_bytes=self._settings.max_message_bytes)
        except SluiceError as exc:
            return exc

    @staticmethod
    def _feed(runtime: SessionHandle, item: ClientMessage | SluiceError) -> None:
        if isinstance(item, SluiceError):
            runtime.refuse(item)
        else:
            runtime.handle(item)

    # -- closing -----------------------------------------------------------------------------

    async def _refuse(self, subprotocol: str | None, code: CloseCode, reason: str) -> None:
        """Complete the handshake only to close with ``code``, so browsers see why (a refused
        handshake reaches page scripts as a bare 1006)."""
        await self._ws.accept(subprotocol=subprotocol)
        await self._close(code, reason)

    async def _close(self, code: CloseCode, reason: str) -> None:
        wait = max(self._settings.outbound_stall_s, _MIN_CLOSE_WAIT_S)
        # A peer that does not read cannot take the close frame either: give up after a while
        # (uvicorn then closes the transport).
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError, TimeoutError):
            async with asyncio.timeout(wait):
                await self._ws.close(code=int(code), reason=reason[:120])


def _refusal_code(error: SluiceError) -> CloseCode:
    """How a refused connection closes: 1012 (go elsewhere, retry) while draining or while the
    session store is unreachable (cluster mode), else 1008."""
    retry = error.code in (ErrorCode.SHUTTING_DOWN, ErrorCode.UPSTREAM_UNAVAILABLE)
    return CloseCode.SERVICE_RESTART if retry else CloseCode.POLICY
