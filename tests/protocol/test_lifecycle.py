"""protocol.lifecycle: every (state, event) pair, legal and illegal."""

from __future__ import annotations

import itertools

import pytest

from protocol.lifecycle import TERMINAL, TRANSITIONS, Event, Lifecycle, LifecycleError, State, next_state

LEGAL = {
    (State.QUEUED, Event.START): State.RUNNING,
    (State.QUEUED, Event.CANCEL): State.CANCELLED,
    (State.QUEUED, Event.FAIL): State.FAILED,
    (State.RUNNING, Event.FINISH): State.DONE,
    (State.RUNNING, Event.CANCEL): State.CANCELLED,
    (State.RUNNING, Event.FAIL): State.FAILED,
}
ILLEGAL = [pair for pair in itertools.product(State, Event) if pair not in LEGAL]


def test_table_is_exactly_the_documented_one() -> None:
    assert dict(TRANSITIONS) == LEGAL
    assert frozenset({State.DONE, State.CANCELLED, State.FAILED}) == TERMINAL
    assert len(ILLEGAL) == len(State) * len(Event) - len(LEGAL) == 14


@pytest.mark.parametrize(("state", "event"), list(LEGAL))
def test_legal_transition(state: State, event: Event) -> None:
    assert next_state(state, event) is LEGAL[state, event]
    lifecycle = Lifecycle(state)
    assert lifecycle.fire(event) is LEGAL[state, event]
    assert lifecycle.state is LEGAL[state, event]


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_illegal_transition_raises_and_changes_nothing(state: State, event: Event) -> None:
    with pytest.raises(LifecycleError) as info:
        next_state(state, event)
    assert (info.value.state, info.value.event) == (state, event)
    assert event.value in str(info.value) and state.value in str(info.value)
    lifecycle = Lifecycle(state)
    with pytest.raises(LifecycleError):
        lifecycle.fire(event)
    assert lifecycle.state is state


@pytest.mark.parametrize("state", list(TERMINAL))
def test_terminal_states_accept_nothing(state: State) -> None:
    assert Lifecycle(state).terminal
    for event in Event:
        with pytest.raises(LifecycleError):
            next_state(state, event)


def test_new_lifecycle_is_queued_and_reaches_every_terminal_state() -> None:
    assert Lifecycle().state is State.QUEUED and not Lifecycle().terminal
    reached = set()
    for path in ([Event.START, Event.FINISH], [Event.START, Event.CANCEL], [Event.CANCEL], [Event.FAIL]):
        lifecycle = Lifecycle()
        for event in path:
            lifecycle.fire(event)
        reached.add(lifecycle.state)
    assert reached == TERMINAL
