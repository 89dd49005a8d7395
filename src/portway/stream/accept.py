"""Accepting TCP connections without spinning when descriptors run out.

On uvloop, `create_server` accepts in C, and libuv handles EMFILE itself: it closes a reserved
descriptor, accepts and drops the pending connections, and re-arms, so nothing spins.

Stock asyncio (CPython 3.11) does not: its accept loop keeps going after EMFILE and schedules
one retry per remaining iteration of `backlog`, so a listener with backlog 4096 queues thousands
of retries per wake-up and burns a core for as long as the shortage lasts (found by
tests/test_faults.py). On stock asyncio we therefore accept ourselves: on EMFILE/ENFILE we stop
watching the socket, back off (doubling, capped), log once per burst, and resume by ourselves.

The raw-socket engine (`tcp_splice.py`) wants the accepted `socket.socket` itself, not a
transport, so `serve_tcp_sockets` runs the same acceptor under both loops and hands each socket
to a callback: no task, no transport, no protocol object per connection.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from portway.loops import loop_name
from portway.stream.epollset import compiled, compiled_enabled, epoll_set_for

#: Takes ownership of an accepted, non-blocking socket and the peer address `accept` returned.
SocketHandler = Callable[[socket.SocketType, Any], None]

log = logging.getLogger("portway.accept")

_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: Connections accepted per readiness event before yielding to the rest of the loop.
_BATCH = 64
#: The raw-socket engine takes one connection per readiness event, as nginx does by default:
#: the listener is level-triggered, so a connection still queued is reported by the loop's
#: next poll, which it makes anyway, instead of by an accept4 that fails with EAGAIN. Measured:
#: one failing syscall less per connection, CPU per connection unchanged (bench/README.md).
_RAW_BATCH = 1
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0


class Listener:
    """What TCPStream needs from a serving socket: stop accepting, and wait until stopped."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class _AsyncioAcceptor(Listener):
    """Accepts in batches from `add_reader`; adopts each socket as a transport (`factory`) or
    hands it to `on_socket`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol] | None,
        fields: dict[str, str],
        on_socket: SocketHandler | None = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.on_socket = on_socket
        self.fields = fields
        self.backoff = _BACKOFF_MIN
        self.retry: asyncio.TimerHandle | None = None
        self.closed = False
        self.in_burst = False
        self.refused = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        # An int, read once: `sock.family` builds an AddressFamily enum on every access.
        self.family = int(sock.family)
        self.batch = _BATCH if on_socket is None else _RAW_BATCH
        #: The compiled core's accept4(SOCK_NONBLOCK), which also makes the socket object: the
        #: raw engine's sockets then need no ioctl to become non-blocking and no getsockname
        #: (the socket constructor's check) to exist (None: the socket module's accept).
        self.accept_nonblocking = compiled.accept if on_socket is not None and compiled_enabled() else None
        self.fd = sock.fileno()
        #: One connection per wake-up in C (`_RAW_BATCH`): no batch loop around it.
        self.on_readable = self._accept_one if self.accept_nonblocking is not None else self._on_readable
        loop.add_reader(self.fd, self.on_readable)

    def _accept_one(self) -> None:
        """The compiled core's accept: one connection, its socket object made in C."""
        try:
            sock, addr = self.accept_nonblocking(self.fd)  # type: ignore[misc]  # set with it
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            self._accept_failed(exc)
            return
        try:
            self.on_socket(sock, addr)  # type: ignore[misc]  # set with it
        except Exception:
            self._handler_failed(sock)
        if self.in_burst:
            self._burst_over()

    def _on_readable(self) -> None:
        sock, on_socket = self.sock, self.on_socket
        for _ in range(self.batch):
            try:
                if on_socket is not None:
                    # The C-level accept and socket type: socket.accept() and the socket.socket
                    # class add Python frames to every connection and to every close.
                    fd, addr = sock._accept()  # type: ignore[attr-defined]  # (not in typeshed)
                else:
                    conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                break
            except OSError as exc:
                if self._accept_failed(exc):
                    return
                break
            if on_socket is not None:
                self._hand_over(on_socket, fd, addr)
                continue
            conn.setblocking(False)
            task = self.loop.create_task(self._adopt(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if self.in_burst:
            self._burst_over()

    def _accept_failed(self, exc: OSError) -> bool:
        """Back off when descriptors ran out (True: stop reading now); log anything else."""
        if exc.errno in _EXHAUSTED:
            self._back_off(exc)
            return True
        log.error("accept failed", extra={**self.fields, "action": "accept", "error": str(exc)})
        return False

    def _burst_over(self) -> None:
        log.warning(
            "accepting again after descriptor shortage",
            extra={**self.fields, "action": "accept", "refused_retries": self.refused},
        )
        self.in_burst = False
        self.refused = 0
        self.backoff = _BACKOFF_MIN

    def _hand_over(self, on_socket: SocketHandler, fd: int, addr: Any) -> None:
        try:
            conn = _socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
            conn.setblocking(False)
        except OSError:
            os.close(fd)
            return
        self._run(on_socket, conn, addr)

    def _run(self, on_socket: SocketHandler, conn: socket.SocketType, addr: Any) -> None:
        try:
            on_socket(conn, addr)
        except Exception:
            self._handler_failed(conn)

    def _handler_failed(self, conn: socket.SocketType) -> None:
        # The handler owns the socket once called and cleans up after itself; an escaping
        # error is a bug, and must not stop the listener.
        log.exception("accepted connection handler failed", extra={**self.fields, "action": "accept"})
        conn.close()

    async def _adopt(self, conn: socket.socket) -> None:
        assert self.factory is not None
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError:
            conn.close()

    def _back_off(self, exc: OSError) -> None:
        self.loop.remove_reader(self.fd)
        self.refused += 1
        if not self.in_burst:
            self.in_burst = True
            log.error(
                "accept failed: out of file descriptors; backing off",
                extra={**self.fields, "action": "accept", "error": exc.strerror or str(exc)},
            )
        self.retry = self.loop.call_later(self.backoff, self._resume)
        self.backoff = min(self.backoff * 2, _BACKOFF_MAX)

    def _resume(self) -> None:
        self.retry = None
        if not self.closed:
            self.loop.add_reader(self.fd, self.on_readable)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.retry is not None:
            self.retry.cancel()
        else:
            self.loop.remove_reader(self.fd)
        self.sock.close()

    async def wait_closed(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


class _ServerListener(Listener):
    def __init__(self, server: asyncio.AbstractServer) -> None:
        self.server = server

    def close(self) -> None:
        self.server.close()

    async def wait_closed(self) -> None:
        await self.server.wait_closed()


async def serve_tcp(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    factory: Callable[[], asyncio.Protocol],
    fields: dict[str, str],
    backlog: int = 4096,
) -> Listener:
    """Start accepting on a bound, listening socket with the best path this loop offers."""
    if loop_name(loop) == "uvloop":
        return _ServerListener(await loop.create_server(factory, sock=sock, backlog=backlog))
    return _AsyncioAcceptor(loop, sock, factory, fields)


def serve_tcp_sockets(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    on_socket: SocketHandler,
    fields: dict[str, str],
) -> Listener:
    """Accept on a bound, listening socket under any loop, handing each socket to `on_socket`.

    Used on uvloop too: `create_server` would wrap every socket in a transport we do not want,
    and libuv's own EMFILE handling is replaced by the same back-off as on stock asyncio.
    The engine's epoll set is created here, with the listener, so that its one descriptor is
    part of the process's baseline rather than appearing with the first connection.
    """
    with contextlib.suppress(OSError):  # connections fall back to the loop's own readers
        epoll_set_for(loop)
    return _AsyncioAcceptor(loop, sock, None, fields, on_socket)
