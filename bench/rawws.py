"""A minimal WebSocket client (RFC 6455) on asyncio streams, a load generator like `bench.rawhttp`.

Why not the `websockets` client: on a 2-core machine the reader shares the CPU with the server it
measures, and `websockets` spends about twice the CPU per message of `bench.rawhttp`'s SSE reader,
so a one-stream comparison of the two transports measured the readers. This one costs what the SSE
reader costs: text frames out (masked, as a client must), frames in, parsed from a buffer; a ping
is answered with a pong; a close frame ends the stream. No extensions (sluice negotiates none), no
compression, no validation beyond what a benchmark needs. Never use it outside the benchmarks.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct

__all__ = ["WsClosed", "WsConnection"]

_TEXT, _BINARY, _CLOSE, _PING, _PONG, _CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


class WsClosed(ConnectionError):
    """The server closed the WebSocket (its close code), or the connection ended."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"websocket closed ({code})")
        self.code = code


class WsConnection:
    """One client WebSocket to 127.0.0.1:port; `open()`, `send(text)`, `recv()` -> text, `close()`."""

    def __init__(self, port: int, path: str, subprotocol: str | None = None, host: str = "127.0.0.1") -> None:
        self.host, self.port, self.path, self.subprotocol = host, port, path, subprotocol
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buffer = b""
        self._pos = 0  # where the next frame starts in _buffer (no copy per frame)
        self._fragments: list[bytes] = []

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if self.subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {self.subprotocol}")
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"101":
            raise WsClosed(int(status))

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
        return head + mask + masked

    async def send(self, text: str) -> None:
        assert self._writer is not None, "open() first"
        self._writer.write(self._frame(_TEXT, text.encode()))

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        """One whole frame off the buffer, or None when more bytes are needed."""
        buffer, pos = self._buffer, self._pos
        have = len(buffer) - pos
        if have < 2:
            return None
        first, second = buffer[pos], buffer[pos + 1]
        length, offset = second & 0x7F, 2
        if length == 126:
            if have < 4:
                return None
            length, offset = struct.unpack_from("!H", buffer, pos + 2)[0], 4
        elif length == 127:
            if have < 10:
                return None
            length, offset = struct.unpack_from("!Q", buffer, pos + 2)[0], 10
        if second & 0x80:
            raise WsClosed(1002)  # a server must not mask its frames
        if have < offset + length:
            return None
        self._pos = pos + offset + length
        return bool(first & 0x80), first & 0x0F, buffer[pos + offset : self._pos]

    async def recv(self) -> str:
        """The next text message; raises WsClosed when the server closes or the connection ends."""
        assert self._reader is not None and self._writer is not None, "open() first"
        while True:
            frame = self._next_frame()
            if frame is None:
                chunk = await self._reader.read(1 << 18)
                if not chunk:
                    raise WsClosed(None)
                self._buffer, self._pos = self._buffer[self._pos :] + chunk, 0
                continue
            fin, opcode, payload = frame
            if opcode == _PING:
                self._writer.write(self._frame(_PONG, payload))
            elif opcode == _CLOSE:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else None
                raise WsClosed(code)
            elif opcode in (_TEXT, _BINARY, _CONTINUATION):
                self._fragments.append(payload)
                if fin:
                    message, self._fragments = b"".join(self._fragments), []
                    return message.decode()

    async def close(self) -> None:
        if self._writer is None:
            return
        try:
            self._writer.write(self._frame(_CLOSE, struct.pack("!H", 1000)))
            self._writer.close()
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        self._reader = self._writer = None
