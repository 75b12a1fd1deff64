"""uvicorn's httptools HTTP protocol with one extension: a streamed body's chunk written now.

`BodyProtocol` is uvicorn's `HttpToolsProtocol` (``http=`` takes the class) plus the ASGI
extension `BODY_WRITE`, advertised in each request's ``scope["extensions"]``:
``scope["extensions"][BODY_WRITE]["write"](data)`` writes ``data`` as the next chunk of the
response body (chunked transfer encoding, as ``http.response.body`` with ``more_body`` would)
without awaiting, when the response can take it at once: its start sent, chunked, not complete,
the client connected and the transport's write buffer below its high-water mark. It returns True
then; otherwise it writes nothing and returns False, and the caller falls back to the awaiting
``send``. This lets the code that produced a relayed token write it in the same step (from the
upstream read callback) instead of waking the response's task once per token.

The caller must never have an ``http.response.body`` send of its own under way when it writes
(the bytes would cross). An application that finds no `BODY_WRITE` in the scope (another server)
uses ``send``. This module must never change a body's bytes or order, nor read or write anything
of uvicorn's beyond the attributes its own ``send`` reads.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

__all__ = ["BODY_WRITE", "BodyProtocol", "write_chunk"]

BODY_WRITE = "sluice.http.body_write"


def write_chunk(cycle: RequestResponseCycle, data: bytes) -> bool:
    """Write ``data`` as the next body chunk of ``cycle``'s response now; False (nothing written)
    when it cannot be written without waiting or not as a chunk."""
    if (
        cycle.disconnected
        or not cycle.response_started
        or cycle.response_complete
        or not cycle.chunked_encoding
        or cycle.flow.write_paused
        or cycle.transport.is_closing()
        or not data
    ):
        return False
    cycle.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
    return True


class BodyProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the `BODY_WRITE` extension (module docstring)."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None:
            # The request's task is created but has not run yet: it sees the extension.
            extensions: dict[str, Any] = cycle.scope.setdefault("extensions", {})
            extensions[BODY_WRITE] = {"write": lambda data: write_chunk(cycle, data)}
