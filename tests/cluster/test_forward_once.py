"""The home applies each forward from another node once, from the inside: a forward sent again
(its first call timed out) is answered as the first time, whatever that answer was, None
included, and never applied a second time (`server.cluster.forwarding.receive`)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from protocol.errors import ErrorCode, SluiceError
from server.cluster import forwarded, forwarding
from server.cluster.session import ClusterSession
from server.cluster.sessions import ClusterSessionRegistry


class _Runtime:
    """The home's runtime, as far as a forwarded refusal reaches it."""

    def __init__(self) -> None:
        self.refused: list[SluiceError] = []
        self.session = SimpleNamespace(inflight={})

    def refuse(self, error: SluiceError) -> None:
        self.refused.append(error)


def _home() -> tuple[ClusterSessionRegistry, ClusterSession, _Runtime]:
    registry = cast(ClusterSessionRegistry, SimpleNamespace(closing=False))
    session = ClusterSession(registry, "s_once", "k", "n_home")
    runtime = _Runtime()
    session.runtime = cast(Any, runtime)
    return registry, session, runtime


def _refusal(fid: str) -> dict[str, Any]:
    error = SluiceError(ErrorCode.INVALID_MESSAGE, "not a message")
    return {"op": "refuse", "f": fid, **forwarded.refusal_fields(error)}


async def test_a_forward_sent_again_is_answered_as_before_and_applied_once() -> None:
    registry, session, runtime = _home()
    first = await forwarding.receive(registry, session, _refusal("f1"))
    again = await forwarding.receive(registry, session, _refusal("f1"))
    assert first is True and again is True
    assert len(runtime.refused) == 1


async def test_a_forward_whose_first_answer_was_none_is_not_applied_again() -> None:
    registry, session, runtime = _home()
    session.remember("f1", None)  # applied, and answered None
    assert session.answered("f1") is None
    assert await forwarding.receive(registry, session, _refusal("f1")) is None
    assert runtime.refused == []
    assert session.answered("f2") is forwarding.NOT_APPLIED
    assert session.answered(None) is forwarding.NOT_APPLIED
