"""sluice's wire contract, pure and sans-I/O: messages, codec, errors, session state machine.

Nothing in this package may import asyncio, fastapi, starlette, httpx, torch or any other I/O or
model library (tests/protocol/test_purity.py enforces it).
"""
