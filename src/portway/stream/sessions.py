"""The UDP session table: one entry per client address, bounded, swept for idleness.

Pure bookkeeping with no sockets, so its rules (capacity, expiry) are tested on their own, with
property tests against a model, in tests/test_sessions.py.
Sessions count idle sweeps instead of reading a clock per datagram: the hot path only stores a
zero, and the sweeper does the counting.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, Protocol, TypeVar


class Ticking(Protocol):
    """A session: `idle` is reset to 0 on every datagram, in either direction."""

    idle: int


K = TypeVar("K", bound=Hashable)
S = TypeVar("S", bound=Ticking)


class SessionTable(Generic[K, S]):
    """Sessions by client address, at most `capacity` of them."""

    def __init__(self, capacity: int, idle_ticks: int) -> None:
        if capacity < 1 or idle_ticks < 1:
            raise ValueError("capacity and idle_ticks must be positive")
        self.capacity = capacity
        self.idle_ticks = idle_ticks
        self._sessions: dict[K, S] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[S]:
        return iter(list(self._sessions.values()))

    def get(self, key: K) -> S | None:
        return self._sessions.get(key)

    def full(self) -> bool:
        return len(self._sessions) >= self.capacity

    def add(self, key: K, session: S) -> None:
        """Insert a new session; the caller checked `full()` first (adding past capacity is a bug)."""
        if key in self._sessions:
            raise KeyError(f"session for {key!r} exists")
        if self.full():
            raise OverflowError("session table is full")
        self._sessions[key] = session

    def remove(self, key: K, session: S | None = None) -> None:
        """Forget `key` (only if it still maps to `session`, when given: a replaced one stays)."""
        current = self._sessions.get(key)
        if current is not None and (session is None or current is session):
            del self._sessions[key]

    def tick(self) -> list[tuple[K, S]]:
        """Count one sweep; return (and forget) sessions idle for more than `idle_ticks` sweeps."""
        expired: list[tuple[K, S]] = []
        limit = self.idle_ticks
        for key, session in self._sessions.items():
            session.idle += 1
            if session.idle > limit:
                expired.append((key, session))
        for key, _ in expired:
            del self._sessions[key]
        return expired
