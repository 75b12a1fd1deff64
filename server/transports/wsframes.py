"""uvicorn's WebSocket protocol with one extension: many text frames in one socket write.

`FramesProtocol` is uvicorn's websockets-sansio implementation (``ws=`` takes the class) plus the
ASGI extension `FRAMES`, advertised in ``scope["extensions"]``. Through plain ASGI every
``websocket.send`` is one frame and one ``transport.write``: a syscall per token per connection.
With the extension the application may hand over several frames at once, each still its own
text frame (never two messages merged into one), framed by the same ``websockets`` protocol
object that frames everything else on the connection and written with one ``transport.write``:

- ``await send({"type": FRAMES_SEND, "frames": [text, ...]})`` waits, like ``websocket.send``,
  until the transport takes writes, then writes them all; it raises uvicorn's
  ``ClientDisconnected`` once the peer is gone, as ``websocket.send`` does;
- ``scope["extensions"][FRAMES]["write"](frames)`` writes them now, without awaiting, when the
  connection can take them at once (open, not closing, its write buffer below the high-water
  mark) and returns True; otherwise it writes nothing and returns False, and the caller falls
  back to the awaiting send. This lets the runtime that produced a token write it in the same
  step, instead of waking the connection's sender task once per token;
- ``scope["extensions"][FRAMES]["write_one"](frame)`` is ``write`` of one frame (a token's, the
  hot path: no sequence built), False without writing for anything but a ``str``.

Without extensions negotiated (sluice turns permessage-deflate off) a server's text frame is a
two-to-ten-byte header and the payload (RFC 6455 §5.2: FIN, opcode 1, no mask), which `text_frame`
writes itself, byte for byte what ``websockets`` writes, at a quarter of its cost per frame;
with an extension, every frame goes through the ``websockets`` protocol object.

An application that finds no `FRAMES` in the scope (another server) uses ``websocket.send``.
This module must never change the frames' bytes or order, nor read or write anything of uvicorn's
or websockets' beyond their public attributes and methods.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.http11 import Request
from websockets.protocol import State

__all__ = ["FRAMES", "FRAMES_SEND", "FramesProtocol", "text_frame"]

FRAMES = "sluice.websocket.frames"
FRAMES_SEND = "sluice.websocket.send_frames"

_FIN_TEXT = 0x81
_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")


# The two-byte headers of the frames with a payload under 126 bytes (most tokens' frames).
_HEAD_SHORT = tuple(bytes((_FIN_TEXT, size)) for size in range(126))


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame carrying ``payload`` (UTF-8), with no extension."""
    size = len(payload)
    if size < 126:
        return _HEAD_SHORT[size] + payload
    if size < 1 << 16:
        return _HEAD_16.pack(_FIN_TEXT, 126, size) + payload
    return _HEAD_64.pack(_FIN_TEXT, 127, size) + payload


class FramesProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with the `FRAMES` extension (module docstring)."""

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:
            # The application's task is created but has not run yet: it sees the extension.
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[FRAMES] = {"write": self.write_frames, "write_one": self.write_one}

    def _can_write(self) -> bool:
        """Whether a frame written now goes out without waiting (module docstring)."""
        return not (
            self.disconnected
            or self.close_sent
            or not self.handshake_complete
            or self.initial_response is not None
            or not self.writable.is_set()
            or self.conn.state is not State.OPEN
            or self.transport.is_closing()
        )

    def write_one(self, frame: str | bytes) -> bool:
        """`write_frames` of the one text frame ``frame`` (once per token: the same checks and bytes,
        no sequence built); False, writing nothing, for a binary frame."""
        if type(frame) is not str or not self._can_write():
            return False
        conn = self.conn
        if conn.extensions or conn.writes:
            return self.write_frames((frame,))
        payload = frame.encode()
        size = len(payload)
        self.transport.write(_HEAD_SHORT[size] + payload if size < 126 else text_frame(payload))
        return True

    def write_frames(self, frames: Sequence[str]) -> bool:
        """Write ``frames`` now, one text frame each, in one ``transport.write``; False (nothing
        written) when the connection cannot take them without waiting."""
        if not self._can_write():
            return False
        conn = self.conn
        if conn.extensions:
            try:
                for frame in frames:
                    conn.send_text(frame.encode())
            except InvalidState:
                return False
            self.transport.write(b"".join(conn.data_to_send()))
            return True
        # Whatever the protocol object still holds to send goes first (normally nothing).
        pending = conn.data_to_send()
        if not pending and len(frames) == 1:  # one token's frame: no list, no join
            self.transport.write(text_frame(frames[0].encode()))
            return True
        pending.extend(text_frame(frame.encode()) for frame in frames)
        self.transport.write(b"".join(pending))
        return True

    async def send(self, message: Any) -> None:
        if message["type"] != FRAMES_SEND:
            await super().send(message)
            return
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        if not self.handshake_complete or self.initial_response is not None:
            raise RuntimeError(f"{FRAMES_SEND!r} before the WebSocket was accepted")
        if self.close_sent:
            raise RuntimeError(f"Unexpected ASGI message {FRAMES_SEND!r}, after sending 'websocket.close'.")
        if not self.write_frames(message["frames"]):
            raise ClientDisconnected()
