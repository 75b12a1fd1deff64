"""The turns a generation runs on, built from a `Generate` and the session's kept history.

One pure builder used by the session (``history: true`` keeps turns in it) and by the dispatcher
(the plain HTTP APIs, which have no session), so both read a request's turns the same way:
``system`` first when given, then the kept history when the request asks for it, then the
request's own prompt (as a user turn) or messages. It never decides what is kept: that is
`protocol.session.Session`.
"""

from __future__ import annotations

from collections.abc import Sequence

from protocol.messages import ChatMessage, Generate

__all__ = ["conversation", "own_turns"]


def conversation(request: Generate, history: Sequence[ChatMessage] = ()) -> list[ChatMessage]:
    """The turns to generate from; ``history`` is used only when ``request.history`` is set."""
    turns: list[ChatMessage] = []
    if request.system is not None:
        turns.append(ChatMessage(role="system", content=request.system))
    if request.history:
        turns.extend(history)
    turns.extend(own_turns(request))
    return turns


def own_turns(request: Generate, *, include_system: bool = True) -> list[ChatMessage]:
    """The request's own turns: its prompt as one user turn, or its messages (optionally without
    their system turns, which a session does not keep in its history)."""
    if request.messages is None:
        assert request.prompt is not None  # the model guarantees exactly one of them
        return [ChatMessage(role="user", content=request.prompt)]
    if include_system:
        return list(request.messages)
    return [turn for turn in request.messages if turn.role != "system"]
