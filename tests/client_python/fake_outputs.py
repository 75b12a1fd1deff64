"""What the fake server (`fake_server`) produces, so tests can say what they expect.

Text is a deterministic walk through `WORDS` from a point set by the prompt; vectors and tool-call
arguments are functions of their input. Test support only: nothing here runs a server.
"""

from __future__ import annotations

import zlib

import numpy as np
import orjson

from protocol.messages import Generate
from protocol.tools import NamedToolChoice

__all__ = [
    "WORDS",
    "calls_of",
    "expected_arguments",
    "expected_json",
    "expected_text",
    "expected_vector",
    "pieces_of",
]

WORDS = "river sluice gate opens slowly water runs past old stone under grey light café Zürich 東京 ✓".split()


def expected_text(prompt: str, tokens: int, *, turns: int | None = None) -> str:
    """What the fake generates for ``prompt`` (``turns`` = conversation length for history)."""
    return "".join(pieces_of(prompt, tokens, turns))


def pieces_of(prompt: str, tokens: int, turns: int | None) -> list[str]:
    start = zlib.crc32(prompt.encode()) % len(WORDS)
    pieces = [WORDS[(start + i) % len(WORDS)] + " " for i in range(tokens)]
    if turns is not None:
        pieces[0] = f"[{turns}] " + pieces[0]
    return pieces


def expected_arguments(material: str, tool: str) -> str:
    """The arguments of the fake's call of ``tool`` (``material``: the prompt, or the message
    contents joined by ``|``)."""
    return orjson.dumps({"tool": tool, "about": material[:40]}).decode()


def expected_json(material: str) -> str:
    """The reply to a request with ``format``."""
    return orjson.dumps({"echo": material[:40], "words": len(material.split())}).decode()


def expected_vector(text: str, dims: int) -> np.ndarray:
    vector = np.arange(dims, dtype=np.float32)
    vector[0] = len(text)
    vector[1] = zlib.crc32(text.encode()) % 1000
    return vector


def calls_of(request: Generate) -> list[str]:
    """The tools the fake calls for ``request``: the named one, or each listed one (two at most);
    none with ``tool_choice: "none"`` or when the conversation ends with a tool's result."""
    if not request.tools or request.tool_choice == "none":
        return []
    if request.messages and request.messages[-1].role == "tool":
        return []
    if isinstance(request.tool_choice, NamedToolChoice):
        return [request.tool_choice.function.name]
    return [tool.function.name for tool in request.tools[:2]]
