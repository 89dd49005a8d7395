"""The UDP session table on its own: capacity and idle sweeps, against a model, with hypothesis."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from portway.stream.sessions import SessionTable


@dataclass(eq=False)
class Session:
    idle: int = 0


KEYS = st.integers(min_value=0, max_value=7)  # few keys, so adds, repeats and removals collide


class TableAgainstModel(RuleBasedStateMachine):
    """Random adds, datagrams, removals and sweeps; the table must agree with a plain dict model."""

    @initialize(
        capacity=st.integers(min_value=1, max_value=5), idle_ticks=st.integers(min_value=1, max_value=4)
    )
    def start(self, capacity: int, idle_ticks: int) -> None:
        self.table: SessionTable[int, Session] = SessionTable(capacity, idle_ticks)
        self.model: dict[int, Session] = {}
        self.capacity, self.idle_ticks = capacity, idle_ticks

    @rule(key=KEYS)
    def add(self, key: int) -> None:
        session = Session()
        if key in self.model:
            with pytest.raises(KeyError):
                self.table.add(key, session)
        elif len(self.model) >= self.capacity:
            assert self.table.full()
            with pytest.raises(OverflowError):
                self.table.add(key, session)
        else:
            assert not self.table.full()
            self.table.add(key, session)
            self.model[key] = session

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def datagram(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        session = self.table.get(key)
        assert session is self.model[key]
        session.idle = 0  # what the hot path does on every datagram, either direction

    @rule(key=KEYS, stale=st.booleans())
    def remove(self, key: int, stale: bool) -> None:
        if stale:  # a session that was replaced must not remove its successor
            self.table.remove(key, Session())
            return
        self.table.remove(key)
        self.model.pop(key, None)

    @rule()
    def sweep(self) -> None:
        # The table increments every session's idle count; the model predicts who goes.
        expected = {k for k, s in self.model.items() if s.idle + 1 > self.idle_ticks}
        expired = self.table.tick()
        assert {k for k, _ in expired} == expected
        assert all(self.model[k] is s for k, s in expired)
        for key in expected:
            del self.model[key]

    @invariant()
    def agrees(self) -> None:
        if not hasattr(self, "table"):
            return
        assert len(self.table) <= self.capacity
        assert len(self.table) == len(self.model)
        assert {id(s) for s in self.table} == {id(s) for s in self.model.values()}


TestTableAgainstModel = TableAgainstModel.TestCase


@given(idle_ticks=st.integers(min_value=1, max_value=10), sweeps=st.integers(min_value=0, max_value=40))
def test_a_silent_session_lives_exactly_idle_ticks_sweeps(idle_ticks: int, sweeps: int) -> None:
    table: SessionTable[str, Session] = SessionTable(1, idle_ticks)
    table.add("client", Session())
    gone_at = None
    for n in range(1, sweeps + 1):
        if table.tick():
            gone_at = n
            break
    assert gone_at == (idle_ticks + 1 if sweeps > idle_ticks else None)


@given(idle_ticks=st.integers(min_value=1, max_value=6), sweeps=st.integers(min_value=1, max_value=60))
def test_a_session_with_traffic_every_idle_ticks_sweeps_never_expires(idle_ticks: int, sweeps: int) -> None:
    table: SessionTable[str, Session] = SessionTable(1, idle_ticks)
    session = Session()
    table.add("client", session)
    for n in range(sweeps):
        if n % idle_ticks == 0:
            session.idle = 0
        assert table.tick() == []
    assert table.get("client") is session


def test_capacity_frees_up_as_sessions_expire() -> None:
    table: SessionTable[int, Session] = SessionTable(2, 1)
    table.add(1, Session())
    table.add(2, Session())
    assert table.full()
    table.tick()
    assert [k for k, _ in table.tick()] == [1, 2]
    assert not table.full()
    table.add(3, Session())


@pytest.mark.parametrize(("capacity", "idle_ticks"), [(0, 1), (1, 0), (-1, 5)])
def test_bounds_must_be_positive(capacity: int, idle_ticks: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        SessionTable(capacity, idle_ticks)
