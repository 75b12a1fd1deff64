"""The server the reliability checks run against: ``sluice serve`` on loopback, tuned for them.

`RELIABILITY_ENV`: Ollama is the emulator (deterministic text, fault models), local generation is
off, messages are limited to 4 KiB and frames to 64 KiB (so oversize input is cheap to send),
and the outbound buffer bounds are small. `FAULT_ENV` adds short Ollama first-token and idle
timeouts (so a hung upstream fails fast); it is kept apart because on a loaded machine a healthy
emulator can be starved for that long, which must not fail a soak that is about resuming.
`start_reliability_server` starts one (``sluice serve``); `sse_available` says whether the SSE
session endpoints answer (the SSE checks skip, saying so, on a server without them). Test
support only.
"""

from __future__ import annotations

import httpx

from tests.support.server import ServerProcess, start_server

__all__ = [
    "FAULT_ENV",
    "MAX_FRAME_BYTES",
    "MAX_MESSAGE_BYTES",
    "OLLAMA_TIMEOUT_S",
    "RELIABILITY_ENV",
    "sse_available",
    "start_reliability_server",
]

MAX_MESSAGE_BYTES = 4096
MAX_FRAME_BYTES = 65536
OLLAMA_TIMEOUT_S = 1.5
RELIABILITY_ENV = {
    "SLUICE_LOAD_LOCAL_GENERATION": "false",
    "SLUICE_DEFAULT_MODEL": "llama3.2:1b",
    "SLUICE_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
    "SLUICE_MAX_FRAME_BYTES": str(MAX_FRAME_BYTES),
    # Small outbound bounds: a client that lags behind gets merged deltas sooner, and one that
    # stops reading is cut (4008, or after 8 s of a blocked write) well within a test. The hard
    # bound stays far above a burst of embedding results from one micro-batch, which a client
    # reading at full speed still receives at once (past the bound it would be cut 4008).
    "SLUICE_OUTBOUND_SOFT_BYTES": "4096",
    "SLUICE_OUTBOUND_HARD_BYTES": str(1024 * 1024),
    "SLUICE_OUTBOUND_STALL_S": "8",
    "SLUICE_SOCKET_SEND_BUFFER_BYTES": "32768",
    "SLUICE_LOG_LEVEL": "warning",
}
FAULT_ENV = RELIABILITY_ENV | {
    "SLUICE_OLLAMA_FIRST_TOKEN_TIMEOUT_S": str(OLLAMA_TIMEOUT_S),
    "SLUICE_OLLAMA_IDLE_TIMEOUT_S": str(OLLAMA_TIMEOUT_S),
}


def start_reliability_server(env: dict[str, str], *, base: dict[str, str] = RELIABILITY_ENV) -> ServerProcess:
    """A ready server with ``base`` (`RELIABILITY_ENV` or `FAULT_ENV`) plus ``env``; the caller stops it."""
    return start_server(base | env)


def sse_available(base_url: str) -> bool:
    """Whether ``POST /v1/sessions`` exists on the server (the SSE transport is installed)."""
    response = httpx.post(f"{base_url}/v1/sessions", json={}, timeout=10)
    return response.status_code == 201
