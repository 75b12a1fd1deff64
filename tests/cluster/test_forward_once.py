"""The home applies each forward from another node once, from the inside: a forward sent again
(its first call timed out) is answered as the first time, whatever that answer was, None
included, and never applied a second time; a forward whose sender was taken for stopped, and
whose request the home ended meanwhile, never runs when it arrives after all
(`server.cluster.forwarding.receive`, against a real redis-server for the marks)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import Generate
from server.cluster import forwarded, forwarding, homes
from server.cluster.session import ClusterSession
from server.cluster.sessions import ClusterSessionRegistry
from tests.cluster.inprocess import InProcessNode, collect, outbox, start_node, terminal, welcome
from tests.server.fakes import FakeRegistry, ScriptedGenerator
from tests.support.redis_server import RedisServer


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


@pytest.fixture
async def home(redis_server: RedisServer) -> AsyncIterator[tuple[InProcessNode, ScriptedGenerator]]:
    if not redis_server.running:
        redis_server.start()
    redis_server.command("FLUSHALL")
    generator = ScriptedGenerator(pieces=["a ", "b "], delay_s=0.01)
    node = await start_node(redis_server.url, "n_home", FakeRegistry(generator))
    try:
        yield node, generator
    finally:
        await node.close()


def _late(session_id: str, op: str, fields: Any) -> dict[str, Any]:
    """A forward from ``n_gone`` (taken for stopped) that reaches the home only now."""
    return {"op": op, "s": session_id, "k": "k", "f": "n_gone/f1", "m": fields, "mk": ["g1"]}


async def _control(node: InProcessNode, message: dict[str, Any]) -> object:
    """``message`` as the home's control channel hands it over."""
    handler = node.node.on_control
    assert handler is not None
    return await handler(message)


@pytest.mark.parametrize("op", ["msg", "submit"])
async def test_a_forward_reaching_the_home_after_its_dead_senders_mark_was_ended_never_runs(
    home: tuple[InProcessNode, ScriptedGenerator], op: str
) -> None:
    node, generator = home
    box = outbox()
    session = (await node.sessions.connect(box, key_id="k", welcome=welcome)).runtime
    session_id = session.id
    # n_gone marked g1 for this home, then stopped before its forward arrived; its reaper (here)
    # has the home end it.
    marked = await homes.mark(
        node.store, node.sessions.mark_script, session_id, "n_home", "n_gone/f1", ["g1"], ttl_ms=60_000
    )
    assert marked == [True]
    await node.sessions.recover_node("n_gone")
    ended = (await collect(box, terminal("g1")))[-1]
    assert ended["type"] == "error" and ended["id"] == "g1"
    assert ended["code"] == "internal" and ended["retryable"] is True
    g1 = forwarded.dump(Generate(type="generate", id="g1", prompt="late"))
    g3 = forwarded.dump(Generate(type="generate", id="g3", prompt="with it"))
    if op == "msg":
        assert await _control(node, _late(session_id, "msg", g1)) is True
    else:  # an SSE POST's: the ended request is answered accepted (its end is logged), the other runs
        answer = await _control(node, _late(session_id, "submit", [g1, g3]))
        assert answer == [{"accepted": True}, {"accepted": True}]
    session.handle(Generate(type="generate", id="g2", prompt="after"))
    after = await collect(box, lambda got: terminal("g2")(got) and (op == "msg" or terminal("g3")(got)))
    assert not [e for e in after if e.get("id") == "g1"], after
    prompts = sorted(record.request.prompt or "" for record in generator.records)
    assert prompts == (["after"] if op == "msg" else ["after", "with it"])
