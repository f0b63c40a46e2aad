"""How the link tells another client with the same client id from an ordinary broken link.

``ClientIdWatch`` is pure: these tests drive it with monotonic times. The real-broker
behaviour (two agent processes sharing an id) is in tests/test_duplicate_id.py.
"""

from __future__ import annotations

from edgefleet.agent.mqtt import (
    SESSION_TAKEN_OVER,
    SHORT_CONNECTION_S,
    SHORT_CONNECTIONS_IN_A_ROW,
    ClientIdWatch,
)

NOT_AUTHORIZED = 0x87


def watch() -> ClientIdWatch:
    return ClientIdWatch("edgefleet-door", backoff_s=30.0, backoff_max_s=120.0)


def test_mqtt5_session_taken_over_is_a_conflict_at_once() -> None:
    w = watch()
    w.connected(100.0)

    conflict = w.lost(500.0, reason=SESSION_TAKEN_OVER)

    assert conflict is not None
    assert conflict.first
    assert conflict.wait_s == 30.0
    assert "another client uses client id edgefleet-door" in conflict.problem
    assert "session was taken over" in conflict.problem
    assert w.problem == conflict.problem
    assert w.conflicts == 1


def test_connections_closed_right_after_connecting_without_a_reason_are_a_conflict() -> None:
    w = watch()
    now = 0.0
    verdicts = []
    for _ in range(SHORT_CONNECTIONS_IN_A_ROW):
        w.connected(now)
        now += SHORT_CONNECTION_S / 10
        verdicts.append(w.lost(now, reason=None))
        now += 0.5

    assert verdicts[:-1] == [None] * (SHORT_CONNECTIONS_IN_A_ROW - 1)
    assert verdicts[-1] is not None
    assert f"{SHORT_CONNECTIONS_IN_A_ROW} connections in a row" in verdicts[-1].problem


def test_a_long_connection_lost_is_an_ordinary_outage_and_restarts_the_count() -> None:
    w = watch()
    for start in (0.0, 10.0):
        w.connected(start)
        assert w.lost(start + 1.0, reason=None) is None
    w.connected(20.0)
    assert w.lost(20.0 + 10 * SHORT_CONNECTION_S, reason=None) is None  # held a long time
    w.connected(100.0)

    assert w.lost(101.0, reason=None) is None  # the count started over
    assert w.problem is None


def test_a_reason_other_than_takeover_is_not_a_conflict() -> None:
    w = watch()
    for start in range(SHORT_CONNECTIONS_IN_A_ROW + 2):
        w.connected(float(start))
        assert w.lost(start + 0.1, reason=NOT_AUTHORIZED) is None
    assert w.problem is None


def test_the_wait_doubles_while_the_conflict_goes_on_up_to_its_maximum() -> None:
    w = watch()
    waits = []
    firsts = []
    for start in range(5):
        w.connected(float(start))
        conflict = w.lost(start + 0.1, reason=SESSION_TAKEN_OVER)
        assert conflict is not None
        waits.append(conflict.wait_s)
        firsts.append(conflict.first)

    assert waits == [30.0, 60.0, 120.0, 120.0, 120.0]
    assert firsts == [True, False, False, False, False]


def test_the_conflict_is_over_once_a_connection_holds_past_the_longest_wait() -> None:
    w = watch()
    w.connected(0.0)
    w.lost(1.0, reason=SESSION_TAKEN_OVER)
    w.connected(50.0)

    assert not w.holding(50.0 + 119.0)
    assert w.problem is not None
    assert w.holding(50.0 + 120.0)
    assert w.problem is None
    assert not w.holding(50.0 + 121.0)  # said once
    w.connected(300.0)
    again = w.lost(301.0, reason=SESSION_TAKEN_OVER)
    assert again is not None
    assert again.first  # a new conflict, from the first wait again
    assert again.wait_s == 30.0
    assert w.conflicts == 2


def test_a_loss_before_any_connection_is_not_evidence() -> None:
    assert watch().lost(1.0, reason=SESSION_TAKEN_OVER) is None


def test_a_conflict_that_goes_on_for_weeks_keeps_the_longest_wait() -> None:
    w = watch()
    for start in range(2000):  # far past the doublings a float can hold
        w.connected(float(start))
        conflict = w.lost(start + 0.1, reason=SESSION_TAKEN_OVER)
    assert conflict is not None
    assert conflict.wait_s == 120.0
