"""The request lifecycle of PROTOCOL.md as one transition table: queued → running → done | cancelled | failed.

Every request a session accepts walks this table exactly once to one terminal state. The table is
the whole truth: `next_state` looks a transition up and `Lifecycle.fire` applies it; an illegal
transition raises `LifecycleError` and changes nothing (the style of h11's ``_state.py``). This
module knows nothing about messages, numbering or I/O; `protocol.session` drives it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

__all__ = ["TERMINAL", "TRANSITIONS", "Event", "Lifecycle", "LifecycleError", "State", "next_state"]


class State(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Event(StrEnum):
    START = "start"  # the server began the work (a backend slot was taken)
    FINISH = "finish"  # the work produced its result
    CANCEL = "cancel"  # the work was stopped on request (cancel, session end)
    FAIL = "fail"  # the work ended with an error


# A request may be cancelled or fail before it ever starts (cancelled while waiting for a slot,
# model not found); it can only finish after it started, because only running work has a result.
TRANSITIONS: Mapping[tuple[State, Event], State] = MappingProxyType(
    {
        (State.QUEUED, Event.START): State.RUNNING,
        (State.QUEUED, Event.CANCEL): State.CANCELLED,
        (State.QUEUED, Event.FAIL): State.FAILED,
        (State.RUNNING, Event.FINISH): State.DONE,
        (State.RUNNING, Event.CANCEL): State.CANCELLED,
        (State.RUNNING, Event.FAIL): State.FAILED,
    }
)

TERMINAL: frozenset[State] = frozenset({State.DONE, State.CANCELLED, State.FAILED})


class LifecycleError(Exception):
    """An event that the transition table does not allow in the current state.

    It signals a bug in the caller (the session guards every path a client can reach), so it is
    never turned into a protocol error for the client.
    """

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"cannot {event.value} a request that is {state.value}")
        self.state = state
        self.event = event


def next_state(state: State, event: Event) -> State:
    """The state `event` leads to from `state`; raises `LifecycleError` when it is not allowed."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise LifecycleError(state, event) from None


class Lifecycle:
    """One request's position in the table. Starts queued; `fire` moves it or raises."""

    __slots__ = ("state",)

    def __init__(self, state: State = State.QUEUED) -> None:
        self.state = state

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def fire(self, event: Event) -> State:
        """Apply `event`; on `LifecycleError` the state is left exactly as it was."""
        self.state = next_state(self.state, event)
        return self.state
