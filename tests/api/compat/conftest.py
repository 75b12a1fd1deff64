"""What the compatible APIs' tool and structured-output tests share: the emulator with its reply
settings restored after each test, and the body of the last request it received; and the
environment of a cluster node on the emulator (`cluster_env`), and a cluster whose node ``b``
outlives the nodes a test stops (`reading_cluster`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.ollama_emulator import Emulator, start_emulator
from tests.support.redis_server import RedisServer, run_redis
from tests.support.server import ServerProcess, start_server

Cluster = tuple[RedisServer, Emulator, ServerProcess]


@pytest.fixture
def replies(emulator: Emulator) -> Iterator[Emulator]:
    """The emulator, its records cleared, its tool-call settings restored after the test."""
    before = emulator.config
    emulator.reset()
    yield emulator
    emulator.configure(
        tool_calls=before.tool_calls,
        text_before_calls=before.text_before_calls,
        reply_fault=before.reply_fault,
    )


def text_response_events(deltas: int) -> list[str]:
    """The event types of a streamed Responses reply of one message with ``deltas`` text deltas."""
    return [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]


def upstream_body(emulator: Emulator) -> dict[str, Any]:
    """The JSON body of the last generation request the emulator received."""
    body = emulator.generations()[-1].body
    assert isinstance(body, dict)
    return body


def cluster_env(redis: RedisServer, emulator: Emulator, key: str) -> dict[str, str]:
    """``sluice serve``'s environment for a cluster node on ``redis`` whose Ollama is ``emulator``
    and whose one API key is ``key`` (the node id is the caller's)."""
    return {
        "SLUICE_OLLAMA_URLS": emulator.url,
        "SLUICE_LOAD_LOCAL_GENERATION": "false",
        "SLUICE_REDIS_URL": redis.url,
        "SLUICE_API_KEYS": key,
        "SLUICE_LOG_LEVEL": "warning",
    }


@contextlib.contextmanager
def reading_cluster(key: str, **emulator: float) -> Iterator[Cluster]:
    """A real redis-server, the emulator (with ``emulator`` settings) and node ``b`` on them, which
    reads after the nodes a test starts beside it and stops (or kills)."""
    with run_redis() as redis, start_emulator(**emulator) as emu:  # type: ignore[arg-type]
        node = start_server({**cluster_env(redis, emu, key), "SLUICE_NODE_ID": "b"})
        try:
            yield redis, emu, node
        finally:
            node.stop()
