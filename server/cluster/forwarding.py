"""Client messages of a session whose home is another node: delivered to that home, in order.

A transport's node that is not the session's home hands each client message to `forward` (from
the session's queue, one at a time, so a ``cancel`` never overtakes its request) or, for an SSE
``POST`` that must say what became of its messages, to `submit`, which waits for the home's
answer (within `SUBMIT_BOUND_S`, or ``upstream_unavailable``, retryable). Both look for the home
again when it does not answer (it may have let go, or died: then this node may claim the session
and handle the messages itself, `ClusterSessionRegistry.settle`).

Exactly once, across a home that dies: a request (``generate``, ``embed``, ``classify``) is
marked in Redis with the forward's id before it is forwarded (`homes.mark`), and the home takes
the mark (`homes.take`, in one step with checking it is still the home) before it runs it, so
from then on it is one of the home's requests, which a survivor ends (``error`` ``internal``,
``retryable: true``) if the home dies before finishing it, logged or not (`homes.recover`). A
forward that reached nobody, that the home said it was not the home for, or whose home changed
while it waited, takes its mark back (`homes.unmark`) and goes on to the next home; when the
mark cannot be taken back, the old home took it, and the request is never run again elsewhere.
Each forward has an id the home remembers (`ClusterSession.answered`), so a forward sent again
after a call that timed out is answered as the first time, never run twice.

A forwarding node that dies before the home took its request leaves the mark untaken: the
survivor that reaps it (`end_untaken`) has each live home make those marks its own (`orphans`, one
Lua step against `TAKE`: whichever comes first wins) and log each request's ``error``
``internal``, ``retryable: true``; a forward that arrives after that finds its mark gone and is
never run (each forward names the requests it marked). A session with no live home gets the
errors in its log from the survivor itself. The forward's id starts with the forwarding node's
(``<node>/…``), and that node notes the session in its ``marks`` as it marks, so the survivor
finds them.

`receive` (and `apply`) is the home's side. The messages travel as `server.cluster.forwarded` fields over the
home's control channel (`server.cluster.node`); the only state kept is in the queued message
itself (its forward id, and the home its request is marked for).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from protocol.errors import ErrorCode, SluiceError
from protocol.messages import Classify, ClientMessage, Embed, Generate
from protocol.session import Accepted, Outcome, Refused
from server.cluster import forwarded, homes
from server.cluster.node import CALL_TIMEOUT_S, NotListening
from server.cluster.redis import store_unavailable

if TYPE_CHECKING:
    from server.cluster.session import ClusterSession
    from server.cluster.sessions import ClusterSessionRegistry

__all__ = [
    "NOT_APPLIED",
    "REFUSED",
    "SUBMIT_BOUND_S",
    "apply",
    "end_untaken",
    "forward",
    "orphans",
    "receive",
    "request_id_of",
    "request_ids",
    "submit",
]

# A forwarded message whose home does not answer waits this long before looking again.
_SETTLE_RETRY_S = 0.25
# How long an SSE ``POST`` waits for a home that does not answer (PROTOCOL §2 ends a stopped
# node's requests within 15 s) before it is answered ``upstream_unavailable``.
SUBMIT_BOUND_S = 12.0
# `ClusterSession.answered` of a forward the home has not applied (any answer, None included,
# means it was: a forward sent again is answered as before, never applied twice).
NOT_APPLIED: object = object()
# The home's answer to a forwarded request it refused (the refusal is in the session's log).
REFUSED = "refused"
# The key of a queued message that stays on this node: the home its request is marked for.
_MARKED_FOR = "marked_for"
# A forward's field: the ids of its requests it marked (`homes.mark`).
_MARKS = "mk"
# The answer to a submitted request that ended before it ran (`orphans`): its end is in the log.
_ENDED = {"accepted": True}
_REQUESTS = frozenset({"generate", "embed", "classify"})
# How long a survivor waits for a live home to end what a dead forwarder left it (`end_untaken`:
# a home that does not answer in time is asked again, a few times).
_TELL_WITHIN_S = 1.0


def request_id_of(fields: dict[str, Any]) -> str | None:
    """The id of a forwarded message's fields when it is a request."""
    request_id = fields.get("id")
    return request_id if fields.get("type") in _REQUESTS and isinstance(request_id, str) else None


def request_ids(message: dict[str, Any]) -> list[str]:
    """The ids of the requests in a forwarded ``msg`` or ``submit``."""
    items = message["m"] if message["op"] == "submit" else [message["m"]] if message["op"] == "msg" else []
    return [rid for rid in map(request_id_of, items) if rid is not None]


class _Moved(Exception):
    """The session's home is not the one this node forwards to any more."""


def _moved(session: ClusterSession, marked_for: str) -> bool:
    """Whether the session's home is known to be another than ``marked_for`` (or this node)."""
    return session.runtime is not None or session.home not in ("", marked_for)


async def forward(registry: ClusterSessionRegistry, session: ClusterSession, message: dict[str, Any]) -> bool:
    """Deliver one queued client message to the session's home; False: try it again."""
    try:
        if _MARKED_FOR in message and _moved(session, message[_MARKED_FOR]):
            if not await _take_back(registry, session, message):
                return True  # the old home took it: it ran there, or ended with its requests
        if session.runtime is not None:
            apply(session, message)
            return True
        home = session.home
        if home:
            if await _send(registry, session, message, home):
                return True
    except (SluiceError, _Moved):
        pass  # not answering in time (it may have it: its mark stays), or not the home any more
    await asyncio.sleep(_SETTLE_RETRY_S)
    with contextlib.suppress(SluiceError):
        session.home = ""
        await registry.settle(session)
    return False


async def _send(
    registry: ClusterSessionRegistry, session: ClusterSession, message: dict[str, Any], home: str
) -> bool:
    """One try at ``home``: True once it is done with ``message`` (ran it, refused it, or took it
    before it stopped)."""
    fid = message.setdefault("f", _forward_id(registry))
    ids = request_ids(message)
    request_id = ids[0] if ids else None
    if request_id is not None and _MARKED_FOR not in message:
        marked = await _mark(registry, session, home, fid, [request_id])
        if marked is None:
            raise _Moved
        if marked[0]:
            message[_MARKED_FOR] = home
    wire = {key: value for key, value in message.items() if key != _MARKED_FOR}
    if _MARKED_FOR in message:
        wire[_MARKS] = ids
    try:
        answer = await registry.node.call(home, {**wire, "s": session.id, "k": session.key_id})
    except NotListening:  # it reached nobody
        answer = False
    if answer:
        return True
    # Not the home, or nobody there: unless the old home took it meanwhile, it goes on.
    return not await _take_back(registry, session, message)


async def _take_back(
    registry: ClusterSessionRegistry, session: ClusterSession, message: dict[str, Any]
) -> bool:
    """Unmark the queued ``message``'s request; False when its home took it."""
    if _MARKED_FOR not in message:
        return True
    (taken,) = await homes.unmark(
        registry.store, registry.unmark_script, session.id, message["f"], request_ids(message)
    )
    if taken:
        del message[_MARKED_FOR]
    return taken


async def submit(
    registry: ClusterSessionRegistry, session: ClusterSession, messages: Sequence[ClientMessage]
) -> list[Outcome]:
    """`ClusterSession.handle_all` for a session homed elsewhere: one call to the home, or
    ``upstream_unavailable`` when no home answers within `SUBMIT_BOUND_S`."""
    dumped = [forwarded.dump(message) for message in messages]
    outcomes: list[Outcome | None] = [None] * len(messages)
    fid = _forward_id(registry)
    marked: set[int] = set()  # the requests marked for ``marked_for``
    marked_for = ""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SUBMIT_BOUND_S
    while loop.time() < deadline:
        try:
            if marked and _moved(session, marked_for):
                await _submit_take_back(registry, session, fid, messages, marked, outcomes)
            if session.runtime is not None:
                return [
                    outcome if outcome is not None else session.handle(message)
                    for message, outcome in zip(messages, outcomes, strict=True)
                ]
            home = session.home
            if home:
                pending = [i for i, outcome in enumerate(outcomes) if outcome is None]
                unmarked = [i for i in pending if i not in marked and request_id_of(dumped[i]) is not None]
                if unmarked:
                    ids = [str(request_id_of(dumped[i])) for i in unmarked]
                    got = await _mark(registry, session, home, fid, ids)
                    if got is None:
                        raise _Moved
                    marked |= {i for i, ok in zip(unmarked, got, strict=True) if ok}
                    marked_for = home
                request: dict[str, Any] = {"op": "submit", "s": session.id, "k": session.key_id, "f": fid}
                request[_MARKS] = [str(request_id_of(dumped[i])) for i in sorted(marked)]
                try:
                    left = max(0.0, deadline - loop.time())
                    answer = await registry.node.call(
                        home,
                        {**request, "m": [dumped[i] for i in pending]},
                        within_s=min(CALL_TIMEOUT_S, left),
                    )
                except NotListening:
                    answer = False
                if isinstance(answer, list):
                    for i, item in zip(pending, answer, strict=True):
                        outcomes[i] = forwarded.outcome_of(messages[i], item)
                    return [outcome for outcome in outcomes if outcome is not None]
                await _submit_take_back(registry, session, fid, messages, marked, outcomes)
        except (SluiceError, _Moved):
            pass
        await asyncio.sleep(_SETTLE_RETRY_S)
        with contextlib.suppress(SluiceError):
            session.home = ""
            await registry.settle(session)
    raise store_unavailable()


async def _submit_take_back(
    registry: ClusterSessionRegistry,
    session: ClusterSession,
    fid: str,
    messages: Sequence[ClientMessage],
    marked: set[int],
    outcomes: list[Outcome | None],
) -> None:
    """Unmark a submit's ``marked`` requests; those the old home took are accepted there (their
    end, a run or a retryable error, is in the session's stream)."""
    order = sorted(marked)
    requests = [messages[i] for i in order]
    ids = [request.id for request in requests if isinstance(request, Generate | Embed | Classify)]
    taken = await homes.unmark(registry.store, registry.unmark_script, session.id, fid, ids)
    for i, request, back in zip(order, requests, taken, strict=True):
        if not back and isinstance(request, Generate | Embed | Classify):
            outcomes[i] = Accepted(request)
    marked.clear()


async def receive(
    registry: ClusterSessionRegistry, session: ClusterSession, message: dict[str, Any]
) -> object:
    """At the home: apply a forward from another node once, after taking its requests' marks;
    False when this node is not the home any more (the sender looks again)."""
    fid = message.get("f")
    before = session.answered(fid)
    if before is not NOT_APPLIED:
        return before  # sent again after its call timed out
    ids = request_ids(message)
    ended: set[str] = set()
    if ids and fid is not None:
        try:
            taken = await homes.take(
                registry.store, registry.take_script, session.id, registry.node.id, fid, ids
            )
        except SluiceError:
            return False  # the sender tries again
        if taken is None or session.runtime is None or registry.closing:
            return False
        # Marked by this forward, and not its mark any more: its sender was taken for stopped,
        # and the request ended here (`orphans`); it never runs.
        ended = set(message.get(_MARKS, ())) - {rid for rid, took in zip(ids, taken, strict=True) if took}
    if message["op"] == "submit":
        each = [request_id_of(item) for item in message["m"]]
        answers = []
        for rid, item in zip(each, message["m"], strict=True):
            if rid in ended:
                ended.discard(rid)  # the request it marked: a later one of that id is another
                answers.append(_ENDED)
            else:
                answers.append(forwarded.answer_of(session.handle(forwarded.load(item))))
        refused = [rid for rid, item in zip(each, answers, strict=True) if rid and "refused" in item]
        answer: object = answers
    else:
        answer = True if ended else apply(session, message)
        refused = ids if answer == REFUSED else []
    session.remember(fid, answer)
    runtime = session.runtime
    refused = [rid for rid in refused if runtime is not None and rid not in runtime.session.inflight]
    if refused:  # never ran: their marks go (a survivor must not end them)
        with contextlib.suppress(SluiceError):
            await homes.unmark(registry.store, registry.unmark_script, session.id, "1", refused)
    return answer


def _forward_id(registry: ClusterSessionRegistry) -> str:
    """A new forward's id: ``<this node>/<random>``, so a survivor knows whose marks it holds."""
    return f"{registry.node.id}/{secrets.token_hex(8)}"


async def _mark(
    registry: ClusterSessionRegistry, session: ClusterSession, home: str, fid: str, ids: list[str]
) -> list[bool] | None:
    return await homes.mark(
        registry.store, registry.mark_script, session.id, home, fid, ids, ttl_ms=registry.key_ttl_ms
    )


async def orphans(registry: ClusterSessionRegistry, session: ClusterSession, dead: str) -> bool:
    """At the home: end, each with a retryable ``internal`` error, the requests ``dead`` (taken
    for stopped) marked for this home and never handed over (`homes.orphan`, in one step against
    `receive`'s take); False when this node is not the home any more (the survivor looks again)."""
    if session.runtime is None or registry.closing:
        return False
    try:
        ids = await homes.orphan(registry.store, registry.orphan_script, session.id, registry.node.id, dead)
    except SluiceError:
        return False
    if ids is None:
        return False
    session.lost(ids, SluiceError(ErrorCode.INTERNAL, homes.FORWARDER_STOPPED, retryable=True))
    return True


async def end_untaken(
    registry: ClusterSessionRegistry,
    dead: str,
    here: Callable[[dict[str, Any]], Awaitable[object]],
) -> None:
    """At the survivor that reaps ``dead``: `homes.end_untaken`, telling each live home to end
    what ``dead`` left it (``here``: this node's own control handler, when it is that home)."""

    async def tell(home: str, session_id: str) -> bool:
        message = {"op": "orphans", "s": session_id, "d": dead}
        if home == registry.node.id:
            return bool(await here(message))
        with contextlib.suppress(SluiceError):
            return bool(await registry.node.call(home, message, within_s=_TELL_WITHIN_S))
        return False

    await homes.end_untaken(
        registry.store, dead, alive=registry.node.alive, tell=tell, ttl_ms=registry.key_ttl_ms
    )


def apply(session: ClusterSession, message: dict[str, Any]) -> bool | str:
    """At the home: act on a forwarded ``msg``, ``refuse`` or ``goaway``; `REFUSED` for a
    request the session refused."""
    runtime = session.runtime
    assert runtime is not None
    if message["op"] == "msg":
        if isinstance(session.handle_here(forwarded.load(message["m"])), Refused):
            return REFUSED
    elif message["op"] == "refuse":
        runtime.refuse(forwarded.refusal_error(message))
    elif message["op"] == "goaway":
        runtime.goaway(message["reason"], message["ms"])
    return True
