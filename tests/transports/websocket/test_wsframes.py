"""The many-frames extension of sluice's uvicorn WebSocket protocol, from both sides.

Pure: `text_frame` writes byte for byte what ``websockets`` writes for a server's text frame.
Outside: a real uvicorn on loopback running `FramesProtocol` under a small ASGI app, and the real
``websockets`` client: frames written at once (one by one, through ``write_one``, or several),
frames sent as one batch and plain ``websocket.send`` messages arrive as separate messages, in
order; the extension is advertised in the scope; ``write_one`` refuses a binary frame; a write
after the close is refused.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvicorn
from websockets.asyncio.client import connect
from websockets.protocol import State
from websockets.server import ServerProtocol

from server.transports.wsframes import FRAMES, FRAMES_SEND, FramesProtocol, text_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000])
def test_text_frame_is_what_websockets_writes(size: int) -> None:
    payload = ("é" * size).encode()[:size]
    reference = ServerProtocol()
    reference.state = State.OPEN
    reference.send_text(payload)
    assert text_frame(payload) == b"".join(reference.data_to_send())


async def test_frames_written_at_once_and_in_batches_arrive_as_separate_messages_in_order() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        write = scope["extensions"][FRAMES]["write"]
        write_one = scope["extensions"][FRAMES]["write_one"]
        seen["single"] = write(["zero"])  # one token's frame: the path without a join
        seen["one"] = (write_one("zero+"), write_one("é" * 100), write_one(b"binary"))
        seen["direct"] = write(["one", "two"])
        await send({"type": FRAMES_SEND, "frames": ["three", "four", "é" * 200]})
        await send({"type": "websocket.send", "text": "five"})
        await send({"type": "websocket.close", "code": 1000})
        seen["after_close"] = (write(["six"]), write_one("six"))
        await receive()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        app, ws=FramesProtocol, log_config=None, lifespan="off", ws_per_message_deflate=False
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.01)
        async with connect(f"ws://127.0.0.1:{port}/", compression=None) as ws:
            got = [await asyncio.wait_for(ws.recv(), 5) for _ in range(9)]
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
    assert got == ["zero", "zero+", "é" * 100, "one", "two", "three", "four", "é" * 200, "five"]
    assert seen == {
        "single": True,
        "one": (True, True, False),
        "direct": True,
        "after_close": (False, False),
    }
