"""Client messages of a session whose home is another node: delivered to that home, in order.

A transport's node that is not the session's home hands each client message to `forward` (from
the session's queue, one at a time, so a ``cancel`` never overtakes its request) or, for an SSE
``POST`` that must say what became of its messages, to `submit`, which waits for the home's
answer. Both look for the home again when it does not answer (it may have let go, or died: then
this node may claim the session and handle the messages itself, `ClusterSessionRegistry.settle`).
`apply` is the home's side. The messages travel as `server.cluster.forwarded` fields over the
home's control channel (`server.cluster.node`); nothing here keeps state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from protocol.errors import SluiceError
from protocol.messages import ClientMessage
from protocol.session import Outcome
from server.cluster import forwarded
from server.cluster.redis import store_unavailable

if TYPE_CHECKING:
    from server.cluster.session import ClusterSession
    from server.cluster.sessions import ClusterSessionRegistry

__all__ = ["apply", "forward", "submit"]

# A forwarded message whose home does not answer waits this long before looking again.
_SETTLE_RETRY_S = 0.25
_SUBMIT_TRIES = 40


async def forward(registry: ClusterSessionRegistry, session: ClusterSession, message: dict[str, Any]) -> bool:
    """Deliver one queued client message to the session's home; False: try it again."""
    if session.runtime is not None:
        apply(session, message)
        return True
    if session.home:
        try:
            if await registry.node.call(session.home, {**message, "s": session.id, "k": session.key_id}):
                return True
        except SluiceError:
            pass  # not listening or not answering: find out whether it is still the home
    await asyncio.sleep(_SETTLE_RETRY_S)
    with contextlib.suppress(SluiceError):
        session.home = ""
        await registry.settle(session)
    return False


async def submit(
    registry: ClusterSessionRegistry, session: ClusterSession, messages: Sequence[ClientMessage]
) -> list[Outcome]:
    """`ClusterSession.handle_all` for a session homed elsewhere: one call to the home."""
    dumped = [forwarded.dump(message) for message in messages]
    for _ in range(_SUBMIT_TRIES):
        if session.runtime is not None:
            return [session.handle(message) for message in messages]
        if session.home:
            request = {"op": "submit", "s": session.id, "k": session.key_id, "m": dumped}
            with contextlib.suppress(SluiceError):
                answer = await registry.node.call(session.home, request)
                if isinstance(answer, list):
                    return [
                        forwarded.outcome_of(message, item)
                        for message, item in zip(messages, answer, strict=True)
                    ]
        await asyncio.sleep(_SETTLE_RETRY_S)
        session.home = ""
        await registry.settle(session)
    raise store_unavailable()


def apply(session: ClusterSession, message: dict[str, Any]) -> None:
    """At the home: act on a forwarded ``msg``, ``refuse`` or ``goaway``."""
    runtime = session.runtime
    assert runtime is not None
    if message["op"] == "msg":
        session.handle_here(forwarded.load(message["m"]))
    elif message["op"] == "refuse":
        runtime.refuse(forwarded.refusal_error(message))
    elif message["op"] == "goaway":
        runtime.goaway(message["reason"], message["ms"])
