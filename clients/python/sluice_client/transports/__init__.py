"""Interchangeable ways to carry a session's messages: WebSocket (`websocket`) and SSE + POST (`sse`).

Each module offers one ``open_*`` function that performs the handshake (``hello`` → ``welcome``)
and returns a `Transport` (`base`); `select` picks between them. A transport is thin: it encodes,
sends, receives and decodes, and translates its library's exceptions into `TransportClosed` in
one place. It never retries, resends or tracks seq: that is `sluice_client.connection`.
"""

__all__ = ["base", "select", "sse", "websocket"]
