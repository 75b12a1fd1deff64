"""sluice's wire contract, pure and sans-I/O: messages, codec, errors, session state machine.

Nothing in this package may import asyncio, fastapi, starlette, httpx, torch or any other I/O or
model library (tests/protocol/test_purity.py enforces it). Import the modules themselves
(``from protocol.session import Session``); this package object re-exports nothing.
"""

__all__ = [
    "close",
    "codec",
    "conversation",
    "errors",
    "eventlog",
    "lifecycle",
    "messages",
    "schema",
    "session",
    "sse",
    "tools",
]
