"""What the compatible APIs' tool and structured-output tests share: the emulator with its reply
settings restored after each test, and the body of the last request it received."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.ollama_emulator import Emulator


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


def upstream_body(emulator: Emulator) -> dict[str, Any]:
    """The JSON body of the last generation request the emulator received."""
    body = emulator.generations()[-1].body
    assert isinstance(body, dict)
    return body
