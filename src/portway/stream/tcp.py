"""The TCP stream: accept, dial the target, and relay both ways with half-close and backpressure.

Two engines move the bytes. On Linux, plain forwarding (no `on_read` hook) uses the raw-socket
engine in `tcp_splice.py`: accepted socket, non-blocking dial, then `os.splice` through pooled
pipes once a direction moves bulk (small messages are copied), so bulk bytes never enter user
space and a new connection costs a few loop callbacks.

The transport engine below is the portable one, and the one `on_read` hooks need (they must see
the bytes): two asyncio protocols wired to each other's transports; on uvloop the reads,
writes and buffering all happen in C and Python only sees one callback per chunk. Every transport
call goes through the guards below: uvloop 0.23 was seen to abort the whole process ("double free
or corruption") when a closing transport was written to or closed again during connection churn,
and a crash of the proxy is an outage for every route.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, cast

from portway.addr import Network
from portway.events import CloseReason, ConnectionRecord, Observer
from portway.logs import BurstLog
from portway.proxy_header import (
    UNTRUSTED,
    HeaderDone,
    HeaderOutcome,
    HeaderReader,
    HeaderRefused,
    relay_header,
)
from portway.stream import splice
from portway.stream.accept import Listener, serve_tcp, serve_tcp_sockets
from portway.stream.base import Address, Direction, Hook, addr_str
from portway.stream.endpoint import Endpoint
from portway.stream.epollset import epoll_set_for
from portway.stream.resolve import SockAddr
from portway.stream.tcp_splice import DialWatch, SpliceConn

if TYPE_CHECKING:
    import ssl

    from portway.access import AccessControl
    from portway.balance import TargetState
    from portway.certificates import ServerCertificates
    from portway.limits import ClientLimits
    from portway.proxy_header import ProxyProtocolPolicy
    from portway.stream.pool import TargetPool

log = logging.getLogger("portway.tcp")

#: Pause reading from one side while the other side's send buffer holds more than this. Together
#: with one read chunk it bounds the memory a connection can make us hold, whatever peers do.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
#: Bytes a client may send before the target answers the dial; past this we stop reading.
PENDING_LIMIT = 256 * 1024

_FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

Engine = Literal["auto", "splice", "transport"]
#: Overrides `engine="auto"` (tests and benchmarks compare the engines with it).
ENGINE_ENV = "PORTWAY_TCP_ENGINE"


class NoTarget(Exception):
    """Every target of the pool is down (the pool logs it, at a bounded rate)."""


# --- transport guards -------------------------------------------------------------------------


def _write(transport: asyncio.BaseTransport | None, data: bytes) -> None:
    if transport is not None and not transport.is_closing():
        transport.write(data)  # type: ignore[attr-defined]


def _close(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None and not transport.is_closing():
        transport.close()


def _abort(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None and not transport.is_closing():
        transport.abort()  # type: ignore[attr-defined]


def _write_eof(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None and not transport.is_closing():
        try:
            if transport.can_write_eof():  # type: ignore[attr-defined]
                transport.write_eof()  # type: ignore[attr-defined]
        except (OSError, RuntimeError):
            transport.abort()  # type: ignore[attr-defined]


def _pause(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None and not transport.is_closing():
        transport.pause_reading()  # type: ignore[attr-defined]


def _resume(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None and not transport.is_closing():
        transport.resume_reading()  # type: ignore[attr-defined]


# --- the connection ---------------------------------------------------------------------------


class _Client(asyncio.Protocol):
    """The client side of one proxied connection; it owns the connection's state."""

    __slots__ = (
        "client",
        "client_eof",
        "closed",
        "counted",
        "dial_task",
        "down",
        "holding",
        "idle",
        "member",
        "peer",
        "pending",
        "pending_size",
        "reason",
        "started",
        "stream",
        "target",
        "target_eof",
        "transport",
        "up",
    )

    def __init__(self, stream: TCPStream) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.target: asyncio.Transport | None = None
        self.peer: _Target | None = None
        self.client: Address = ("", 0)
        self.pending: list[bytes] | None = []
        self.pending_size = 0
        self.client_eof = False
        self.target_eof = False
        self.closed = False
        self.idle = 0
        #: Bytes relayed client -> target and back, for the DEBUG line when the connection ends.
        self.up = 0
        self.down = 0
        self.dial_task: asyncio.Task[None] | None = None
        #: The pool member dialed (-1: none yet); whether it counts this connection as active;
        #: whether the client holds a place in the per-client limits.
        self.member = -1
        self.holding: TargetState | None = None
        self.counted = False
        #: Why the connection ended, for the observer (set where the reason is known).
        self.reason: CloseReason = "normal"
        self.started = 0.0

    # client -> proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._accepted(transport)
        self._admitted()

    def _accepted(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if peername:
            self.client = (peername[0], peername[1])
        self.stream.conns.add(self)
        observer = self.stream.observer
        if observer is not None:
            self.started = time.time()
            observer.accepted(self.stream.name, "tcp")
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _admitted(self) -> None:
        stream = self.stream
        if stream.log_conns and (stream.conn_log is not None or log.isEnabledFor(logging.INFO)):
            stream.log_accepted(addr_str(self.client))  # formatted only for a log that takes it
        if stream.limited:
            reason = stream.over_limit(len(stream.conns) - 1, self.client[0])
            if reason is not None:
                stream.log_limited(addr_str(self.client), reason)
                self.reason = "limit"
                _abort(self.transport)
                return
            self.counted = True
        self.dial_task = stream.loop.create_task(self._dial())

    def data_received(self, data: bytes) -> None:
        self.idle = 0
        self.up += len(data)
        if self.target is not None:
            _write(self.target, data)
            return
        # Still dialing: hold a bounded amount, then let the kernel's buffer take the rest.
        if self.pending is not None:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > PENDING_LIMIT:
                _pause(self.transport)

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.target is not None:
            if self.stream.half_close:
                _write_eof(self.target)
            self._maybe_finish()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        stream = self.stream
        if exc is not None and self.reason == "normal":
            self.reason = "client_reset"
        if self.peer is not None and log.isEnabledFor(logging.DEBUG):
            stream.log_closed(self.client, self.up, self.down, exc)
        if stream.observer is not None:
            self._report(stream.observer)
        if self.counted:
            self.counted = False
            stream.release_client(self.client[0])
        if self.holding is not None:
            stream.pool.released(self.holding)
            self.holding = None
        stream.forget(self)
        if self.dial_task is not None and not self.dial_task.done():
            self.dial_task.cancel()
        self.closed = True
        if exc is not None:
            _abort(self.target)
        else:
            _close(self.target)
        self.transport = None

    def pause_writing(self) -> None:
        _pause(self.target)

    def resume_writing(self) -> None:
        _resume(self.target)

    # target -> proxy, called by _Target

    def target_data(self, data: bytes) -> None:
        self.idle = 0
        self.down += len(data)
        _write(self.transport, data)

    def target_eof_received(self) -> None:
        self.target_eof = True
        if self.stream.half_close:
            _write_eof(self.transport)
        self._maybe_finish()

    def target_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            if self.reason == "normal":
                self.reason = "target_reset"
            _abort(self.transport)
        else:
            _close(self.transport)
        self.target = None

    def _maybe_finish(self) -> None:
        if (self.client_eof and self.target_eof) or not self.stream.half_close:
            # Both directions are done (or, without half-close, one is): close() flushes
            # whatever is still buffered, then closes.
            _close(self.transport)
            _close(self.target)

    def idle_tick(self) -> int:
        """Called by the stream's sweeper; every read resets `idle` to 0."""
        self.idle += 1
        return self.idle

    def idle_expired(self) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "idle timeout",
                extra={**self.stream.fields, "client": addr_str(self.client), "action": "idle"},
            )
        self.reason = "idle_timeout"
        _abort(self.transport)
        _abort(self.target)

    def shutdown(self) -> None:
        if not self.closed and self.reason == "normal":
            self.reason = "shutdown"
        if self.dial_task is not None and not self.dial_task.done():
            self.dial_task.cancel()
        _close(self.transport)
        _close(self.target)

    # dialing

    async def _dial(self) -> None:
        stream = self.stream
        if not await stream.passes_pre_dial(self.client):
            self.reason = "error"
            _abort(self.transport)
            return
        if self.closed:
            return
        peer = stream.target_protocol(self)
        try:
            transport = await stream.dial(peer, self)
        except asyncio.CancelledError:
            raise
        except NoTarget:
            self.reason = "no_target"
            _close(self.transport)
            return
        except (OSError, TimeoutError) as exc:
            self.reason = "dial_timeout" if isinstance(exc, TimeoutError) else "dial_refused"
            stream.dial_failed(self.client, exc)
            _close(self.transport)
            return
        if self.closed or self.transport is None:
            _close(transport)
            return
        self.peer = peer
        self.target = transport
        self.target_connected(transport)
        self.dial_task = None

    def target_connected(self, transport: asyncio.Transport) -> None:
        """The dial succeeded: send what the client sent meanwhile, and its EOF if it came."""
        pending, self.pending = self.pending, None
        if pending:
            self.forward_pending(pending)
        if self.client_eof:
            if self.stream.half_close:
                _write_eof(transport)
            else:
                self._maybe_finish()

    def forward_pending(self, pending: list[bytes]) -> None:
        for chunk in pending:
            _write(self.target, chunk)
        if self.pending_size > PENDING_LIMIT:
            _resume(self.transport)

    def _report(self, observer: Observer) -> None:
        stream = self.stream
        target = self.holding.spec.key if self.holding is not None else None
        observer.closed(
            ConnectionRecord.ending_now(
                stream.name, "tcp", self.client, target, self.started, self.up, self.down, self.reason
            )
        )


class _Target(asyncio.Protocol):
    """The target side: forwards everything to the client's handler."""

    __slots__ = ("conn",)

    def __init__(self, conn: _Client) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def data_received(self, data: bytes) -> None:
        self.conn.target_data(data)

    def eof_received(self) -> bool:
        self.conn.target_eof_received()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.target_lost(exc)

    def pause_writing(self) -> None:
        _pause(self.conn.transport)

    def resume_writing(self) -> None:
        _resume(self.conn.transport)


# --- hooked variants: only used when an on_read hook is set, so the plain path pays nothing ----


class _HookedClient(_Client):
    """Runs `on_read` after each read, before the bytes go on; reading that side pauses meanwhile."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self.target is None:
            super().data_received(data)
            return
        self.up += len(data)
        _pause(self.transport)
        self.stream.loop.create_task(self._run_hook("client", [data]))

    def target_data(self, data: bytes) -> None:
        self.down += len(data)
        _pause(self.target)
        self.stream.loop.create_task(self._run_hook("target", [data]))

    def forward_pending(self, pending: list[bytes]) -> None:
        _pause(self.transport)
        self.stream.loop.create_task(self._run_hook("client", pending))

    async def _run_hook(self, direction: Direction, chunks: list[bytes]) -> None:
        stream = self.stream
        assert stream.on_read is not None
        for data in chunks:
            try:
                await stream.on_read(stream.hook_context(self.client, direction=direction, data=data))
            except Exception as exc:
                log.info(
                    "closed by on_read hook",
                    extra={
                        **stream.fields,
                        "client": addr_str(self.client),
                        "action": "reject",
                        "error": repr(exc),
                    },
                )
                _abort(self.transport)
                _abort(self.target)
                return
            self.idle = 0
            _write(self.target if direction == "client" else self.transport, data)
        _resume(self.transport if direction == "client" else self.target)


# --- admission: only used when a route has an ACL or speaks the PROXY protocol -----------------


class _AdmittingClient(_Client):
    """Admits a connection before anything is dialed, then may tell the target who the client is.

    Admission runs in `connection_made` and, when a PROXY header is expected, in the callbacks
    that follow until the header is complete:

    1. PROXY header (only if the listener has a policy and the peer is a trusted proxy): bytes
       are collected into `header` and fed to the sans-I/O parser; one timer (not a task) bounds
       the wait. Bytes after the header are queued for the target untouched. An untrusted peer
       is closed in required mode and, in mixed mode, served as itself without its first bytes
       ever being inspected, so a header it sends is never believed.
    2. ACL on the real client (the believed header's source, else the socket peer): a denied
       connection is aborted at once, nothing is dialed.
    3. Dial; once connected, a PROXY header for the target goes out before any client byte.

    Once admitted, `data_received` costs one extra attribute test per chunk; plain routes use
    `_Client` and pay nothing at all.
    """

    __slots__ = ("local", "reader", "timer")

    def __init__(self, stream: TCPStream) -> None:
        super().__init__(stream)
        #: Reads the PROXY header at the start of the connection; None once past it.
        self.reader: HeaderReader | None = None
        self.timer: asyncio.TimerHandle | None = None
        #: The address the client connected to (our socket, or the believed header's destination).
        self.local: Address | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._accepted(transport)
        sockname = transport.get_extra_info("sockname")
        if sockname:
            self.local = (sockname[0], sockname[1])
        policy = self.stream.proxy_protocol
        if policy is not None:
            step = policy.first_step(self.client[0])
            if step == "read":
                self.reader = HeaderReader(policy)
                self.timer = self.stream.loop.call_later(policy.header_timeout, self._header_expired)
                return
            if step == "refuse":
                self._refuse(UNTRUSTED)
                return
        self._admit()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:
            super().data_received(data)
        else:
            self._header_outcome(reader.feed(data))

    def eof_received(self) -> bool:
        reader = self.reader
        if reader is None:
            return super().eof_received()
        outcome = reader.end_of_stream()
        self._header_outcome(outcome)
        if isinstance(outcome, HeaderDone):
            return super().eof_received()
        return True  # already aborted: the transport must not close itself a second time

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header()
        super().connection_lost(exc)

    # the header phase

    def _header_expired(self) -> None:
        self.timer = None
        if self.reader is not None:
            self._header_outcome(self.reader.expired())

    def _header_outcome(self, outcome: HeaderOutcome | None) -> None:
        if outcome is None:
            return
        self._stop_header()
        if isinstance(outcome, HeaderRefused):
            self._refuse(outcome.reason)
            return
        self.client, self.local = outcome.addresses(self.client, self.local)
        if outcome.rest:
            _Client.data_received(self, outcome.rest)  # not dialed yet, so this only queues
        self._admit()

    def _stop_header(self) -> None:
        self.reader = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _refuse(self, reason: str) -> None:
        self._stop_header()
        self.stream.refused(self.client, reason)
        self.reason = "error"
        _abort(self.transport)

    # the ACL, then the dial

    def _admit(self) -> None:
        access = self.stream.access
        if access is not None and not access.admit(self.client[0], self.stream.name):
            self.reason = "acl_denied"
            _abort(self.transport)
            return
        self._admitted()

    def target_connected(self, transport: asyncio.Transport) -> None:
        version = self.stream.relay_version
        if version:
            _write(transport, relay_header(version, self.client, self.local))
        super().target_connected(transport)


class _AdmittingHookedClient(_AdmittingClient, _HookedClient):
    __slots__ = ()


# --- the stream ---------------------------------------------------------------------------------


class TCPStream(Endpoint):
    """A TCP listener forwarding every connection to one target.

    >>> stream = TCPStream("tcp4", "127.0.0.1:0", "127.0.0.1:22")
    >>> await stream.listen_and_serve()            # doctest: +SKIP
    """

    KIND = socket.SOCK_STREAM
    ACCEPT_MESSAGE = "accepted"
    LOG = log

    def __init__(
        self,
        network: Network,
        listen: str,
        target: str,
        *,
        name: str = "",
        connect_timeout: float = 5.0,
        idle_timeout: float = 0.0,
        half_close: bool = True,
        resolve_interval: float = 60.0,
        reuse_port: bool = False,
        log_connections: bool = True,
        access: AccessControl | None = None,
        proxy_protocol: ProxyProtocolPolicy | None = None,
        relay_proxy_protocol: int = 0,
        engine: Engine = "auto",
        pool: TargetPool | None = None,
        max_connections: int | None = None,
        client_limits: ClientLimits | None = None,
        observer: Observer | None = None,
        shared: bool = False,
        tls: ServerCertificates | None = None,
        target_tls: ssl.SSLContext | None = None,
    ) -> None:
        """`access` admits clients by address; `proxy_protocol` makes the listener read PROXY
        headers from trusted proxies; `relay_proxy_protocol` (1 or 2, 0 = off) sends a header of
        that version to the target before any client byte. `half_close=False` ends a
        connection at its first FIN, once the bytes before it are through (nginx's default).

        `engine`: "splice" relays on raw sockets (zero-copy with os.splice where it exists),
        "transport" with asyncio transports; "auto" (the default, or $PORTWAY_TCP_ENGINE) picks
        splice on Linux unless an `on_read` hook needs the bytes in user space.

        `shared`: the route sits behind a `portway.stream.shared.SharedListener`, which owns the
        socket, accepts, reads the PROXY header and picks the route; this stream never binds and
        takes connections through `portway.stream.handoff.serve_accepted`. `tls` terminates TLS
        (transport engine only); `target_tls` re-encrypts towards the target."""
        if network not in ("tcp", "tcp4", "tcp6"):
            raise ValueError(f"TCPStream needs a tcp network, not {network!r}")
        super().__init__(
            network,
            listen,
            target,
            name=name,
            resolve_interval=resolve_interval,
            reuse_port=reuse_port,
            pool=pool,
            max_connections=max_connections,
            client_limits=client_limits,
            observer=observer,
        )
        #: Whether new connections pass the route or per-client limits (one test when not).
        self.limited = bool(self.max_connections) or client_limits is not None
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.half_close = half_close
        self.log_conns = log_connections
        if relay_proxy_protocol not in (0, 1, 2):
            raise ValueError(f"PROXY protocol version must be 1 or 2, not {relay_proxy_protocol!r}")
        self.access = access
        self.proxy_protocol = proxy_protocol
        self.relay_version = relay_proxy_protocol
        if engine == "auto":
            engine = cast(Engine, os.environ.get(ENGINE_ENV) or "auto")
        if engine not in ("auto", "splice", "transport"):
            raise ValueError(f"TCP engine must be auto, splice or transport, not {engine!r}")
        self.engine: Engine = engine
        self._attached = False
        self._refusals = BurstLog(5.0)
        self.conns: set[_Client | SpliceConn] = set()
        #: The loop's pipe pool when the raw engine relays with splice (set when serving starts).
        self.pipe_pool: splice.PipePool | None = None
        #: Connections left that skip the raw engine's early read of the client (see
        #: `SpliceConn._start_pump`): > 0 after a client had sent nothing yet.
        self.quiet_clients = 0
        #: Where the raw engine's connections register readiness callbacks: the engine's epoll
        #: set once the route splices (`_use_pipes`), else the loop.
        self.io: splice.Readiness | None = None
        #: The epoll set's `add_writer` for a dial whose socket the pump takes over (registered
        #: edge-triggered at once on the compiled set); None: `io.add_writer`.
        self.add_connecting: Callable[..., object] | None = None
        #: The raw engine's connect deadlines (one timer for all dials; made on first use).
        self.dial_watch: DialWatch | None = None
        self.pre_dial: Hook | None = None
        self.on_read: Hook | None = None
        self._server: Listener | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None
        self._dial_errors = BurstLog(5.0)
        self.shared = shared
        self.tls = tls
        self.target_tls = target_tls
        self._prepared = False

    # -- Stream protocol

    async def prepare(self) -> None:
        if not self.shared:
            await super().prepare()
        elif not self._prepared:  # no socket of its own: the shared listener binds
            self.loop = asyncio.get_running_loop()
            await self.pool.start()
            self._prepared = True

    async def listen_and_serve(self, pre_dial: Hook | None = None, on_read: Hook | None = None) -> None:
        try:
            await self.prepare()
        except BaseException:
            self.stop_pool()
            raise
        self.pre_dial = pre_dial
        self.on_read = on_read
        if self.shared:
            self._serve_handed()
            return
        assert self._sock is not None
        # Chosen once here, so routes without admission run the plain classes untouched.
        admitting = self.access is not None or self.proxy_protocol is not None or self.relay_version != 0
        if self.access is not None and not self._attached:
            self.access.attach()
            self._attached = True
        if self.uses_splice_engine():
            if splice.HAVE_SPLICE:
                self._use_pipes()
            # Accepted sockets inherit TCP_NODELAY on Linux: one syscall per listener, not per client.
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start = SpliceConn.start_admitting if admitting else SpliceConn.start_plain

            def on_socket(sock: socket.SocketType, peer: Any) -> None:
                start(SpliceConn(self, sock, peer))

            self._server = serve_tcp_sockets(self.loop, self._sock, on_socket, self.fields)
        else:
            await self._serve_transports(admitting)
        if self.idle_timeout > 0:
            self._sweeper = self.loop.create_task(self._sweep_idle())

    def _serve_handed(self) -> None:
        """Get ready for connections a shared listener hands over (it does the accepting)."""
        if self.access is not None and not self._attached:
            self.access.attach()
            self._attached = True
        if self.uses_splice_engine() and splice.HAVE_SPLICE:
            self._use_pipes()
        if self.tls is not None:
            self.tls.watch(self.loop)
        if self.idle_timeout > 0:
            self._sweeper = self.loop.create_task(self._sweep_idle())

    def live(self) -> list[Any]:
        return list(self.conns)

    def _use_pipes(self) -> None:
        """The raw engine splices: take the loop's pipe pool, and its epoll set, looked up once
        here rather than per connection."""
        self.pipe_pool = splice.pipe_pool_for(self.loop)
        with contextlib.suppress(OSError):  # no descriptor left for the set: the loop works
            self.io = epoll_set_for(self.loop) or self.loop
            self.add_connecting = getattr(self.io, "add_connecting", None)

    def uses_splice_engine(self) -> bool:
        """Whether connections run on the raw-socket engine (decided when serving starts)."""
        if self.on_read is not None or self.engine == "transport" or self.tls is not None:
            return False  # an on_read hook (and TLS) needs the bytes in user space
        return self.engine == "splice" or splice.HAVE_SPLICE

    async def _serve_transports(self, admitting: bool) -> None:
        assert self._sock is not None
        on_read = self.on_read
        factory: Any
        if on_read is not None:
            factory = _AdmittingHookedClient if admitting else _HookedClient
        else:
            factory = _AdmittingClient if admitting else _Client
        self._server = await serve_tcp(self.loop, self._sock, lambda: factory(self), self.fields)

    async def close(self) -> None:
        """Stop accepting, then close every live connection (buffered bytes are flushed first)."""
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self._sock.close()
        self._sock = None
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.tls is not None:
            self.tls.stop_watching()
        self.stop_pool()
        if self._attached and self.access is not None:
            self._attached = False
            self.access.detach()
        for conn in list(self.conns):
            conn.shutdown()
        if self._server is not None:
            server, self._server = self._server, None
            await server.wait_closed()

    async def drain(self, timeout: float | None) -> None:
        """Stop accepting and wait up to `timeout` (None: no limit) for live connections to
        finish on their own."""
        if self._server is not None:
            self._server.close()
        if self.conns:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)
        await self.close()

    # -- internals used by the connection objects

    target_protocol = _Target

    async def dial(self, protocol: _Target, conn: _Client) -> asyncio.Transport:
        """Connect to a target the pool picks, failing over to the next healthy one (refused,
        unreachable, or slower than its share of the connect timeout), all within the connect
        timeout; `conn.member` says which one answered."""
        pool = self.pool
        client = conn.client[0]
        tried: list[int] = []
        last: BaseException | None = None
        observer = self.observer
        started = self.loop.time() if observer is not None else 0.0
        budget = pool.attempt_timeout(self.connect_timeout)
        # The state of the member being dialed: it stays right when a reload moves the index.
        dialing: TargetState | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                while (index := pool.pick(client, tried)) is not None:
                    conn.member = index
                    dialing = pool.member_state(index)
                    try:
                        async with asyncio.timeout(budget):
                            transport, position, last = await self._dial_member(index, protocol)
                    except TimeoutError:
                        last = TimeoutError()  # this target is slow: try the next one
                    else:
                        if transport is not None:
                            addr = pool.addresses(index)[position] if position else None
                            pool.dial_succeeded(dialing, addr)
                            conn.holding = pool.acquired(dialing)
                            if observer is not None:
                                observer.dialed(self.name, dialing.spec.key, self.loop.time() - started)
                            return transport
                    pool.dial_failed(dialing)
                    dialing = None
                    tried.append(index)
        except TimeoutError:
            if dialing is not None:
                pool.dial_failed(dialing)
            raise
        if last is None:
            raise NoTarget
        raise last

    async def _dial_member(
        self, index: int, protocol: _Target
    ) -> tuple[asyncio.Transport | None, int, BaseException | None]:
        """Try each address of pool member `index`: (transport, which address, None), or
        (None, 0, the last error). Running out of descriptors is raised: no target helps."""
        pool = self.pool
        last: BaseException | None = None
        for position, addr in enumerate(pool.addresses(index)):
            try:
                transport, _ = await self._connect(addr, protocol, pool.members[index].host)
            except OSError as exc:
                if exc.errno in _FD_EXHAUSTED:
                    raise
                last = exc
                continue
            return transport, position, None
        return None, 0, last

    async def _connect(
        self, addr: SockAddr, protocol: _Target, name: str = ""
    ) -> tuple[asyncio.Transport, Any]:
        family, (host, port) = addr
        if self.target_tls is not None:  # tls.relay: verified against the target's configured name
            return await self.loop.create_connection(
                lambda: protocol, host, port, family=family, ssl=self.target_tls, server_hostname=name or host
            )
        return await self.loop.create_connection(lambda: protocol, host, port, family=family)

    def forget(self, conn: _Client | SpliceConn) -> None:
        """A connection ended: it no longer counts as live (and a drain may be over)."""
        conns = self.conns
        conns.discard(conn)
        if self._drained is not None and not conns:
            self._drained.set()

    def dial_failed(self, client: Address, exc: BaseException) -> None:
        reason = (
            "timed out" if isinstance(exc, TimeoutError) else (getattr(exc, "strerror", None) or str(exc))
        )
        exhausted = isinstance(exc, OSError) and exc.errno in _FD_EXHAUSTED
        if exhausted:
            emit, suppressed = self._dial_errors.hit()
            if not emit:
                return
            reason += " (out of file descriptors; further failures are counted, not logged)"
            if suppressed:
                reason += f"; {suppressed} similar failures since the last report"
        log.error(
            "dial failed",
            extra={**self.fields, "client": addr_str(client), "action": "dial", "error": reason},
        )

    def log_closed(self, client: Address, up: int, down: int, exc: BaseException | None) -> None:
        """The DEBUG line for a finished connection: how much went each way, and why it ended."""
        log.debug(
            "closed",
            extra={
                **self.fields,
                "client": addr_str(client),
                "action": "close",
                "bytes_up": up,
                "bytes_down": down,
                "error": repr(exc) if exc is not None else None,
            },
        )

    def refused(self, peer: Address, reason: str) -> None:
        """A connection closed during admission for a PROXY protocol reason (rate-limited log)."""
        emit, suppressed = self._refusals.hit()
        if emit and log.isEnabledFor(logging.INFO):
            log.info(
                f"refused: {reason}",
                extra={
                    **self.fields,
                    "client": addr_str(peer),
                    "action": "refuse",
                    "error": reason,
                    "suppressed": suppressed,
                },
            )

    async def _sweep_idle(self) -> None:
        # Activity resets a per-connection tick counter (one store on the hot path); the sweeper
        # counts ticks, so the timeout is honoured within a quarter of its length.
        ticks = 4
        interval = self.idle_timeout / ticks
        while True:
            await asyncio.sleep(interval)
            for conn in list(self.conns):
                if conn.idle_tick() > ticks:
                    conn.idle_expired()
