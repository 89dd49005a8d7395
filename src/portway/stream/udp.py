"""The UDP stream: a session per client address, each with its own connected socket to the target.

Replies come back on the session's socket and leave through the listening socket, so the client
sees one peer. Datagrams are forwarded whole (up to 64 KiB) and in order: each direction is a
single callback chain with no task per datagram, unlike relays that spawn a goroutine or task per
datagram and so may reorder them.

Where the raw engine's compiled core is built (`stream/_fastpath.c`), neither direction enters
Python once a session is set up. The listening socket is an *inlet* on the engine's epoll set,
read with `recvmmsg`; a session's socket is a *lane* on the same set. Once the session's target
is set up and known to be up, the session *binds* its lane: the inlet sends that client's
datagrams straight to it, and the lane sends the target's replies out through the listening
socket, both counted in C (the idle sweep reads a flag). A client with no binding (new, still
being set up, or unbound because its socket failed or the pool's health changed) goes through
`_Listener.datagram_received` as with a transport, and the session decides there whether to
bind again or move. Sessions with an `on_read` hook get no lane (every datagram must pass the
hook), and routes on a shared port keep transports (the shared listener owns the socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from portway.addr import Network, format_hostport
from portway.events import CloseReason, ConnectionRecord, Observer
from portway.logs import BurstLog
from portway.proxy_protocol import build_v2
from portway.stream.base import Direction, Hook
from portway.stream.endpoint import Endpoint
from portway.stream.epollset import compiled, compiled_enabled, epoll_set_for
from portway.stream.sessions import SessionTable

if TYPE_CHECKING:
    from portway.access import AccessControl
    from portway.balance import TargetState
    from portway.limits import ClientLimits
    from portway.stream.pool import TargetPool

log = logging.getLogger("portway.udp")

#: Bytes held for a session whose socket is still being set up; more are dropped (UDP may). A
#: loop reads a whole burst in one go before the setup task runs, so this must hold a burst, yet
#: stay small enough that a flood of new clients cannot make setup queues a memory sink.
QUEUE_BYTES = 256 * 1024
#: Datagrams an on_read hook may have waiting before more are dropped.
QUEUE_LIMIT = 1024
#: A transport holding more than this unsent is not accepting more: drop rather than grow memory.
SEND_BUFFER_LIMIT = 1024 * 1024
#: Sweeps per idle timeout: expiry happens between 1 and 1.25 timeouts after the last datagram.
IDLE_TICKS = 4
#: Bigger kernel buffers absorb bursts (a DNS client firing many queries) instead of dropping.
SOCKET_BUFFER = 4 * 1024 * 1024


class _Session(asyncio.DatagramProtocol):
    """One client: its connected socket to its target and the datagrams waiting for it.

    The target is chosen when the session is created and kept for its life. If the pool marks
    it down, or it answers with ICMP port unreachable, the next datagram moves the client to
    another target: a new session object takes this one's place in the table (this one's
    `connection_lost` then removes nothing, since the table no longer maps the client to it).
    """

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "client",
        "counted",
        "dgrams_down",
        "dgrams_up",
        "exclude",
        "generation",
        "holding",
        "idle",
        "lane",
        "lane_sock",
        "member",
        "moved",
        "queue",
        "queued",
        "started",
        "stream",
        "transport",
        "unreachable",
    )

    def __init__(self, stream: UDPStream, client: Any) -> None:
        self.stream = stream
        self.client = client
        self.idle = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.queue: list[bytes] | None = []
        self.queued = 0
        #: The pool member this session relays to (-1 until set up) and the pool's health
        #: generation when it was picked: a different generation means "check it is still up".
        self.member = -1
        self.generation = stream.pool.generation
        self.holding: TargetState | None = None
        self.counted = False
        #: Set by ICMP unreachable from the target: the next datagram moves the session.
        self.unreachable = False
        #: Members this client already moved away from (they failed it).
        self.exclude: list[int] = []
        #: True once replaced by a session to another target: closing it then reports nothing.
        self.moved = False
        self.bytes_up = self.bytes_down = self.dgrams_up = self.dgrams_down = 0
        self.started = time.time()
        #: The compiled relay of this session's socket (None: an asyncio transport serves it).
        self.lane: compiled.Lane | None = None
        self.lane_sock: socket.socket | None = None

    def bind(self, lane: compiled.Lane) -> None:
        """Let the inlet relay this client's datagrams to `lane` without Python."""
        lane.bind()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    # client -> target
    def send(self, data: bytes) -> None:
        self.idle = 0
        self.dgrams_up += 1
        self.bytes_up += len(data)
        queue = self.queue
        if queue is not None:
            # Still setting up (the transport may exist before `ready()` flushed the queue):
            # everything queues until then, or a later datagram would overtake earlier ones.
            if self.queued + len(data) <= QUEUE_BYTES:
                queue.append(data)
                self.queued += len(data)
            return
        if (self.unreachable or self.generation != self.stream.pool.generation) and self.stream.maybe_move(
            self, data
        ):
            return
        self._forward(data)
        lane = self.lane
        if lane is not None and not lane.bound:  # where it should be (checked above): the next skip Python
            self.bind(lane)

    def ready(self) -> None:
        queue, self.queue = self.queue, None
        for data in queue or ():
            self._forward(data)
        lane = self.lane
        if lane is not None and not self.unreachable and self.generation == self.stream.pool.generation:
            self.bind(lane)

    def _forward(self, data: bytes) -> None:
        """Send a datagram already counted and already through any hook."""
        lane = self.lane
        if lane is not None:
            lane.send(data)
            return
        transport = self.transport
        if (
            transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() < SEND_BUFFER_LIMIT  # type: ignore[attr-defined]
        ):
            transport.sendto(data)

    # target -> client
    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.idle = 0
        self.dgrams_down += 1
        self.bytes_down += len(data)
        self.stream.reply(data, self.client)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from the target surfaces here on a connected socket: the target
        # is down for now, which is no reason to drop the session, let alone the listener; the
        # next datagram moves to another target if the pool has one.
        self.unreachable = True
        self.stream.target_error(self, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream.sessions.remove(self.client, self)
        self.transport = None

    def shutdown(self) -> None:
        self.stream.sessions.remove(self.client, self)
        self.close("shutdown")

    def up(self) -> tuple[int, int]:
        """Client bytes and datagrams so far (a bound lane counts those it relays itself)."""
        lane = self.lane
        if lane is None:
            return self.bytes_up, self.dgrams_up
        return self.bytes_up + lane.bytes_up, self.dgrams_up + lane.dgrams_up

    def down(self) -> tuple[int, int]:
        """Reply bytes and datagrams so far (a lane counts the replies it relays itself)."""
        lane = self.lane
        if lane is None:
            return self.bytes_down, self.dgrams_down
        return self.bytes_down + lane.bytes_down, self.dgrams_down + lane.dgrams_down

    def attach_lane(self, sock: socket.socket, inlet: compiled.Inlet, io: compiled.EpollSet) -> None:
        """Serve the connected, non-blocking `sock` with a compiled lane instead of a transport;
        raises OSError when the epoll set refuses it (the caller closes `sock`)."""
        lane = compiled.Lane(io, sock, inlet, self.client, self.error_received)
        lane.start()
        self.lane, self.lane_sock = lane, sock

    def _drop_lane(self, lane: compiled.Lane) -> None:
        """Fold the lane's counts in, stop it, close the socket, and leave the table (what a
        transport's `connection_lost` does)."""
        self.bytes_up, self.dgrams_up = self.up()
        self.bytes_down, self.dgrams_down = self.down()
        self.lane = None
        lane.close()
        sock, self.lane_sock = self.lane_sock, None
        if sock is not None:
            io = epoll_set_for(self.stream.loop)
            if io is not None:
                io.forget(sock.fileno())
            sock.close()
        self.stream.sessions.remove(self.client, self)

    def close(self, reason: CloseReason = "shutdown") -> None:
        self.queue = None
        stream = self.stream
        if not self.moved:
            self.moved = True  # report and release once
            if stream.observer is not None:
                stream.report(self, reason)
            if self.counted:
                self.counted = False
                stream.release_client(self.client[0])
        if self.holding is not None:
            stream.pool.released(self.holding)
            self.holding = None
        if stream._ended is not None:
            stream._ended.set()
        lane = self.lane
        if lane is not None:
            self._drop_lane(lane)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def take_over(self, old: _Session) -> None:
        """Continue `old` (moving to another target): its counters, limits and history."""
        self.bytes_up, self.dgrams_up = old.up()
        self.bytes_down, self.dgrams_down = old.down()
        self.started = old.started
        self.counted, old.counted = old.counted, False
        self.exclude = [*old.exclude, old.member]
        old.moved = True


class _HookedSession(_Session):
    """Runs `on_read` on every datagram, in order, before forwarding it."""

    __slots__ = ("backlog", "running")

    def __init__(self, stream: UDPStream, client: Any) -> None:
        super().__init__(stream, client)
        self.backlog: list[tuple[Direction, bytes]] = []
        self.running = False

    def send(self, data: bytes) -> None:
        self._enqueue("client", data)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.idle = 0
        self.dgrams_down += 1
        self.bytes_down += len(data)
        self._enqueue("target", data)

    def _enqueue(self, direction: Direction, data: bytes) -> None:
        if len(self.backlog) >= QUEUE_LIMIT:
            return
        self.backlog.append((direction, data))
        if not self.running:
            self.running = True
            self.stream.loop.create_task(self._run_hooks())

    async def _run_hooks(self) -> None:
        stream = self.stream
        assert stream.on_read is not None
        try:
            while self.backlog:
                direction, data = self.backlog.pop(0)
                try:
                    await stream.on_read(stream.hook_context(self.client, direction, data))
                except Exception as exc:
                    log.info(
                        "closed by on_read hook",
                        extra={
                            **stream.fields,
                            "client": _client_str(self.client),
                            "action": "reject",
                            "error": repr(exc),
                        },
                    )
                    self.backlog.clear()
                    stream.sessions.remove(self.client, self)
                    self.close("error")
                    return
                if direction == "client":
                    _Session.send(self, data)
                else:
                    self.stream.reply(data, self.client)
        finally:
            self.running = False


class _RelayingSession(_Session):
    """Prepends a PROXY v2 DGRAM header to every datagram for the target (an extension: the
    spec describes the DGRAM form but few targets read it, so it is off unless configured)."""

    __slots__ = ("prefix",)

    def __init__(self, stream: UDPStream, client: Any) -> None:
        super().__init__(stream, client)
        self.prefix = stream.relay_header_for(client)

    def send(self, data: bytes) -> None:
        super().send(self.prefix + data)

    def bind(self, lane: compiled.Lane) -> None:
        lane.bind(self.prefix)


class _RelayingHookedSession(_HookedSession):
    """An on_read hook here sees each client datagram as it goes to the target, header first."""

    __slots__ = ("prefix",)

    def __init__(self, stream: UDPStream, client: Any) -> None:
        super().__init__(stream, client)
        self.prefix = stream.relay_header_for(client)

    def send(self, data: bytes) -> None:
        super().send(self.prefix + data)


class _Listener(asyncio.DatagramProtocol):
    __slots__ = ("inlet", "stream")

    def __init__(self, stream: UDPStream) -> None:
        self.stream = stream
        #: The listening socket as a compiled inlet (None: a loop transport reads it, no lanes).
        #: Travels with the listener when a reload hands it to the next stream.
        self.inlet: compiled.Inlet | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        # Before the descriptor can be reused: a lane must not send to whatever gets its number.
        if self.inlet is not None:
            self.inlet.close()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        session = self.stream.sessions.get(addr)
        if session is not None:
            session.send(data)
        else:
            self.stream.new_session(data, addr)

    def error_received(self, exc: Exception) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("listener error", extra={**self.stream.fields, "error": str(exc)})


class _InletTransport(asyncio.DatagramTransport):
    """The listening socket served by a compiled inlet instead of a loop transport: what the
    stream asks of a transport (replies from Python, close), with the reading done in C."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, io: compiled.EpollSet, sock: socket.socket, listener: _Listener
    ) -> None:
        sock.setblocking(False)
        super().__init__({"socket": sock, "sockname": sock.getsockname(), "peername": None})
        self._loop, self._io, self._sock, self._listener = loop, io, sock, listener
        self._closing = False
        self.inlet = compiled.Inlet(io, sock, listener.datagram_received, listener.error_received)
        self.inlet.start()
        listener.inlet = self.inlet
        listener.connection_made(self)

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing:
            return
        # A full buffer drops the reply, as UDP may (a transport would queue it, unbounded).
        with contextlib.suppress(OSError):
            self._sock.sendto(data, addr)

    def get_write_buffer_size(self) -> int:
        return 0  # nothing is buffered: a reply the kernel does not take is dropped

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.inlet.close()
        self._io.forget(self._sock.fileno())
        self._loop.call_soon(self._lost)

    def abort(self) -> None:
        self.close()

    def _lost(self) -> None:
        try:
            self._listener.connection_lost(None)
        finally:
            self._sock.close()


def _client_str(addr: Any) -> str:
    return format_hostport(addr[0], addr[1])


class UDPStream(Endpoint):
    """A UDP listener relaying each client's datagrams to one target, and the replies back."""

    KIND = socket.SOCK_DGRAM
    ACCEPT_MESSAGE = "new session"
    LOG = log

    def __init__(
        self,
        network: Network,
        listen: str,
        target: str,
        *,
        name: str = "",
        idle_timeout: float = 300.0,
        max_sessions: int = 10_000,
        resolve_interval: float = 60.0,
        reuse_port: bool = False,
        access: AccessControl | None = None,
        relay_proxy_protocol: bool = False,
        pool: TargetPool | None = None,
        max_connections: int | None = None,
        client_limits: ClientLimits | None = None,
        observer: Observer | None = None,
        shared: bool = False,
    ) -> None:
        """`access` admits clients by address when their session is created (a denied source gets
        no session and is never sent anything); `relay_proxy_protocol` prepends a v2 DGRAM PROXY
        header to every datagram for the target. `shared`: the route sits behind a
        `portway.stream.shared_udp.SharedUDPListener`, which owns the socket and lends this
        stream its transport for replies (see `attach`), so the stream never binds."""
        if network not in ("udp", "udp4", "udp6"):
            raise ValueError(f"UDPStream needs a udp network, not {network!r}")
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
        self.idle_timeout = idle_timeout
        self.access = access
        self.relay_proxy_protocol = relay_proxy_protocol
        self._attached = False
        self.sessions: SessionTable[Any, _Session] = SessionTable(max_sessions, IDLE_TICKS)
        self.pre_dial: Hook | None = None
        self.on_read: Hook | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._session_class: type[_Session] = _Session
        self._full_log = BurstLog(10.0)
        self._setup_log = BurstLog(5.0)
        self._target_log = BurstLog(10.0)
        self._listener: _Listener | None = None
        #: The stream this one took the listening socket over from on a reload: its sessions go
        #: on (on their old settings) until they end; new clients get this stream's settings.
        self.inherited: UDPStream | None = None
        #: Set once another stream took over this one's socket: closing then leaves it open.
        self.handed_over = False
        #: False while draining: datagrams from unknown clients are dropped, not new sessions.
        self.accepting = True
        #: Set whenever a session ends, while a drain waits for the last one.
        self._ended: asyncio.Event | None = None
        self.shared = shared
        #: The inlet's `unbind_all` while this stream watches its pool's health for it.
        self._unbind_all: Callable[[], None] | None = None

    def attach(self, transport: asyncio.DatagramTransport, local: tuple[str, int]) -> None:
        """Shared: reply through the shared listener's `transport`, bound at `local`."""
        self.transport = transport
        self._local = local
        self._refresh_fields()

    def _configure(self, sock: socket.socket) -> None:
        _grow_buffers(sock)

    async def listen_and_serve(self, pre_dial: Hook | None = None, on_read: Hook | None = None) -> None:
        try:
            await self.prepare()
        except BaseException:
            self.stop_pool()
            raise
        assert self._sock is not None or self.shared
        self.pre_dial = pre_dial
        self.on_read = on_read
        if self.relay_proxy_protocol:
            self._session_class = _RelayingHookedSession if on_read is not None else _RelayingSession
        else:
            self._session_class = _HookedSession if on_read is not None else _Session
        if self.access is not None and not self._attached:
            self.access.attach()
            self._attached = True
        old = self.inherited
        if self.shared:
            pass  # the shared listener feeds `new_session` and lends its transport (`attach`)
        elif old is not None and old._listener is not None and old.transport is not None:
            # A reload kept this listening address: take over the socket and its transport, so
            # the old stream's sessions keep their replies flowing from the same address.
            self._listener = old._listener
            self._listener.stream = self
            self.transport = old.transport
            old.handed_over = True
        else:
            self._listener = _Listener(self)
            listener = self._listener
            io = epoll_set_for(self.loop) if compiled is not None and compiled_enabled() else None
            if compiled is not None and isinstance(io, compiled.EpollSet):
                assert self._sock is not None
                self.transport = _InletTransport(self.loop, io, self._sock, listener)
            else:
                transport, _ = await self.loop.create_datagram_endpoint(lambda: listener, sock=self._sock)
                self.transport = transport
        if self._listener is not None and self._listener.inlet is not None:
            # A health change may mean a session must move: every client goes through Python
            # once more, where its session checks (`maybe_move`) and binds again.
            self._unbind_all = self._listener.inlet.unbind_all
            self.pool.watch(self._unbind_all)
        self._sweeper = self.loop.create_task(self._sweep_idle())

    def adopt(self, old: UDPStream) -> None:
        """Before `prepare`: serve on `old`'s socket (same address) instead of binding a new one."""
        self.inherited = old
        self._sock = old._sock
        self._local = old._local
        self._refresh_fields()

    async def prepare(self) -> None:
        if self.shared or (self.inherited is not None and self._sock is not None):
            self.loop = asyncio.get_running_loop()
            await self.pool.start()  # the socket is adopted; only the pool needs starting
            return
        await super().prepare()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._unbind_all is not None:
            self.pool.unwatch(self._unbind_all)
            self._unbind_all = None
        self.stop_pool()
        if self._attached and self.access is not None:
            self._attached = False
            self.access.detach()
        if self.handed_over or self.shared:
            pass  # the socket belongs to the stream that took it over, or to the shared listener
        elif self.transport is not None:
            if self._listener is not None and self._listener.inlet is not None:
                self._listener.inlet.close()
            if not self.transport.is_closing():
                self.transport.close()
        elif self._sock is not None:
            self._sock.close()
        self.transport = None
        self._sock = None
        self.inherited = None
        for session in self.sessions:
            self.sessions.remove(session.client, session)
            session.close("shutdown")
        await asyncio.sleep(0)  # let the transports' close callbacks run before we return

    def live(self) -> list[Any]:
        return list(self.sessions)

    async def drain(self, timeout: float | None) -> None:
        """Serve the sessions there are, and no new client, for up to `timeout` seconds (None:
        until they all idle out), then close.

        Like TCP connections on a reload or shutdown: a game or VPN client is not cut off by an
        unrelated change. The listening socket stays open meanwhile (it carries the replies),
        unless another stream took it over.
        """
        self.accepting = False
        self._ended = asyncio.Event()
        if self.sessions:
            async with contextlib.AsyncExitStack() as stack:
                if timeout is not None:
                    await stack.enter_async_context(asyncio.timeout(timeout))
                with contextlib.suppress(TimeoutError):
                    while self.sessions:
                        await self._ended.wait()
                        self._ended.clear()
        await self.close()

    def find_inherited(self, client: Any) -> _Session | None:
        """A session of a stream this one took the socket over from (reloads chain them)."""
        old = self.inherited
        while old is not None:
            session = old.sessions.get(client)
            if session is not None:
                return session
            old = old.inherited
        return None

    # -- called by the listener and sessions

    def reply(self, data: bytes, client: Any) -> None:
        transport = self.transport
        if (
            transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() < SEND_BUFFER_LIMIT  # type: ignore[attr-defined]
        ):
            transport.sendto(data, client)

    def relay_header_for(self, client: Any) -> bytes:
        """The v2 DGRAM header for `client`'s datagrams: to the listener's address as bound (a
        wildcard listener cannot tell which local address a datagram came to without
        IP_PKTINFO, so the header then carries the wildcard)."""
        local = self._local or (self.listen_host, self.listen_port)
        try:
            return build_v2((client[0], client[1]), local, datagram=True)
        except ValueError:
            return build_v2(None, None, datagram=True)

    def new_session(self, data: bytes, client: Any) -> None:
        # Admission happens here only: a session exists only for an admitted client, so the
        # per-datagram path of existing sessions never consults the ACL. Datagrams from a
        # denied source land here each time, but the decision is cached and the denial log
        # only counts repeats.
        if self.inherited is not None:
            old = self.find_inherited(client)
            if old is not None:
                old.send(data)
                return
        if not self.accepting:
            return
        observer = self.observer
        if self.access is not None and not self.access.admit(client[0], self.name):
            if observer is not None:
                observer.datagram_dropped(self.name, "acl_denied")
            return
        if self.sessions.full():
            emit, suppressed = self._full_log.hit()
            if emit:
                log.warning(
                    "session limit reached, datagram dropped",
                    extra={
                        **self.fields,
                        "client": _client_str(client),
                        "action": "refuse",
                        "max_sessions": self.sessions.capacity,
                        "suppressed": suppressed,
                    },
                )
            if observer is not None:
                observer.datagram_dropped(self.name, "limit")
            return
        counted = False
        if self.max_connections or self.client_limits is not None:
            reason = self.over_limit(len(self.sessions), client[0])
            if reason is not None:
                self.log_limited(_client_str(client), reason)
                if observer is not None:
                    observer.datagram_dropped(self.name, "limit")
                return
            counted = True
        session = self._session_class(self, client)
        session.counted = counted
        self.sessions.add(client, session)
        session.send(data)
        if self.conn_log is not None or log.isEnabledFor(logging.INFO):
            self.log_accepted(_client_str(client))
        if observer is not None:
            observer.accepted(self.name, "udp")
        self.loop.create_task(self._open(session))

    def maybe_move(self, session: _Session, data: bytes) -> bool:
        """Called for a datagram of a session whose target may be down: move the client to
        another target (True: `data` went with it), or keep going where it is (False)."""
        pool = self.pool
        session.generation = pool.generation
        member = self.current_member(session)
        # A target a reload removed (-1) keeps its sessions until the grace period closes them.
        if pool.trivial or (not session.unreachable and (member < 0 or pool.is_up(member))):
            session.unreachable = False
            return False
        moved = self._session_class(self, session.client)
        moved.take_over(session)
        self.sessions.remove(session.client, session)
        self.sessions.add(session.client, moved)
        session.close()
        moved.dgrams_up -= 1  # counted once already, by the session it replaces
        moved.bytes_up -= len(data)
        moved.send(data)
        self.loop.create_task(self._open(moved))
        return True

    def current_member(self, session: _Session) -> int:
        """The index of the session's target in the pool as it is now (-1: a reload removed it).

        A reload may add, remove or reorder targets under a live session, so the index it was
        given at setup is refreshed from the target state it holds, which survives reloads.
        """
        holding = session.holding
        if holding is not None:
            index = self.pool.balancer.index_of(holding)
            session.member = -1 if index is None else index
        return session.member

    def target_error(self, session: _Session, exc: Exception) -> None:
        """The target refused a datagram (ICMP unreachable): logged like a failed TCP dial."""
        if self.current_member(session) >= 0:
            self.pool.dial_failed(session.member)
        emit, suppressed = self._target_log.hit()
        if emit:
            target = self.pool.key(session.member) if session.member >= 0 else str(self.pool)
            log.warning(
                "target unreachable",
                extra={
                    **self.fields,
                    "client": _client_str(session.client),
                    "target": target,
                    "action": "dial",
                    "error": getattr(exc, "strerror", None) or str(exc),
                    "suppressed": suppressed,
                },
            )

    def report(self, session: _Session, reason: CloseReason) -> None:
        assert self.observer is not None
        target = session.holding.spec.key if session.holding is not None else None
        bytes_up, dgrams_up = session.up()
        bytes_down, dgrams_down = session.down()
        self.observer.closed(
            ConnectionRecord.ending_now(
                self.name,
                "udp",
                (session.client[0], session.client[1]),
                target,
                session.started,
                bytes_up,
                bytes_down,
                reason,
                dgrams_up,
                dgrams_down,
            )
        )

    async def _open(self, session: _Session) -> None:
        client = session.client
        if not await self.passes_pre_dial(client):
            self.sessions.remove(client, session)
            session.close("error")
            return
        if session.queue is None:  # closed while the hook ran
            return
        pool = self.pool
        tried = list(session.exclude)
        last: OSError | None = None
        state: TargetState | None = None
        # A compiled lane where there is one to have (see the module's notes).
        listener = self._listener
        inlet = listener.inlet if listener is not None and not self.shared and self.on_read is None else None
        io = epoll_set_for(self.loop) if inlet is not None else None
        lane_io = io if compiled is not None and isinstance(io, compiled.EpollSet) else None
        while (index := pool.pick(client[0], tried)) is not None:
            sock = None
            # Kept across the await below: a reload meanwhile may move the index, not the state.
            state = pool.member_state(index)
            try:
                family, addr = pool.addresses(index)[0]
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.connect(addr)
                _grow_buffers(sock)
                session.member = index
                if lane_io is not None and inlet is not None:
                    session.attach_lane(sock, inlet, lane_io)
                else:
                    await self.loop.create_datagram_endpoint(lambda: session, sock=sock)
            except OSError as exc:
                if sock is not None:
                    sock.close()
                last = exc
                pool.dial_failed(state)
                tried.append(index)
                continue
            break
        else:
            self.sessions.remove(client, session)
            session.member = -1
            if last is not None:
                emit, suppressed = self._setup_log.hit()
                if emit:
                    log.error(
                        "session setup failed",
                        extra={
                            **self.fields,
                            "client": _client_str(client),
                            "action": "dial",
                            "error": last.strerror or str(last),
                            "suppressed": suppressed,
                        },
                    )
            if self.observer is not None:
                self.observer.datagram_dropped(self.name, "no_target")
            session.close("dial_refused" if last is not None else "no_target")
            return
        assert state is not None
        session.holding = pool.acquired(state)
        self.current_member(session)
        if session.queue is None:  # the stream closed while we were setting up
            session.close()
            return
        session.ready()

    async def _sweep_idle(self) -> None:
        interval = self.idle_timeout / IDLE_TICKS
        while True:
            await asyncio.sleep(interval)
            for session in self.sessions:
                lane = session.lane
                if lane is not None and lane.touched:  # replies relayed in C since the last sweep
                    lane.touched = False
                    session.idle = 0
            for client, session in self.sessions.tick():
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "session expired",
                        extra={**self.fields, "client": _client_str(client), "action": "expire"},
                    )
                session.close("idle_timeout")


def _grow_buffers(sock: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
