"""One listening socket for several routes: accept, admit, peek, choose a route, hand over.

Routes that share a listen address through ``match:`` keep one `TCPStream` each (their own pool,
limits, observer events and logs), but none of them binds: a `SharedListener` owns the socket
for the group and, per connection, in loop callbacks with one timer and no task:

1. **PROXY header** (when the listener receives it: every route of the group agrees on that
   setting, checked at load), read with `recv` into a bounded buffer, bounded by its own timeout.
2. **Global ACL** on the real client (the believed header's source), before any route is chosen:
   a denied client costs no peek. The chosen route's own ACL applies after the hand-over.
3. **Peek**: what has already arrived is looked at with ``MSG_PEEK`` (nothing consumed); when
   that decides, which under load is nearly always, the route gets the socket untouched and
   splices the first flight with the rest. Otherwise the bytes are read for real (consumed, into
   a buffer bounded by `Sniffer.limit`, at most ~16 KiB) and fed to the sans-I/O `Sniffer` until
   it decides or `peek_timeout` fires: a peeked socket stays readable, so waiting for the rest of
   a ClientHello with ``MSG_PEEK`` would spin (or need ``SO_RCVLOWAT`` juggling per read). Bytes
   read are handed on as the connection's initial bytes and reach the target first, unchanged.
4. **Hand-over** to the chosen route (`portway.stream.handoff.serve_accepted`), which continues
   the normal lifecycle; passthrough is spliced from there on.

A group whose table needs no peek (one fallback route, e.g. a lone ``tls:`` route) skips step 3:
no read and no delay. Failures (malformed or oversized hello, no route and no fallback, a
trickle past `peek_timeout`) close the connection with one rate-limited log line naming the
listener and the reason; the observer sees them under the listener's address as route name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from portway.addr import Network
from portway.events import CloseReason, ConnectionRecord, Observer
from portway.matching import MatchTable
from portway.proxy_header import UNTRUSTED, HeaderDone, HeaderOutcome, HeaderReader
from portway.sniff import (
    HELLO_PREFIX_LIMIT,
    HTTP_HEAD_LIMIT,
    REQUEST_LINE_LIMIT,
    Sniffed,
    Sniffer,
    SniffError,
)
from portway.stream.accept import Listener, serve_tcp_sockets
from portway.stream.base import Address, addr_str
from portway.stream.handoff import serve_accepted
from portway.stream.listen import PortGroup

if TYPE_CHECKING:
    from portway.access import AccessControl
    from portway.proxy_header import ProxyProtocolPolicy
    from portway.stream.tcp import TCPStream

__all__ = ["SharedListener"]

log = logging.getLogger("portway.shared")


class SharedListener(PortGroup["TCPStream"]):
    """The listening socket of a group of routes on one address (see the module docstring)."""

    KIND = socket.SOCK_STREAM

    def __init__(
        self,
        network: Network,
        host: str,
        port: int,
        routes: Mapping[str, TCPStream],
        table: MatchTable,
        *,
        peek_timeout: float = 3.0,
        proxy_protocol: ProxyProtocolPolicy | None = None,
        access: AccessControl | None = None,
        reuse_port: bool = False,
        observer: Observer | None = None,
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
        self.proxy_protocol = proxy_protocol
        self.access = access
        self.peeking: set[_Peek] = set()
        self._server: Listener | None = None
        self._attached = False
        #: Where `MSG_PEEK` copies to: one buffer per listener (the loop is single-threaded and the
        #: sniffer keeps its own copy), not a 16 KiB allocation per connection.
        self.scratch = bytearray(max(HELLO_PREFIX_LIMIT, HTTP_HEAD_LIMIT, REQUEST_LINE_LIMIT))

    def prepare(self) -> None:
        """Bind (BindError naming the routes and the address); serving starts in `serve`."""
        sock = self._bind()
        if sock is not None:
            with contextlib.suppress(OSError):  # inherited by accepted sockets on Linux
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def serve(self) -> None:
        self.prepare()
        assert self._sock is not None
        if self.access is not None and not self._attached:
            self.access.attach()
            self._attached = True
        self._server = serve_tcp_sockets(self.loop, self._sock, self._on_socket, self.fields)

    def close(self) -> None:
        """Stop accepting; connections still being peeked at are closed (none was relayed yet)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        elif self._sock is not None:
            self._sock.close()
        self._sock = None
        for peek in list(self.peeking):
            peek.close()
        if self._attached and self.access is not None:
            self._attached = False
            self.access.detach()

    def _on_socket(self, sock: socket.SocketType, peer: Any) -> None:
        _Peek(self, sock, peer).start()

    def failed(self, client: Address, reason: str, close_reason: CloseReason, started: float) -> None:
        """A connection closed before any route took it: one line per burst, and the observer."""
        emit, suppressed = self._failures.hit()
        if emit and log.isEnabledFor(logging.INFO):
            log.info(
                f"closed before routing: {reason}",
                extra={
                    **self.fields,
                    "client": addr_str(client),
                    "action": "peek",
                    "error": reason,
                    "suppressed": suppressed,
                },
            )
        observer = self.observer
        if observer is not None:
            observer.accepted(self.name, "tcp")
            observer.closed(
                ConnectionRecord.ending_now(self.name, "tcp", client, None, started, 0, 0, close_reason)
            )


class _Peek:
    """One accepted connection until a route takes it (or it is closed)."""

    __slots__ = ("buffer", "client", "listener", "local", "peer", "reader", "sniffer", "sock", "started",
                 "timer", "watching")  # fmt: skip

    def __init__(self, listener: SharedListener, sock: socket.SocketType, peer: Any) -> None:
        self.listener = listener
        self.sock = sock
        self.peer = peer
        self.client: Address = (peer[0], peer[1])
        self.local: Address | None = None
        self.reader: HeaderReader | None = None
        self.sniffer: Sniffer | None = None
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.watching = False
        self.started = time.time()

    def start(self) -> None:
        listener = self.listener
        policy = listener.proxy_protocol
        if policy is not None:
            with contextlib.suppress(OSError):  # a LOCAL header keeps it; the route needs it
                name = self.sock.getsockname()
                self.local = (name[0], name[1])
            step = policy.first_step(self.client[0])
            if step == "refuse":
                self._fail(UNTRUSTED, "error")
                return
            if step == "read":
                self.reader = HeaderReader(policy)
                self._readable()
                if self.reader is not None:
                    self._watch(policy.header_timeout)
                return
        self._admit()

    def _watch(self, timeout: float) -> None:
        """Wait for more bytes, for at most `timeout`. Only when the bytes already in the socket
        did not decide: under load a client's first flight has usually arrived by the time it is
        accepted, and then no reader, no timer and no extra loop turn are needed at all."""
        listener = self.listener
        if not self.watching:
            listener.loop.add_reader(self.sock.fileno(), self._readable)
            self.watching = True
            listener.peeking.add(self)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = listener.loop.call_later(timeout, self._expired)

    def _admit(self) -> None:
        listener = self.listener
        access = listener.access
        if access is not None and not access.admit(self.client[0], listener.name):
            self._close_quietly("acl_denied")
            return
        if not listener.table.needs_peek:
            self._hand_over(listener.table.fallback)
            return
        self.sniffer = sniffer = listener.table.sniffer()
        if self.buffer:  # bytes that came with the PROXY header
            outcome = sniffer.feed(self.buffer)
            if outcome is not None:
                self._decide(outcome)
                return
        elif self._peek_decided(sniffer):
            return
        self._readable()
        if self.sniffer is not None:
            self._watch(listener.peek_timeout)

    def _peek_decided(self, sniffer: Sniffer) -> bool:
        """The common case, without consuming anything: when what already arrived decides, the
        route gets the socket untouched and splices the first flight too (no copy, no extra
        send). Otherwise the bytes are read for real from here on (a peeked socket stays
        readable, so waiting for more with ``MSG_PEEK`` would spin)."""
        scratch = self.listener.scratch
        try:
            size = self.sock.recv_into(scratch, sniffer.limit, socket.MSG_PEEK)
        except OSError:
            return False  # nothing yet (or an error the real read reports)
        if not size:
            return False
        outcome = sniffer.feed(memoryview(scratch)[:size])
        if outcome is None:
            self.sniffer = self.listener.table.sniffer()  # the same bytes will be read again
            return False
        self._decide(outcome)
        return True

    def _readable(self) -> None:
        reader, sniffer = self.reader, self.sniffer
        if sniffer is not None and not self.buffer and self.watching:
            # Woken with nothing consumed yet: the whole first flight may be here now.
            if self._peek_decided(sniffer):
                return
            sniffer = self.sniffer
        room = reader.room() if reader is not None else (sniffer.limit - len(self.buffer) if sniffer else 0)
        try:
            data = self.sock.recv(max(room, 1))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_quietly("client_reset")
            return
        if reader is not None:
            self._header(reader.feed(data) if data else reader.end_of_stream())
        elif sniffer is not None:
            if data:
                self.buffer += data
                outcome = sniffer.feed(data)
            else:  # EOF is sticky: the route's engine sees it again on its first read
                outcome = sniffer.end_of_stream()
            if outcome is not None:
                self._decide(outcome)

    def _header(self, outcome: HeaderOutcome | None) -> None:
        if outcome is None:
            return
        self.reader = None
        if not isinstance(outcome, HeaderDone):
            self._fail(outcome.reason, "error")
            return
        self.client, self.local = outcome.addresses(self.client, self.local)
        self.buffer += outcome.rest
        self._admit()

    def _expired(self) -> None:
        self.timer = None
        if self.reader is not None:
            self._header(self.reader.expired())
        elif self.sniffer is not None:
            outcome = self.sniffer.expired()
            if isinstance(outcome, SniffError):
                self._fail(f"{outcome.reason} (peek_timeout)", "peek_timeout")
            else:
                self._decide(outcome)

    def _decide(self, outcome: Sniffed | SniffError) -> None:
        if isinstance(outcome, SniffError):
            self._fail(outcome.reason, "error")
            return
        route = self.listener.table.choose(outcome)
        if route is None:
            what = f"sni {outcome.sni!r}" if outcome.sni is not None else f"protocol {outcome.protocol}"
            self._fail(f"no route matches {what} and there is no fallback route", "error")
            return
        self._hand_over(route)

    def _stop(self) -> None:
        self.reader = None
        self.sniffer = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.watching:
            self.watching = False
            self.listener.loop.remove_reader(self.sock.fileno())
        self.listener.peeking.discard(self)

    def _hand_over(self, route: str | None) -> None:
        self._stop()
        assert route is not None  # a table without peeking always has its fallback
        stream = self.listener.routes[route]
        serve_accepted(
            stream, self.sock, self.peer, initial=bytes(self.buffer), client=self.client, local=self.local
        )

    def _fail(self, reason: str, close_reason: CloseReason) -> None:
        self.listener.failed(self.client, reason, close_reason, self.started)
        self.close()

    def _close_quietly(self, close_reason: CloseReason) -> None:
        observer = self.listener.observer
        if observer is not None:
            self.listener.failed(self.client, close_reason, close_reason, self.started)
        self.close()

    def close(self) -> None:
        self._stop()
        self.sock.close()
