"""The session lifecycle table: every legal transition works, every other one is refused."""

import itertools

import pytest

from appliance.sessions.model import TRANSITIONS, IllegalTransition, Mode, Protocol, Session, Side, State

LEGAL = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}


def _session(state: State) -> Session:
    return Session("s1", Side.PRODUCER, Mode.QUIC, Protocol.TCP, owner="alice", state=state)


@pytest.mark.parametrize(("current", "target"), sorted(LEGAL))
def test_legal_transition_changes_state(current: State, target: State) -> None:
    assert _session(current).transition(target).state is target


@pytest.mark.parametrize(("current", "target"), sorted(set(itertools.product(State, State)) - LEGAL))
def test_illegal_transition_is_refused(current: State, target: State) -> None:
    with pytest.raises(IllegalTransition):
        _session(current).transition(target)


def test_the_lifecycle_is_pending_active_released_or_failed() -> None:
    assert {
        (State.PENDING, State.ACTIVE),
        (State.PENDING, State.RELEASED),
        (State.PENDING, State.FAILED),
        (State.ACTIVE, State.RELEASED),
        (State.ACTIVE, State.FAILED),
    } == LEGAL


def test_ending_records_reason_and_time() -> None:
    ended = _session(State.ACTIVE).transition(State.RELEASED, "lease expired")
    assert ended.ended and ended.reason == "lease expired" and ended.ended_at > 0
