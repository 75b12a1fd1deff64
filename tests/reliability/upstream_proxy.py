"""A TCP proxy between sluice and its Ollama that can kill one upstream connection mid-stream.

``with start_proxy(emu.url) as proxy:`` listens on 127.0.0.1 (its own loop in a background
thread) and forwards every connection to the target. `UpstreamProxy.kill` resets (RST, both
sides) each connection whose current request contains a marker — say, a unique prompt — which is
what sluice sees when an Ollama runner dies in the middle of one stream while the others go on.
It tracks only the bytes of the newest request on each connection (a pooled keep-alive
connection that carried the marker earlier is not killed for it). Test support, loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tests.reliability.links import reset

__all__ = ["UpstreamProxy", "start_proxy"]

_REQUEST_STARTS = (b"POST ", b"GET ", b"HEAD ", b"PUT ", b"DELETE ")
_MAX_TRACKED = 256 * 1024


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    request: bytearray = field(default_factory=bytearray)


class UpstreamProxy:
    def __init__(self, target_url: str) -> None:
        target = urlsplit(target_url)
        self._target = (target.hostname or "127.0.0.1", target.port or 80)
        self._pairs: set[_Pair] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self.killed = 0
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="upstream-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._server is None:
            raise RuntimeError("the proxy did not start")
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            reset(writer.transport)
            return
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, pair),
                self._pipe(up_reader, writer, None),
                return_exceptions=True,
            )
        finally:
            self._pairs.discard(pair)
            for side in (writer, up_writer):
                side.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, track: _Pair | None) -> None:
        while data := await reader.read(65536):
            if track is not None:
                if data.startswith(_REQUEST_STARTS):
                    track.request.clear()
                if len(track.request) < _MAX_TRACKED:
                    track.request += data
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    def kill(self, marker: bytes) -> int:
        """Reset every connection whose current request contains ``marker``; how many."""

        def kill_now() -> int:
            doomed = [pair for pair in self._pairs if marker in pair.request]
            for pair in doomed:
                reset(pair.upstream.transport)
                reset(pair.client.transport)
            return len(doomed)

        async def run() -> int:
            return kill_now()

        killed = asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)
        self.killed += killed
        return killed

    def stop(self) -> None:
        if self._loop.is_closed():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for pair in list(self._pairs):
                reset(pair.client.transport)
                reset(pair.upstream.transport)
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@contextlib.contextmanager
def start_proxy(target_url: str) -> Iterator[UpstreamProxy]:
    proxy = UpstreamProxy(target_url)
    try:
        yield proxy
    finally:
        proxy.stop()
