"""One UDP socket for several routes: read a new client's QUIC SNI, pin the client to a route.

Routes that share a UDP listen address through ``match:`` keep one `UDPStream` each (their own
pool, limits, sessions, observer events and logs), but none of them binds: a `SharedUDPListener`
owns the socket and lends its transport to every stream for replies (`UDPStream.attach`).

A datagram from a client already **pinned** to a route costs one dict lookup here (client → the
route's stream), then the stream's own session lookup, exactly as on an unshared listener. A
datagram from an unknown client goes to a per-client `portway.quic.QuicSniffer`; every datagram
fed is kept, and once the sniffer decides, the client is pinned and the kept datagrams go to the
chosen route in order, unchanged (the target sees the very Initial the client sent). Not QUIC v1,
or an Initial that cannot be read, or no hello within `peek_timeout`: the fallback route (a route
with ``match: {}`` or without ``match:``), else the datagrams are dropped with one rate-limited
log line naming the listener.

A pin lives as long as the client's session: a sweep every `peek_timeout` forgets pins whose
route no longer has a session for that client (it idled out, or was refused by a limit), so the
pin table is bounded by the routes' session tables (plus what one sweep interval lets in, and
never more than `max_pins`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from portway.addr import Network, format_hostport
from portway.matching import MatchTable
from portway.quic import MAX_INITIAL_DATAGRAMS, QuicSniffer
from portway.sniff import Sniffed, SniffError
from portway.stream.listen import PortGroup
from portway.stream.udp import SOCKET_BUFFER

if TYPE_CHECKING:
    from portway.events import Observer
    from portway.stream.udp import UDPStream

__all__ = ["MAX_PENDING", "PENDING_BYTES", "SharedUDPListener"]

log = logging.getLogger("portway.shared")

#: Clients whose route is not decided yet. Each holds a sniffer, its datagrams and a timer until
#: `peek_timeout`: without a bound, a flood of spoofed source addresses (free to forge over UDP)
#: would make the undecided table grow without limit. Past it, a new client whose first datagram
#: does not decide alone is dropped (its QUIC stack retransmits the Initial); pinned clients, and
#: clients whose first datagram is a whole Initial, are served as usual.
MAX_PENDING = 1024
#: Bytes kept per undecided client. A QUIC v1 ClientHello fits in a few 1200-1500 byte Initial
#: datagrams (the sniffer gives up after `MAX_INITIAL_DATAGRAMS`); this stops one client from
#: parking 64 KiB datagrams here, so the whole undecided table stays under ~MAX_PENDING * 16 KiB.
PENDING_BYTES = max(16 * 1024, MAX_INITIAL_DATAGRAMS * 1500)


class _Pending:
    """One client until its route is decided: the sniffer, the datagrams fed, and its expiry."""

    __slots__ = ("datagrams", "size", "sniffer", "timer")

    def __init__(self) -> None:
        self.sniffer = QuicSniffer()
        self.datagrams: list[bytes] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None


class _Protocol(asyncio.DatagramProtocol):
    __slots__ = ("listener", "pins")

    def __init__(self, listener: SharedUDPListener) -> None:
        self.listener = listener
        self.pins = listener.pins

    def datagram_received(self, data: bytes, addr: Any) -> None:
        stream = self.pins.get(addr)
        if stream is None:
            self.listener.unknown(data, addr)
            return
        session = stream.sessions.get(addr)
        if session is not None:
            session.send(data)
        else:  # the session ended since (idle, refused): the client stays on its route
            stream.new_session(data, addr)

    def error_received(self, exc: Exception) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("listener error", extra={**self.listener.fields, "error": str(exc)})


class SharedUDPListener(PortGroup["UDPStream"]):
    """The UDP socket of a group of routes on one address (see the module docstring)."""

    KIND = socket.SOCK_DGRAM

    def __init__(
        self,
        network: Network,
        host: str,
        port: int,
        routes: Mapping[str, UDPStream],
        table: MatchTable,
        *,
        peek_timeout: float = 3.0,
        reuse_port: bool = False,
        observer: Observer | None = None,
        max_pending: int = MAX_PENDING,
        pending_bytes: int = PENDING_BYTES,
    ) -> None:
        super().__init__(
            network,
            host,
            port,
            routes,
            table,
            peek_timeout=peek_timeout,
            reuse_port=reuse_port,
            observer=observer,
        )
        self.max_pending = max_pending
        self.pending_bytes = pending_bytes
        #: Client → the stream of its route. Bounded by the routes' session capacities.
        self.pins: dict[Any, UDPStream] = {}
        self.max_pins = sum(s.sessions.capacity for s in self.routes.values()) + max_pending
        self.pending: dict[Any, _Pending] = {}
        self.serving = False
        self._transport: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def prepare(self) -> None:
        """Bind (BindError naming the routes and the address); `open` then `serve` start it."""
        sock = self._bind()
        if sock is None:
            return
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)

    async def open(self) -> None:
        """Wrap the socket in a transport and lend it to every route (nothing is served before
        `serve`: datagrams arriving meanwhile are dropped, as by a socket not yet bound)."""
        self.prepare()
        if self._transport is not None:
            return
        assert self._sock is not None
        transport, _ = await self.loop.create_datagram_endpoint(lambda: _Protocol(self), sock=self._sock)
        self._transport = transport
        local = self.local_addr
        assert local is not None
        for stream in self.routes.values():
            stream.attach(transport, local)

    def serve(self) -> None:
        self.serving = True
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())

    def close(self) -> None:
        """Stop serving; undecided clients are forgotten (none of their datagrams was relayed)."""
        self.serving = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        elif self._sock is not None:
            self._sock.close()
        self._sock = None
        for pending in self.pending.values():
            if pending.timer is not None:
                pending.timer.cancel()
        self.pending.clear()
        self.pins.clear()

    # -- undecided clients

    def unknown(self, data: bytes, addr: Any) -> None:
        """A datagram from a client with no route yet."""
        if not self.serving:
            return
        table = self.table
        if not table.needs_peek:  # only a fallback: nothing to read
            self._route(addr, [data], table.fallback, "")
            return
        pending = self.pending.get(addr)
        if pending is None:
            if len(self.pending) >= self.max_pending:
                # Full: a client whose first datagram decides alone (a whole Initial, or not
                # QUIC) is still routed, as it needs no state here; only the rest is dropped.
                outcome = QuicSniffer().feed(data)
                if outcome is None:
                    self._fail(addr, f"{self.max_pending} clients already waiting for a route", "limit")
                else:
                    self._decided(addr, [data], outcome)
                return
            pending = self.pending[addr] = _Pending()
            pending.timer = self.loop.call_later(self.peek_timeout, self._expired, addr)
        if pending.size + len(data) > self.pending_bytes:
            # Decided now, so nothing is held longer: this datagram leaves with the others.
            pending.datagrams.append(data)
            self._decide(addr, pending, SniffError(f"over {self.pending_bytes} bytes before a route"))
            return
        pending.datagrams.append(data)
        pending.size += len(data)
        outcome = pending.sniffer.feed(data)
        if outcome is not None:
            self._decide(addr, pending, outcome)

    def _expired(self, addr: Any) -> None:
        pending = self.pending.get(addr)
        if pending is not None:
            pending.timer = None
            self._decide(addr, pending, pending.sniffer.expired())

    def _decide(self, addr: Any, pending: _Pending, outcome: Sniffed | SniffError) -> None:
        del self.pending[addr]
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        self._decided(addr, pending.datagrams, outcome)

    def _decided(self, addr: Any, datagrams: list[bytes], outcome: Sniffed | SniffError) -> None:
        if isinstance(outcome, SniffError):
            # Undecidable is not hostile: the fallback (often a plain QUIC server) may know better.
            route = self.table.fallback
            why = f"{outcome.reason} and there is no fallback route"
        else:
            route = self.table.choose(outcome)
            what = f"sni {outcome.sni!r}" if outcome.sni is not None else f"protocol {outcome.protocol}"
            why = f"no route matches {what} and there is no fallback route"
        self._route(addr, datagrams, route, why)

    def _route(self, addr: Any, datagrams: list[bytes], route: str | None, why: str) -> None:
        if route is None:
            self._fail(addr, why, "no_route")
            return
        stream = self.routes[route]
        if len(self.pins) < self.max_pins:
            self.pins[addr] = stream
        for data in datagrams:
            session = stream.sessions.get(addr)
            if session is not None:
                session.send(data)
            else:
                stream.new_session(data, addr)

    def _fail(self, addr: Any, reason: str, drop_reason: str) -> None:
        emit, suppressed = self._failures.hit()
        if emit and log.isEnabledFor(logging.INFO):
            log.info(
                f"datagram dropped before routing: {reason}",
                extra={
                    **self.fields,
                    "client": format_hostport(addr[0], addr[1]),
                    "action": "peek",
                    "error": reason,
                    "suppressed": suppressed,
                },
            )
        if self.observer is not None:
            self.observer.datagram_dropped(self.name, drop_reason)

    async def _sweep(self) -> None:
        """Forget the pins of clients whose session ended (see the module docstring)."""
        while True:
            await asyncio.sleep(self.peek_timeout)
            pins = self.pins
            for addr in [a for a, stream in pins.items() if stream.sessions.get(a) is None]:
                del pins[addr]
