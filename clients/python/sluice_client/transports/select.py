"""Which transport to open: the caller's choice, or WebSocket first and SSE when it cannot be opened.

`Endpoints` derives both addresses from the one URL a user gives (``http://host:8000``,
``ws://host:8000/v1/ws``, or a server mounted under a path). `Opener` opens a transport for a
``hello``; in ``"auto"`` mode it falls back to SSE only when the server answered the WebSocket
upgrade with something other than a WebSocket (a proxy that blocks it, a 404), not when the server
is unreachable, and then stays on SSE for the rest of the session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx

from protocol.errors import SluiceError
from protocol.messages import Hello
from sluice_client.errors import TransportClosed
from sluice_client.transports.base import Transport
from sluice_client.transports.sse import open_sse
from sluice_client.transports.websocket import open_websocket

__all__ = ["Endpoints", "Opener", "TransportChoice"]

TransportChoice = Literal["auto", "websocket", "sse"]
_WS_PATH = "/v1/ws"


@dataclass(frozen=True, slots=True)
class Endpoints:
    websocket: str  # ws(s)://host[:port][/prefix]/v1/ws
    http: str  # http(s)://host[:port][/prefix], no trailing slash

    @classmethod
    def from_url(cls, url: str) -> Endpoints:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        secure = parts.scheme in ("https", "wss")
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
            raise ValueError(f"not a sluice server URL: {url!r} (expected http(s):// or ws(s)://host:port)")
        prefix = parts.path.rstrip("/").removesuffix(_WS_PATH).rstrip("/")
        http = urlunsplit(("https" if secure else "http", parts.netloc, prefix, "", ""))
        ws = urlunsplit(("wss" if secure else "ws", parts.netloc, prefix + _WS_PATH, parts.query, ""))
        return cls(websocket=ws, http=http)


class Opener:
    """Opens a transport for a ``hello``; raises `TransportClosed` when none could be opened."""

    def __init__(
        self,
        endpoints: Endpoints,
        http: httpx.AsyncClient,
        *,
        choice: TransportChoice = "auto",
        token: str | None = None,
        open_timeout: float = 10.0,
    ) -> None:
        self.endpoints = endpoints
        self.choice = choice
        self._http = http
        self._token = token
        self._open_timeout = open_timeout
        self._fell_back = False

    async def __call__(self, hello: Hello) -> Transport:
        if self.choice == "sse" or self._fell_back:
            return await open_sse(self._http, self.endpoints.http, hello)
        try:
            return await open_websocket(
                self.endpoints.websocket, hello, token=self._token, open_timeout=self._open_timeout
            )
        except TransportClosed as ws_failure:
            if self.choice == "websocket" or not ws_failure.fallback:
                raise
            try:
                transport = await open_sse(self._http, self.endpoints.http, hello)
            except TransportClosed as sse_failure:
                raise _both_failed(ws_failure, sse_failure) from None
            self._fell_back = True
            return transport


def _both_failed(ws: TransportClosed, sse: TransportClosed) -> TransportClosed:
    # A refusal on the fallback (a bad key) says more than the WebSocket's failure did.
    error = SluiceError(
        sse.error.code if sse.fatal else ws.error.code,
        f"WebSocket: {ws.error.message}; SSE fallback: {sse.error.message}",
        retryable=ws.error.retryable and sse.error.retryable,
        retry_after_ms=ws.error.retry_after_ms or sse.error.retry_after_ms,
    )
    return TransportClosed(error, fatal=ws.fatal or sse.fatal)
