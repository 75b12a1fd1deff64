"""A TCP proxy on loopback that can cut every connection through it, or refuse WebSocket upgrades.

Put it between the client and a real server to do to the server's sockets what a flaky network
does: `kill` aborts both ends of every open connection at once (a reset, no close frame), so the
server sees its socket die mid-stream and the client must reconnect and resume. With
``block_websocket`` it answers any WebSocket upgrade with ``403`` and passes everything else
through, like a corporate proxy that forces the SSE fallback. Runs its own loop on a thread.
Test support only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

__all__ = ["TcpProxy"]


class TcpProxy:
    def __init__(self, target_port: int, *, block_websocket: bool = False) -> None:
        self.target_port = target_port
        self.block_websocket = block_websocket
        self.connections = 0
        self.kills = 0
        self.refused_upgrades = 0
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def kill(self) -> int:
        """Abort every open connection (both sides); returns how many were cut."""
        return asyncio.run_coroutine_threadsafe(self._kill(), self._loop).result(10)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        await self._kill()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        # The connections are cut: their pipes end by themselves; cancel only what is stuck.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if others:
            _, stuck = await asyncio.wait(others, timeout=2)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)

    async def _kill(self) -> int:
        pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            client.transport.abort()
            upstream.transport.abort()
        self.kills += len(pairs)
        return len(pairs)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.transport.abort()
            return
        if self.block_websocket and b"upgrade: websocket" in head.lower():
            self.refused_upgrades += 1
            writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.append(pair)
        up_writer.write(head)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        with contextlib.suppress(ValueError):
            self._pairs.remove(pair)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
