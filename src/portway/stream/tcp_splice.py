"""The raw-socket TCP engine: accepted socket in, non-blocking dial, then a splice pump.

`TCPStream` uses this engine for plain forwarding on Linux (no `on_read` hook): bulk bytes never
enter user space (small messages are copied through one shared buffer, cheaper than a pipe
round trip), and a new connection costs a handful of loop callbacks instead of the transport
engine's task, future, two transports and two protocol objects.

One `SpliceConn` per connection, in four phases, each driven by loop callbacks (never a task,
except for an async `pre_dial` hook):

1. **Admission** (only when the route has an ACL or a PROXY policy): a PROXY header is read with
   `recv` into a bounded buffer and fed to the sans-I/O parser, with one `call_later` timer for
   the wait; then the ACL decides on the real client. A denied client is reset, nothing dialed.
2. **Dial**: the route's pool picks a target; `socket()` + `connect_ex` (EINPROGRESS) +
   `add_writer`; the `SO_ERROR` check on writability tells success from refusal. On the
   compiled core with nothing to send first, the pump watches the connect instead and starts
   relaying in C (`_dial_compiled`), telling Python only what it must know. The target's
   addresses are tried in order, then the next healthy target the pool picks, all under one
   connect timeout, so a client never sees a dead target while another is up. The client is not
   watched meanwhile: whatever it sends waits in the kernel's socket buffer, which also bounds
   what it can make us hold.
3. **Initial bytes** (admission only): a relay PROXY header, then the bytes read past the
   received header, are sent before the pump starts, so nothing can overtake them.
4. **Pump**: the compiled pump (`splice.engine_pump`; `SplicePump` where the core was not
   built) relays both ways with half-close. It starts by reading the client at
   once (most clients speak first, so their bytes are already queued: one wake-up saved; a
   route whose clients wait for a banner stops trying, see `_start_pump`). When it ends,
   both sockets are closed
   here, exactly once, after every reader and writer on them has been removed: uvloop misbehaves
   on callbacks left registered on a closed (or reused) descriptor.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from portway.events import CloseReason, ConnectionRecord
from portway.proxy_header import UNTRUSTED, HeaderOutcome, HeaderReader, HeaderRefused, relay_header
from portway.stream.base import Address, addr_str
from portway.stream.epollset import EPOLL_FAILED, EPOLL_SETS, compiled
from portway.stream.splice import CopyPump, engine_pump

if TYPE_CHECKING:
    from portway.access import AccessControl
    from portway.balance import TargetState
    from portway.events import Observer
    from portway.logs import ConnectionLog
    from portway.proxy_header import ProxyProtocolPolicy
    from portway.stream.base import Hook
    from portway.stream.pool import TargetPool
    from portway.stream.resolve import SockAddr
    from portway.stream.splice import PipePool, Readiness, RelayPump


class TCPRoute(Protocol):
    """What a connection needs from the listener that accepted it (`TCPStream` is the one).

    A protocol rather than an import of `TCPStream`: the stream module builds these
    connections, so the dependency runs one way only.
    """

    name: str
    loop: asyncio.AbstractEventLoop
    fields: dict[str, str]
    pool: TargetPool
    observer: Observer | None
    access: AccessControl | None
    proxy_protocol: ProxyProtocolPolicy | None
    relay_version: int
    connect_timeout: float
    half_close: bool
    pipe_pool: PipePool | None
    log_conns: bool
    conn_log: ConnectionLog | None
    limited: bool
    pre_dial: Hook | None
    quiet_clients: int
    io: Readiness | None
    add_connecting: Callable[..., object] | None
    dial_watch: DialWatch | None

    @property
    def conns(self) -> set[Any]: ...
    async def passes_pre_dial(self, client: Any) -> bool: ...
    def log_accepted(self, client: str) -> None: ...
    def over_limit(self, live: int, client: str) -> str | None: ...
    def log_limited(self, client: str, reason: str) -> None: ...
    def release_client(self, client: str) -> None: ...
    def refused(self, peer: Address, reason: str) -> None: ...
    def dial_failed(self, client: Address, exc: BaseException) -> None: ...
    def log_closed(self, client: Address, up: int, down: int, exc: BaseException | None) -> None: ...
    def forget(self, conn: Any) -> None: ...


__all__ = ["DialWatch", "SpliceConn", "TCPRoute"]

log = logging.getLogger("portway.tcp")

_FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: SOCK_NONBLOCK makes the new socket non-blocking without a second syscall (Linux).
_SOCK_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)
_NONBLOCK_STREAM = socket.SOCK_STREAM | _SOCK_NONBLOCK
_CONNECT_PENDING = (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EALREADY)

#: After a client had sent nothing by the time its target answered (a server-speaks-first
#: protocol: SSH, SMTP, MySQL), this many connections skip the early read, which would fail.
_QUIET_SKIP = 64

#: Less time than this left of the connect timeout is none: fail rather than start a dial.
_TIME_LEFT = 0.001

#: The compiled core's dial (socket, TCP_NODELAY and connect in one call, see `_fastpath.c`), for
#: IPv4 and IPv6 targets of connections on the compiled epoll set.
_compiled_connect = compiled.connect if compiled is not None else None
_COMPILED_SET = compiled.EpollSet if compiled is not None else None
_COMPILED_PUMP = compiled.Pump if compiled is not None else None
_INET = (socket.AF_INET, socket.AF_INET6)


def _connect(family: int, address: Any) -> tuple[socket.SocketType | None, int]:
    """Start a non-blocking dial with TCP_NODELAY, as `_fastpath.connect` does: (socket, 0)
    once connecting, (None, errno) if it failed at once; OSError if no socket could be made."""
    sock = _socket.socket(family, _NONBLOCK_STREAM)
    try:
        if not _SOCK_NONBLOCK:
            sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(address)
    except OSError as exc:
        sock.close()
        return None, exc.errno or errno.EIO
    if err == 0 or err in _CONNECT_PENDING:
        return sock, 0
    sock.close()
    return None, err


class DialWatch:
    """The connect deadlines of one route's dials, behind a single loop timer.

    A timer per dial (`call_later` + `cancel`) cost 1.4 µs of a ~75 µs connection on uvloop,
    for a deadline that almost never fires. Every dial of a route gets the same timeout, so
    deadlines come in insertion order: a dict keeps them, a finished dial removes its entry,
    and one timer, set for the oldest deadline, expires what is due and re-arms for the next.
    Used for routes with one target; a pool's per-target shares still get their own timers.
    """

    __slots__ = ("_loop", "_pending", "_timeout", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._pending: dict[SpliceConn, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, conn: SpliceConn) -> None:
        """Start timing `conn`'s dial; `conn._dial_expired()` runs if it is still there at the end."""
        deadline = self._loop.time() + self._timeout
        self._pending[conn] = deadline
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire)

    def discard(self, conn: SpliceConn) -> None:
        self._pending.pop(conn, None)

    def _expire(self) -> None:
        self._timer = None
        pending = self._pending
        now = self._loop.time()
        while pending:
            conn, deadline = next(iter(pending.items()))
            if deadline > now:
                self._timer = self._loop.call_at(deadline, self._expire)
                return
            del pending[conn]
            conn._dial_expired()


# Phases; numbers so that "still before the pump" is one comparison.
_ADMITTING = 0
_DIALING = 1
_SENDING = 2
_PUMPING = 3
_CLOSED = 4


class SpliceConn:
    """One proxied connection on raw sockets; created by the accept loop, closes itself."""

    __slots__ = (
        "addr_index",
        "addrs",
        "client",
        "client_sock",
        "counted",
        "deadline",
        "dial_task",
        "dialed_at",
        "dialing",
        "holding",
        "idle",
        "initial",
        "io",
        "last_moved",
        "local",
        "phase",
        "pump",
        "reader",
        "reason",
        "started",
        "stream",
        "target",
        "target_addr",
        "target_sock",
        "timer",
        "tried",
        "watched",
    )

    def __init__(self, stream: TCPRoute, sock: socket.SocketType, peer: tuple[Any, ...]) -> None:
        self.stream = stream
        self.client_sock = sock
        self.client: Address = (peer[0], peer[1])
        self.target_sock: socket.SocketType | None = None
        self.target_addr: SockAddr | None = None
        #: The pool member being dialed or relayed to (-1: none yet), its addresses (a snapshot)
        #: and the next one to try; `tried` lists members that failed (None until one does).
        self.target = -1
        self.addrs: list[SockAddr] = []
        self.addr_index = 0
        self.tried: list[int] | None = None
        #: The state of the member being dialed: it stays right when a reload moves the index.
        self.dialing: TargetState | None = None
        #: When the whole dial (failover included) must be done, for pools of more than one.
        self.deadline = 0.0
        #: Holds a place in the target's active count / the per-client limit until closed.
        self.counted = False
        #: The target's state while this connection counts as one of its active ones.
        self.holding: TargetState | None = None
        #: Why the connection ended, for the observer (set where the reason is known).
        self.reason: CloseReason = "normal"
        self.started = 0.0
        self.dialed_at = 0.0
        self.pump: RelayPump | None = None
        self.timer: asyncio.TimerHandle | None = None
        #: True while the route's `DialWatch` times this connection's dial (one-target routes).
        self.watched = False
        self.dial_task: asyncio.Task[None] | None = None
        #: Bytes that must reach the target before the pump starts (relay header, bytes after
        #: a received PROXY header); None when there are none.
        self.initial: bytes | None = None
        #: Reads the PROXY header at the start of the connection; None otherwise.
        self.reader: HeaderReader | None = None
        self.local: Address | None = None
        self.phase = _ADMITTING
        #: Where this connection's readiness callbacks live: the engine's own epoll set with the
        #: splice pump (one epoll_ctl per socket instead of libuv's handle churn), else the loop.
        self.io: Readiness = stream.io or stream.loop
        self.idle = 0
        self.last_moved = 0
        stream.conns.add(self)
        observer = stream.observer
        if observer is not None:
            self.started = time.time()
            observer.accepted(stream.name, "tcp")

    # -- admission ---------------------------------------------------------------------------

    def start_plain(self) -> None:
        """No ACL, no PROXY protocol: log and dial at once (the fast path)."""
        stream = self.stream
        if stream.log_conns and (stream.conn_log is not None or log.isEnabledFor(logging.INFO)):
            stream.log_accepted(addr_str(self.client))  # formatted only for a log that takes it
        if stream.limited:
            reason = stream.over_limit(len(stream.conns) - 1, self.client[0])
            if reason is not None:
                stream.log_limited(addr_str(self.client), reason)
                self.reason = "limit"
                self._close()
                return
            self.counted = True
        if stream.pre_dial is not None:
            self._start_pre_dial()
        else:
            self._dial()

    def start_admitting(self) -> None:
        """Read a PROXY header first if the policy wants one from this peer, then the ACL."""
        stream = self.stream
        try:
            name = self.client_sock.getsockname()
            self.local = (name[0], name[1])
        except OSError:
            self.local = None
        policy = stream.proxy_protocol
        if policy is not None:
            step = policy.first_step(self.client[0])
            if step == "read":
                self.reader = HeaderReader(policy)
                self.io.add_reader(self.client_sock.fileno(), self._on_header_readable)
                self.timer = stream.loop.call_later(policy.header_timeout, self._header_expired)
                return
            if step == "refuse":
                self._refuse(UNTRUSTED)
                return
        self._admit()

    def start_handed(self, client: Address, local: Address | None, initial: bytes) -> None:
        """Taken over from a shared listener, which already read the PROXY header (`client`,
        `local` are what it believed) and consumed `initial` while peeking: those bytes go to
        the target first, then the pump splices the rest. Continues with the route's ACL."""
        self.client = client
        if local is None and self.stream.relay_version:
            try:
                name = self.client_sock.getsockname()
                local = (name[0], name[1])
            except OSError:
                local = None
        self.local = local
        self.initial = initial or None
        self._admit()

    def _on_header_readable(self) -> None:
        reader = self.reader
        if reader is None or self.phase != _ADMITTING:
            return
        try:
            data = self.client_sock.recv(reader.room())
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close()
            return
        # On EOF the pump reads the end of stream again from the socket later: EOF is sticky.
        self._header_outcome(reader.feed(data) if data else reader.end_of_stream())

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
            self.initial = outcome.rest
        self._admit()

    def _stop_header(self) -> None:
        if self.reader is not None:
            self.reader = None
            self.io.remove_reader(self.client_sock.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _refuse(self, reason: str) -> None:
        self._stop_header()
        self.stream.refused(self.client, reason)
        self.reason = "error"
        self._close()

    def _admit(self) -> None:
        stream = self.stream
        access = stream.access
        if access is not None and not access.admit(self.client[0], stream.name):
            self.reason = "acl_denied"
            self._close()
            return
        version = stream.relay_version
        if version:
            relay = relay_header(version, self.client, self.local)
            self.initial = relay + self.initial if self.initial else relay
        self.start_plain()

    def _start_pre_dial(self) -> None:
        self.dial_task = self.stream.loop.create_task(self._pre_dial())

    async def _pre_dial(self) -> None:
        try:
            passed = await self.stream.passes_pre_dial(self.client)
        finally:
            self.dial_task = None
        if not passed:
            self.reason = "error"
            self._close()
            return
        if self.phase == _ADMITTING:
            self._dial()

    # -- dial --------------------------------------------------------------------------------

    def _dial(self) -> None:
        stream = self.stream
        self.phase = _DIALING
        if stream.observer is not None:
            self.dialed_at = stream.loop.time()
        pool = stream.pool
        if pool.trivial:
            # One target: its dial gets the whole connect timeout, and there is nothing to
            # pick (what `_next_target` would ask the pool), so it is dialed at once.
            watch = stream.dial_watch
            if watch is None:
                watch = stream.dial_watch = DialWatch(stream.loop, stream.connect_timeout)
            watch.add(self)
            self.watched = True
            self._dial_member(0, None)
            return
        self.deadline = stream.loop.time() + stream.connect_timeout
        self._next_target(None)

    def _arm(self) -> None:
        """Time the dial of the target just picked: its share of what is left of the timeout."""
        stream = self.stream
        loop = stream.loop
        if self.timer is not None:
            self.timer.cancel()
        share = stream.pool.attempt_timeout(stream.connect_timeout)
        self.timer = loop.call_later(min(share, max(0.0, self.deadline - loop.time())), self._dial_expired)

    def _next_target(self, last: OSError | None) -> None:
        """Ask the pool for a target not tried yet and dial it, or give up with the last error."""
        pool = self.stream.pool
        index = pool.pick(self.client[0], self.tried or ())
        if index is None:
            if last is None:
                self.reason = "no_target"
                self._close()
            else:
                self._dial_failed(last)
            return
        self._dial_member(index, last)

    def _dial_member(self, index: int, last: OSError | None) -> None:
        """Dial pool member `index` from its first address (a pool of one is not timed per
        target: its dial has the whole connect timeout)."""
        pool = self.stream.pool
        self.target = index
        self.dialing = pool.member_state(index)
        self.addrs = pool.addresses(index)
        self.addr_index = 0
        if not pool.trivial:
            self._arm()
        self._try_next(last)

    def _target_failed(self, last: OSError) -> None:
        """Every address of the current target failed: count it, then try another target."""
        self._release_target()
        if self.dialing is not None:
            self.stream.pool.dial_failed(self.dialing)
        if self.tried is None:
            self.tried = [self.target]
        else:
            self.tried.append(self.target)
        self._next_target(last)

    def _release_target(self) -> None:
        """A compiled dial counted the connection on the target it is leaving (see _dial_compiled)."""
        holding = self.holding
        if holding is not None:
            self.holding = None
            holding.release()

    def _try_next(self, last: OSError | None) -> None:
        """Connect to the current target's next address, or move on to another target."""
        addresses = self.addrs
        while self.addr_index < len(addresses):
            addr = addresses[self.addr_index]
            self.addr_index += 1
            family, sockaddr = addr
            dial = _compiled_connect
            if dial is None or type(self.io) is not _COMPILED_SET or family not in _INET:
                dial = _connect
            try:
                sock, err = dial(family, sockaddr)
            except OSError as exc:
                if exc.errno in _FD_EXHAUSTED:
                    self._dial_failed(exc)
                    return
                last = exc
                continue
            if sock is None:
                last = OSError(err, os.strerror(err))
                continue
            self.target_sock = sock
            self.target_addr = addr
            try:
                if dial is _compiled_connect and self.initial is None and self.stream.pipe_pool is not None:
                    self._dial_compiled(sock)
                else:
                    add = self.stream.add_connecting
                    (self.io.add_writer if add is None else add)(sock.fileno(), self._on_connected)
            except (OSError, RuntimeError):
                self.reason = "error"
                self._close()
            return
        self._target_failed(last if last is not None else OSError(errno.EHOSTUNREACH, "no target address"))

    def _dial_compiled(self, sock: socket.SocketType) -> None:
        """Hand the dial to a compiled pump, which launches itself once `sock` connects: no
        Python call between the connect and the relay unless something here must learn of it
        (`notify`: passive health to reset, metrics, an address to prefer next time)."""
        stream = self.stream
        pool = stream.pool
        state = self.dialing
        assert state is not None
        notify = stream.observer is not None or self.addr_index > 1 or pool.success_is_news(state)
        if not notify and self.holding is None:
            # Counted on its target from the dial rather than the connect (as HAProxy counts a
            # connection being set up as the server's): given back if the dial moves on.
            self.holding = state.acquire()
        io = self.io
        assert type(io) is _COMPILED_SET  # (what `_try_next` checked)
        pump = _COMPILED_PUMP(io, self.client_sock, sock, self._pump_done, stream.pipe_pool)
        if not stream.half_close:
            pump.half_close = False
        self.pump = pump
        pump.dial(self._dialed, self._read_early(), notify)

    def _dialed(self, code: int) -> None:
        """What a compiled pump's dial reports: an errno (failed: try the next address or
        target), 0 (connected and relaying) or -1 (the client had not spoken by then)."""
        if code < 0:
            self.stream.quiet_clients = _QUIET_SKIP
            return
        sock = self.target_sock
        if sock is None or self.phase != _DIALING:
            return
        if code:
            self._abandon_dial()  # (the pump is spent: it already let go of the socket)
            self._try_next(OSError(code, os.strerror(code)))
            return
        self._connected()
        self.phase = _PUMPING

    def _on_connected(self) -> None:
        sock = self.target_sock
        if sock is None or self.phase != _DIALING:
            return
        io = self.io
        if isinstance(io, EPOLL_SETS) and not io.ready_events & EPOLL_FAILED:
            err = 0  # writable and no error: connected (a failed connect always sets EPOLLERR)
        else:
            try:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as exc:
                err = exc.errno or errno.EIO
        if err:
            self._abandon_dial()
            self._try_next(OSError(err, os.strerror(err)))
            return
        self._connected()
        initial = self.initial
        if initial is not None:
            self.initial = None
            self.io.remove_writer(sock.fileno())
            self._send_initial(initial)
            return
        self._start_pump(sock, connecting=True)

    def _abandon_dial(self) -> None:
        """Give up on the dial in flight: stop what watches its socket, then close the socket."""
        sock = self.target_sock
        if sock is None:
            return
        self.target_sock = None
        pump = self.pump
        if pump is not None:
            # A compiled dial: its pump watches the socket. Stopped and dropped before the
            # socket closes, so that nothing later (finish() in _close) acts on a descriptor
            # number the process may have given to another connection by then.
            self.pump = None
            pump.close()
        else:
            self.io.remove_writer(sock.fileno())
        self._forget(sock)
        sock.close()

    def _connected(self) -> None:
        """The dial succeeded: stop its clock, tell the pool, count the connection on its target."""
        self._stop_timers()
        stream = self.stream
        pool = stream.pool
        state = self.dialing
        assert state is not None
        # Not the first address: dial this one first next time.
        pool.dial_succeeded(state, self.target_addr if self.addr_index > 1 else None)
        if self.holding is None:
            self.holding = state.acquire()
        observer = stream.observer
        if observer is not None:
            observer.dialed(stream.name, state.spec.key, stream.loop.time() - self.dialed_at)

    def _stop_timers(self) -> None:
        """The dial is over (connected, or the connection closing): no deadline may fire."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.watched:
            self.watched = False
            self.stream.dial_watch.discard(self)  # type: ignore[union-attr]  # set when watched

    def _dial_expired(self) -> None:
        self.timer = None
        self.watched = False
        pump = self.pump
        if self.phase != _DIALING or (type(pump) is _COMPILED_PUMP and pump.launched):
            return  # (a compiled dial that connected without telling: see _dial_compiled)
        stream = self.stream
        if self.dialing is not None:
            stream.pool.dial_failed(self.dialing)
        if stream.pool.trivial or stream.loop.time() >= self.deadline - _TIME_LEFT:
            self._dial_failed(TimeoutError())
            return
        # This target is slow (a SYN dropped somewhere): give up on it and fail over within
        # what is left of the connect timeout.
        self._abandon_dial()
        self._release_target()
        self.dialing = None
        if self.tried is None:
            self.tried = [self.target]
        else:
            self.tried.append(self.target)
        self._next_target(TimeoutError())

    def _dial_failed(self, exc: BaseException) -> None:
        self.stream.dial_failed(self.client, exc)
        self.reason = "dial_timeout" if isinstance(exc, TimeoutError) else "dial_refused"
        self._close()

    # -- initial bytes -----------------------------------------------------------------------

    def _send_initial(self, data: bytes) -> None:
        sock = self.target_sock
        assert sock is not None
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.reason = "target_reset"
            self._close()
            return
        if sent < len(data):
            # Rare: the target's receive window is smaller than a header plus a few bytes.
            self.initial = data[sent:]
            self.phase = _SENDING
            self.io.add_writer(sock.fileno(), self._on_initial_writable)
            return
        self._start_pump(sock, connecting=False)

    def _on_initial_writable(self) -> None:
        sock = self.target_sock
        if sock is None or self.phase != _SENDING:
            return
        self.io.remove_writer(sock.fileno())
        data, self.initial = self.initial, None
        self._send_initial(data or b"")

    # -- relay -------------------------------------------------------------------------------

    def _start_pump(self, target: socket.SocketType, *, connecting: bool) -> None:
        """Relay from now on, and pass on what the client sent while we dialed at once rather
        than a wake-up later. `connecting`: the dial's writer is still registered on `target`.

        A client speaking first (HTTP, TLS, most request/response protocols) has its first
        bytes queued by the time the target accepts, so reading at once saves the wake-up that
        would report them. A route whose clients wait for the server learns that from a read
        that finds nothing, and skips the next `_QUIET_SKIP` early reads.
        """
        self.phase = _PUMPING
        stream = self.stream
        read_early = self._read_early()
        pipes = stream.pipe_pool
        io = self.io
        pump: RelayPump
        try:
            if pipes is not None and type(io) is _COMPILED_SET:
                # The same steps as below, in one call (it drops a writer only if there is one).
                compiled_pump = _COMPILED_PUMP(io, self.client_sock, target, self._pump_done, pipes)
                if not stream.half_close:
                    compiled_pump.half_close = False
                self.pump = compiled_pump
                spoke = compiled_pump.launch(read_early)
            else:
                if pipes is not None:
                    pump = engine_pump(stream.loop, io, self.client_sock, target, self._pump_done, pipes)
                else:
                    pump = CopyPump(stream.loop, self.client_sock, target, self._pump_done)
                pump.shutdown_last = False  # _close() follows at once and sends that FIN
                if not stream.half_close:
                    pump.half_close = False
                self.pump = pump
                pump.start()
                # Removed after the pump registered its reader on this fd, so on uvloop the
                # descriptor's poll handle is kept instead of closed and opened again.
                if connecting:
                    io.remove_writer(target.fileno())
                spoke = not read_early or pump.read_now(0)
        except (OSError, RuntimeError):
            # uvloop refuses a descriptor it still maps to a live transport: never leave one
            # side registered and the connection half open. The connect writer may still be
            # registered on the target: drop it before the socket closes.
            io.remove_writer(target.fileno())
            self.reason = "error"
            self._close()
            return
        if not spoke:
            stream.quiet_clients = _QUIET_SKIP

    def _read_early(self) -> bool:
        """Whether the relay reads the client as it starts (see `_start_pump`); counts down the
        early reads a route of quiet clients skips."""
        stream = self.stream
        quiet = stream.quiet_clients
        if quiet:
            stream.quiet_clients = quiet - 1
        return not quiet

    def _pump_done(self, exc: BaseException | None) -> None:
        # An error (a reset on one side) ends the other side too; a plain close, as the
        # transport engine's abort does, so the peer sees the connection end, not a new RST.
        pump = self.pump
        if exc is not None and pump is not None:
            self.reason = "client_reset" if pump.failed_side == 0 else "target_reset"
        if pump is not None and log.isEnabledFor(logging.DEBUG):
            self.stream.log_closed(self.client, pump.bytes_a_to_b, pump.bytes_b_to_a, exc)
        self._close()

    # -- lifetime ----------------------------------------------------------------------------

    def idle_tick(self) -> int:
        """Called by the stream's sweeper: the number of sweeps without any byte moved."""
        pump = self.pump
        if pump is not None:
            moved = pump.bytes_a_to_b + pump.bytes_b_to_a
            if moved != self.last_moved:
                self.last_moved = moved
                self.idle = 0
                return 0
        self.idle += 1
        return self.idle

    def idle_expired(self) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "idle timeout",
                extra={**self.stream.fields, "client": addr_str(self.client), "action": "idle"},
            )
        self.reason = "idle_timeout"
        self._close()

    def shutdown(self) -> None:
        """The stream is closing: end the connection now (FIN both ways)."""
        if self.phase != _CLOSED:
            self.reason = "shutdown"
        self._close()

    def _close(self) -> None:
        """Tear down exactly once: stop every callback on both descriptors, then close them.

        A plain close (FIN, or RST if unread bytes remain, as the kernel decides), also for
        denied clients: a deliberate RST can reach a client before its own connect() returns.
        """
        if self.phase == _CLOSED:
            return
        phase = self.phase
        self.phase = _CLOSED
        stream = self.stream
        io = self.io
        if self.timer is not None or self.watched:
            self._stop_timers()
        if self.dial_task is not None:
            task, self.dial_task = self.dial_task, None
            task.cancel()
        if self.reader is not None:
            self.reader = None
            io.remove_reader(self.client_sock.fileno())
        target = self.target_sock
        pump = self.pump
        if stream.observer is not None:
            self._report(pump)
        if self.counted:
            self.counted = False
            stream.release_client(self.client[0])
        self._release_target()
        if type(pump) is _COMPILED_PUMP:
            # Stops it, then forgets and closes both sockets (the client's and the target's).
            self.pump = self.target_sock = None
            pump.finish()
            stream.forget(self)
            return
        if pump is not None:
            pump.close()  # removes its own readers and writers; a no-op if it already finished
            self.pump = None
        elif target is not None and phase in (_DIALING, _SENDING):
            io.remove_writer(target.fileno())
        self.target_sock = None
        self._forget(self.client_sock)
        self.client_sock.close()
        if target is not None:
            self._forget(target)
            target.close()
        stream.forget(self)

    def _forget(self, sock: socket.SocketType) -> None:
        """Drop a socket from the engine's epoll set before it is closed (see `EpollSet`)."""
        io = self.io
        if isinstance(io, EPOLL_SETS):
            fd = sock.fileno()
            if fd >= 0:
                io.forget(fd)

    def _report(self, pump: RelayPump | None) -> None:
        stream = self.stream
        assert stream.observer is not None
        up, down = (pump.bytes_a_to_b, pump.bytes_b_to_a) if pump is not None else (0, 0)
        target = self.holding.spec.key if self.holding is not None else None
        stream.observer.closed(
            ConnectionRecord.ending_now(
                stream.name, "tcp", self.client, target, self.started, up, down, self.reason
            )
        )
