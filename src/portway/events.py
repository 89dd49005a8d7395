"""The one place a connection's life is reported: accepted, refused, dialed, closed.

Both TCP engines and the UDP relay report the same events at the same points of the lifecycle
(accept -> admit -> match a route -> pick a target -> dial -> relay -> close); the log lines,
the Prometheus metrics, the access log and the status API are observers of these events and
never hook into the data path themselves.

Cost when nobody listens: a stream holds ``observer = None`` and tests it once per event, so a
route without metrics or an access log pays one attribute test per connection, not per chunk.
Byte counts come from the counters the pumps already keep, read once when a connection ends.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

__all__ = [
    "CLOSE_REASONS",
    "CloseReason",
    "ConnectionRecord",
    "Fanout",
    "Observer",
    "Protocol_",
]

Protocol_ = Literal["tcp", "udp"]

#: Why a connection (TCP) or session (UDP) ended; the metric label values of
#: ``portway_connection_closes_total{reason}`` and the access log's ``reason`` field.
CloseReason = Literal[
    "normal",
    "client_reset",
    "target_reset",
    "dial_refused",
    "dial_timeout",
    "no_target",
    "acl_denied",
    "limit",
    "idle_timeout",
    "peek_timeout",
    "shutdown",
    "error",
]
CLOSE_REASONS: tuple[CloseReason, ...] = get_args(CloseReason)


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """Everything known about one finished TCP connection or UDP session.

    `client` is the real client (the PROXY header's source when one was believed); `target` is
    the pool member it was relayed to, as written in the config (``host:port``), or None when
    it never reached one (refused, no target up, dial failed on every target).
    """

    route: str
    protocol: Protocol_
    client: tuple[str, int]
    target: str | None
    #: Wall-clock start (time.time()) and how long it lasted, in seconds.
    started: float
    duration: float
    bytes_client_to_target: int
    bytes_target_to_client: int
    reason: CloseReason
    datagrams_client_to_target: int = 0
    datagrams_target_to_client: int = 0

    @classmethod
    def ending_now(
        cls,
        route: str,
        protocol: Protocol_,
        client: tuple[str, int],
        target: str | None,
        started: float,
        up: int,
        down: int,
        reason: CloseReason,
        datagrams_up: int = 0,
        datagrams_down: int = 0,
    ) -> ConnectionRecord:
        """The record of a connection or session that ends now (`started`: its time.time())."""
        duration = max(0.0, time.time() - started)
        return cls(
            route, protocol, client, target, started, duration, up, down, reason, datagrams_up, datagrams_down
        )


class Observer(Protocol):
    """What a stream reports. Every method must be cheap and must never raise."""

    def accepted(self, route: str, protocol: Protocol_) -> None:
        """A TCP connection was accepted or a UDP session created (before admission)."""

    def dialed(self, route: str, target: str, seconds: float) -> None:
        """A dial to `target` succeeded after `seconds`."""

    def closed(self, record: ConnectionRecord) -> None:
        """A connection or session ended (also those refused before any dial)."""

    def datagram_dropped(self, route: str, reason: str) -> None:
        """A UDP datagram was dropped (`limit`, `acl_denied`, `queue_full`, `no_target`, ...)."""


class Fanout:
    """Several observers behind one: a stream holds exactly one observer or None."""

    __slots__ = ("observers",)

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = tuple(observers)

    def accepted(self, route: str, protocol: Protocol_) -> None:
        for o in self.observers:
            o.accepted(route, protocol)

    def dialed(self, route: str, target: str, seconds: float) -> None:
        for o in self.observers:
            o.dialed(route, target, seconds)

    def closed(self, record: ConnectionRecord) -> None:
        for o in self.observers:
            o.closed(record)

    def datagram_dropped(self, route: str, reason: str) -> None:
        for o in self.observers:
            o.datagram_dropped(route, reason)
