"""Relay between two connected, non-blocking TCP sockets: zero-copy for bulk, copied when small.

Bulk bytes move socket -> pipe -> socket with ``os.splice`` and never enter user space: no
``bytes`` objects, no per-chunk allocation, one syscall per direction per chunk. Small messages
are copied (see "Small messages are copied" below). The pump is driven by
``loop.add_reader`` / ``loop.add_writer``, so it runs on uvloop and on stock asyncio alike.

Decisions worth knowing:

* **Pipes are borrowed, not owned.** A pipe is taken from a small per-loop :class:`PipePool` when a
  direction becomes readable and given back as soon as it is empty again. A connection only holds a
  pipe while bytes are in flight (read into the pipe, not yet accepted by the receiver), so ten
  thousand idle connections hold zero pipes - two pipes per connection would cost four descriptors
  and a kernel pipe each, and hit the open-files limit long before memory.
* **The pool is bounded.** Pipes returned beyond ``max_idle`` are closed, so a burst of busy
  connections cannot leave the process holding descriptors forever.
* **Backpressure stays in the kernel.** While a pipe holds bytes the receiver did not take, the
  pump stops watching the source for readability and waits for the destination to become
  writable. A slow reader therefore makes the sender's socket buffer fill up and TCP flow control
  push back; the pump does not spin and never holds more than one pipe per direction.
* **Half-close is forwarded.** EOF on one side becomes ``shutdown(SHUT_WR)`` on the other once the
  pipe has drained; the opposite direction keeps flowing. When both directions have finished, the
  completion callback fires with ``None``. Any socket error (ECONNRESET, EPIPE, ...) fires it with
  the exception instead. The pump never closes the sockets: the caller owns them.
* **Small messages are copied, bulk is spliced.** Each direction starts by reading into a
  per-loop 16 KiB scratch buffer with ``recv_into`` and passing it on with ``send``; the first
  read that fills the buffer switches that direction to splice for good, as HAProxy does. For a
  request or response of a few hundred bytes the two copies cost less kernel time than
  splicing through a pipe (pipe buffers, page references, and a linear skb copied into a fresh
  page on the read side): measured on the proxy under ``wrk``, 4 % less CPU per short
  connection and 3 % per keep-alive request; bulk transfer pays for one 16 KiB copy.
* **FIN rides with the last bytes.** When the engine's epoll set reports that the source's peer
  has sent FIN (EPOLLRDHUP) along with data, the pump keeps reading past the short read to the
  EOF in the same wake-up and passes the data on with MSG_MORE, so the shutdown that follows
  sends data and FIN in one segment: a short request/response connection costs one wake-up, one
  read and one packet fewer per direction that closes.
* **Fallback.** Where ``os.splice`` does not exist (non-Linux, Python < 3.10) the same interface
  copies through a per-loop scratch buffer with ``recv_into`` + ``send``; only the unsent tail of a
  chunk is kept per connection, and only while the receiver is slow.

The raw engine runs the compiled twin of `SplicePump` where it was built (`engine_pump`,
`_fastpath.c`): the same decisions, no interpreter per event.

Known limit: after one side has sent EOF its socket is no longer watched (it would be readable
forever), so a later reset on that side is only noticed when the other direction writes to it.
Callers should keep an idle timeout, as every L4 proxy does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import weakref
from collections.abc import Callable
from typing import Any, Final, Protocol

from portway.stream.epollset import EPOLL_PEER_CLOSED, compiled

__all__ = [
    "HAVE_SPLICE",
    "CopyPump",
    "Pipe",
    "PipePool",
    "PumpDone",
    "Readiness",
    "RelayPump",
    "SplicePump",
    "engine_pump",
    "pipe_pool_for",
    "relay",
    "start_pump",
]

HAVE_SPLICE: Final[bool] = hasattr(os, "splice")

#: Called once when the pump has finished: ``None`` after both directions closed cleanly,
#: otherwise the error that stopped it. The caller then closes both sockets.
PumpDone = Callable[[BaseException | None], None]

# Bigger pipes mean fewer splice calls per GiB. 256 KiB stays far below the unprivileged
# per-user budget (fs.pipe-user-pages-soft, 64 MiB by default) even with a full pool plus a few
# hundred busy connections; the kernel only pins pages while bytes sit in the pipe.
DEFAULT_PIPE_SIZE: Final = 256 * 1024
DEFAULT_POOL_IDLE: Final = 64
# Chunks moved per readiness callback before yielding to other connections: enough to amortise
# the callback, small enough that one bulk stream cannot starve the loop.
_ROUNDS_PER_WAKEUP: Final = 8
_FALLBACK_CHUNK: Final = 256 * 1024
#: What SplicePump copies before it splices: a read that fills this much means bulk transfer.
SMALL_READ: Final = 16 * 1024

_SPLICE_FLAGS: Final[int] = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_SPLICE_MORE: Final[int] = _SPLICE_FLAGS | getattr(os, "SPLICE_F_MORE", 0)
_MSG_MORE: Final[int] = getattr(socket, "MSG_MORE", 0)
try:
    import fcntl

    _F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)
except ImportError:  # pragma: no cover - non-Unix
    _F_SETPIPE_SZ = None

Pipe = tuple[int, int]


class Readiness(Protocol):
    """Where a pump registers its readiness callbacks: the event loop itself, or the raw-socket
    engine's own epoll set (`portway.stream.epollset`), which costs fewer syscalls per socket."""

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None: ...
    def add_writer(self, fd: int, callback: Callable[..., object], *args: Any) -> None: ...
    def remove_reader(self, fd: int) -> bool: ...
    def remove_writer(self, fd: int) -> bool: ...


class RelayPump(Protocol):
    """What the engine's connections use of a pump: `SplicePump`, `CopyPump` or the compiled
    one (`_fastpath.Pump`, see `engine_pump`)."""

    failed_side: int
    shutdown_last: bool
    half_close: bool

    @property
    def bytes_a_to_b(self) -> int: ...
    @property
    def bytes_b_to_a(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def start(self) -> None: ...
    def close(self) -> None: ...
    def read_now(self, index: int) -> bool: ...


class PipePool:
    """Hands out empty non-blocking pipes and takes them back; keeps at most ``max_idle``.

    Only empty pipes may be released: a pipe that still holds bytes must be ``discard``-ed.
    """

    __slots__ = ("_idle", "in_use", "max_idle", "pipe_size", "scratch")

    def __init__(self, max_idle: int = DEFAULT_POOL_IDLE, pipe_size: int = DEFAULT_PIPE_SIZE) -> None:
        self.max_idle = max_idle
        self.pipe_size = pipe_size
        self.in_use = 0
        self._idle: list[Pipe] = []
        #: The buffer small messages are copied through before a direction turns to splice.
        self.scratch = memoryview(bytearray(SMALL_READ))

    @property
    def idle(self) -> int:
        """Number of pipes parked in the pool."""
        return len(self._idle)

    def acquire(self) -> Pipe:
        """Return ``(read_fd, write_fd)`` of an empty pipe, creating one when the pool is empty."""
        if self._idle:
            pipe = self._idle.pop()
        else:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            if _F_SETPIPE_SZ is not None and self.pipe_size:
                # Fails when over the per-user pipe budget: the default size still works.
                with contextlib.suppress(OSError):
                    self.pipe_size = fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, self.pipe_size)
        self.in_use += 1
        return pipe

    def release(self, pipe: Pipe) -> None:
        """Give back an *empty* pipe; closed instead when the pool is full."""
        self.in_use -= 1
        if len(self._idle) < self.max_idle:
            self._idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def discard(self, pipe: Pipe) -> None:
        """Close a pipe that may still hold bytes (the connection it served failed)."""
        self.in_use -= 1
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self) -> None:
        """Close every idle pipe (pipes in use are closed by their pumps)."""
        while self._idle:
            r, w = self._idle.pop()
            os.close(r)
            os.close(w)


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PipePool] = weakref.WeakKeyDictionary()


def pipe_pool_for(loop: asyncio.AbstractEventLoop) -> PipePool:
    """Return the loop's pipe pool, creating it on first use (one pool per loop: pipes are
    only ever touched from their loop's thread, so the pool needs no lock)."""
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = PipePool()
    return pool


class _Direction:
    """One way of the relay: read ``src``, write ``dst``. Holds bytes only while ``dst`` is slow."""

    __slots__ = (
        "chunk",
        "dst",
        "dst_sock",
        "eof",
        "finished",
        "moved",
        "pending",
        "pipe",
        "src",
        "src_sock",
        "tail",
    )

    def __init__(self, src: socket.SocketType, dst: socket.SocketType, chunk: int) -> None:
        self.src_sock = src
        self.dst_sock = dst
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.pending = 0  # bytes read from src, not yet written to dst
        self.moved = 0  # bytes read from src so far (for metrics and idle detection)
        self.eof = False
        self.finished = False
        self.pipe: Pipe | None = None  # spliced bytes: borrowed while pending > 0
        self.tail = b""  # copied bytes: the unsent rest of the last chunk
        #: Bytes the next read asks for; a read returning less found the socket (almost) empty.
        self.chunk = chunk


class _PumpBase:
    """Shared control logic: readiness callbacks, half-close, completion. Subclasses move bytes."""

    __slots__ = (
        "_closed",
        "_dirs",
        "_done",
        "_events",
        "_loop",
        "_scratch",
        "failed_side",
        "half_close",
        "shutdown_last",
    )

    def __init__(
        self,
        loop: Readiness,
        a: socket.SocketType,
        b: socket.SocketType,
        on_done: PumpDone,
        scratch: memoryview,
    ) -> None:
        self._loop = loop
        #: The engine's epoll set when callbacks live there: it tells which events woke us.
        self._events: Any = loop if hasattr(loop, "ready_events") else None
        self._done = on_done
        self._closed = False
        #: Shared by every pump on the loop: copied bytes stay in it only within one `_fill`.
        self._scratch = scratch
        self._dirs = (_Direction(a, b, len(scratch)), _Direction(b, a, len(scratch)))
        #: False when the caller closes both sockets as soon as the pump is done: the last
        #: direction's EOF then reaches its receiver with that close, one syscall fewer.
        self.shutdown_last = True
        #: False: the first direction to finish (FIN, its bytes through) ends the pump, as
        #: nginx's stream proxy does by default; what the other direction held is dropped.
        self.half_close = True
        #: Which socket an error came from, when the pump failed: 0 for `a`, 1 for `b`. A read
        #: error belongs to the source, a write error (EPIPE, or any error while flushing) to
        #: the destination; close reasons (client_reset / target_reset) are built on it.
        self.failed_side = -1

    # -- byte movers, provided by subclasses -------------------------------------------------
    def _fill(self, d: _Direction, more: bool) -> int:  # pragma: no cover - abstract
        """Read from ``d.src`` into the holding area and pass on what the receiver takes at once
        (with MSG_MORE when `more`: a FIN follows); return bytes read, 0 on EOF. Raise
        BlockingIOError when nothing is available."""
        raise NotImplementedError

    def _flush(self, d: _Direction) -> None:  # pragma: no cover - abstract
        """Write held bytes to ``d.dst`` until empty or the socket would block."""
        raise NotImplementedError

    def _copy(self, d: _Direction, more: bool) -> int:
        """`_fill` through the scratch buffer: ``recv_into``, then ``send`` what the receiver takes."""
        buf = self._scratch
        n = d.src_sock.recv_into(buf)
        if n:
            sent = 0
            try:  # noqa: SIM105 - hot path, try/except is cheaper than contextlib.suppress
                sent = d.dst_sock.send(buf[:n], _MSG_MORE if more else 0)
            except BlockingIOError:
                pass
            if sent < n:
                # The scratch buffer is shared with every connection on the loop: copy the tail.
                d.tail = bytes(buf[sent:n])
                d.pending = len(d.tail)
        return n

    def _flush_tail(self, d: _Direction) -> None:
        """`_flush` of copied bytes."""
        while d.tail:
            try:
                sent = d.dst_sock.send(d.tail)
            except BlockingIOError:
                return
            d.tail = d.tail[sent:]
            d.pending = len(d.tail)

    def _release_if_empty(self, d: _Direction) -> None:
        """Return per-direction resources once nothing is in flight."""

    def _drop_holding(self, d: _Direction) -> None:
        """Forget held bytes (on error or close)."""
        d.pending = 0

    # -- control ----------------------------------------------------------------------------
    def start(self) -> None:
        """Begin relaying; both sockets must be connected and non-blocking."""
        for d in self._dirs:
            self._loop.add_reader(d.src, self._on_readable, d)

    @property
    def bytes_a_to_b(self) -> int:
        """Bytes read from ``a`` so far. Callers detect idleness by sampling these counters on a
        timer instead of the pump reading the clock per chunk."""
        return self._dirs[0].moved

    @property
    def bytes_b_to_a(self) -> int:
        """Bytes read from ``b`` so far."""
        return self._dirs[1].moved

    @property
    def closed(self) -> bool:
        """True once the pump has stopped (completed, failed or closed)."""
        return self._closed

    def close(self) -> None:
        """Stop relaying without calling the completion callback (the caller is tearing down)."""
        if self._closed:
            return
        self._closed = True
        for d in self._dirs:
            self._loop.remove_reader(d.src)
            self._loop.remove_writer(d.dst)
            self._drop_holding(d)

    def _fail(self, exc: BaseException, d: _Direction | None = None, writing: bool = False) -> None:
        if self._closed:
            return
        if d is not None:
            if not writing and isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                writing = True
            src_side = 0 if d is self._dirs[0] else 1
            self.failed_side = 1 - src_side if writing else src_side
        self.close()
        self._done(exc)

    def read_now(self, index: int) -> bool:
        """Read side `index` (0: from `a`) without waiting for readiness, as when the client's
        first bytes are most likely queued already; False if nothing was there (EAGAIN)."""
        d = self._dirs[index]
        before = d.moved
        self._on_readable(d, True)
        return d.moved != before or d.eof or self._closed

    def _on_readable(self, d: _Direction, unprompted: bool = False) -> None:
        # The peer sent FIN (EPOLLRDHUP with the data): its EOF is already queued behind the
        # bytes, so read on to it now instead of in another wake-up. Not when `unprompted`
        # (read_now): the events of the descriptor being dispatched are then another one's.
        events = self._events
        peer_closed = not unprompted and events is not None and bool(events.ready_events & EPOLL_PEER_CLOSED)
        try:
            for _ in range(_ROUNDS_PER_WAKEUP):
                chunk = d.chunk
                try:
                    n = self._fill(d, peer_closed)
                except BlockingIOError:
                    break
                d.moved += n
                if n == 0:
                    d.eof = True
                    self._loop.remove_reader(d.src)
                    if d.pending:
                        self._loop.add_writer(d.dst, self._on_writable, d)
                    else:
                        self._release_if_empty(d)
                        self._finish(d)
                    return
                if d.pending:
                    try:
                        self._flush(d)
                    except OSError as exc:
                        self._fail(exc, d, writing=True)
                        return
                    if d.pending:
                        # Receiver is slow: stop reading (bytes wait in the sender's socket
                        # buffer, which is what makes TCP push back) until dst takes what we hold.
                        self._loop.remove_reader(d.src)
                        self._loop.add_writer(d.dst, self._on_writable, d)
                        return
                if n < chunk and not peer_closed:
                    # A short read means the socket is (almost surely) empty: skip the splice
                    # that would only fail with EAGAIN. Readiness is level-triggered, so anything
                    # that arrived meanwhile wakes us again.
                    break
            self._release_if_empty(d)
        except OSError as exc:
            self._fail(exc, d)

    def _on_writable(self, d: _Direction) -> None:
        try:
            self._flush(d)
        except OSError as exc:
            self._fail(exc, d, writing=True)
            return
        if d.pending:
            return
        self._loop.remove_writer(d.dst)
        self._release_if_empty(d)
        if d.eof:
            self._finish(d)
        else:
            self._loop.add_reader(d.src, self._on_readable, d)

    def _finish(self, d: _Direction) -> None:
        first, second = self._dirs
        last = (second if d is first else first).finished or not self.half_close
        if self.shutdown_last or not last:
            try:
                d.dst_sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    self._fail(exc, d, writing=True)
                    return
        d.finished = True
        if last and not self._closed:
            self._closed = True
            self._done(None)


class SplicePump(_PumpBase):
    """Relay with ``os.splice`` through a pooled kernel pipe (Linux), after copying while the
    messages are small (see the module's notes)."""

    __slots__ = ("_pipe_chunk", "_pool")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        a: socket.SocketType,
        b: socket.SocketType,
        on_done: PumpDone,
        pool: PipePool | None = None,
        io: Readiness | None = None,
    ) -> None:
        # `io`: register callbacks there instead of on the loop (see `Readiness`).
        pool = pool if pool is not None else pipe_pool_for(loop)
        super().__init__(loop if io is None else io, a, b, on_done, pool.scratch)
        self._pool = pool
        self._pipe_chunk = pool.pipe_size or 65536

    @property
    def pipes_held(self) -> int:
        """Pipes this pump holds right now (0 when idle, at most one per direction)."""
        return sum(d.pipe is not None for d in self._dirs)

    def _fill(self, d: _Direction, more: bool) -> int:
        pipe = d.pipe
        if pipe is None:
            if d.chunk == SMALL_READ:
                n = self._copy(d, more)
                if n == SMALL_READ:  # a full buffer: bulk transfer, spliced from now on
                    d.chunk = self._pipe_chunk
                return n
            pipe = d.pipe = self._pool.acquire()
        n = os.splice(d.src, pipe[1], d.chunk, flags=_SPLICE_FLAGS)
        if n:
            # Usually the receiver takes the whole chunk right away and the pipe is empty again.
            d.pending = n
            try:  # noqa: SIM105 - hot path, try/except is cheaper than contextlib.suppress
                d.pending -= os.splice(pipe[0], d.dst, n, flags=_SPLICE_MORE if more else _SPLICE_FLAGS)
            except BlockingIOError:
                pass
        return n

    def _flush(self, d: _Direction) -> None:
        pipe = d.pipe
        if pipe is None:
            self._flush_tail(d)
            return
        r, dst, flags = pipe[0], d.dst, _SPLICE_FLAGS
        while d.pending:
            try:
                d.pending -= os.splice(r, dst, d.pending, flags=flags)
            except BlockingIOError:
                return

    def _release_if_empty(self, d: _Direction) -> None:
        pipe = d.pipe
        if pipe is not None and d.pending == 0:
            d.pipe = None
            self._pool.release(pipe)

    def _drop_holding(self, d: _Direction) -> None:
        d.tail = b""
        pipe = d.pipe
        if pipe is None:
            d.pending = 0
            return
        d.pipe = None
        if d.pending:
            d.pending = 0
            self._pool.discard(pipe)
        else:
            self._pool.release(pipe)


_scratch_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, memoryview] = (
    weakref.WeakKeyDictionary()
)


class CopyPump(_PumpBase):
    """Portable relay: ``recv_into`` a per-loop scratch buffer, ``send``; keeps only unsent tails."""

    __slots__ = ()

    def __init__(
        self, loop: asyncio.AbstractEventLoop, a: socket.SocketType, b: socket.SocketType, on_done: PumpDone
    ) -> None:
        scratch = _scratch_by_loop.get(loop)
        if scratch is None:
            scratch = _scratch_by_loop[loop] = memoryview(bytearray(_FALLBACK_CHUNK))
        super().__init__(loop, a, b, on_done, scratch)

    _fill = _PumpBase._copy
    _flush = _PumpBase._flush_tail

    def _drop_holding(self, d: _Direction) -> None:
        d.tail = b""
        d.pending = 0


def engine_pump(
    loop: asyncio.AbstractEventLoop,
    io: Readiness,
    a: socket.SocketType,
    b: socket.SocketType,
    on_done: PumpDone,
    pool: PipePool,
) -> RelayPump:
    """The raw engine's pump between non-blocking sockets `a` and `b`, not started: the compiled
    one on the compiled epoll set (its events then never enter the interpreter), else
    `SplicePump` with its callbacks on `io`."""
    if compiled is not None and type(io) is compiled.EpollSet:
        return compiled.Pump(io, a, b, on_done, pool)
    return SplicePump(loop, a, b, on_done, pool, io=io)


def start_pump(
    loop: asyncio.AbstractEventLoop,
    a: socket.SocketType,
    b: socket.SocketType,
    on_done: PumpDone,
    *,
    use_splice: bool | None = None,
    pool: PipePool | None = None,
) -> SplicePump | CopyPump:
    """Start relaying between connected sockets ``a`` and ``b``; return the running pump.

    Both sockets are switched to non-blocking mode. ``on_done`` fires once, from the loop, with
    ``None`` after both directions closed cleanly or with the error that stopped the relay;
    the caller closes the sockets afterwards. ``use_splice=None`` picks splice when available;
    ``pool`` defaults to the loop's shared :func:`pipe_pool_for`.
    """
    a.setblocking(False)
    b.setblocking(False)
    pump: SplicePump | CopyPump
    if HAVE_SPLICE if use_splice is None else use_splice:
        pump = SplicePump(loop, a, b, on_done, pool)
    else:
        pump = CopyPump(loop, a, b, on_done)
    pump.start()
    return pump


async def relay(a: socket.SocketType, b: socket.SocketType, *, use_splice: bool | None = None) -> None:
    """Relay until both directions are closed; raise the error that stopped it, if any.

    Does not close the sockets. Cancelling the awaiting task stops the pump.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def done(exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    pump = start_pump(loop, a, b, done, use_splice=use_splice)
    try:
        await fut
    finally:
        pump.close()
