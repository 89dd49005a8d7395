"""An epoll set owned by the raw-socket engine, watched by the event loop as one descriptor.

This module's `EpollSet` is the reference and the fallback: where the compiled core was built
(`_fastpath.c`, see `compiled_enabled`), `epoll_set_for` returns its C twin, which takes the
same Python callbacks and also runs the compiled pump's and UDP lanes' events natively.

Why not the loop's `add_reader`/`add_writer` per connection socket: on uvloop every descriptor
gets a libuv poll handle, and creating one costs an `ioctl(FIONBIO)` plus an
`epoll_ctl(ADD)`/`epoll_ctl(DEL)` pair that only checks the descriptor can be polled; every
interest change is an `epoll_ctl` that tries ADD first and retries with MOD when it fails with
EEXIST; and removing the last callback closes the handle (another DEL). A short proxied
connection paid 14 `epoll_ctl` (7 of them failing) and 2 `ioctl` for its two sockets.

Here each descriptor is added once (`EPOLL_CTL_ADD` when it first needs watching), changed with
MOD only when its interest really changes, and never deleted: closing a descriptor removes it
from the set in the kernel (the engine never duplicates its sockets). Interest changes made while
events are being dispatched are applied once, after the batch, so "stop watching the target for
writability, start watching it for reading" costs one MOD, not two. The set itself is one
reader in the loop, and one wake-up dispatches every ready descriptor with a single
`epoll_wait`.

Level-triggered, like the loop's own readers: the pumps' backpressure and half-close logic is the
same as with `loop.add_reader`, and a descriptor whose events are not handled in one batch is
simply reported again. A descriptor with no interest left is removed with DEL (a reset socket
reports EPOLLHUP/EPOLLERR even with an empty mask, which would wake the loop forever).

Stale events: a callback may close a descriptor and the same number may be reused (a redial)
before the rest of the batch is dispatched; events for any descriptor forgotten during the batch
are skipped. Being level-triggered, a reused descriptor's real readiness is reported again on the
next wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import weakref
from collections.abc import Callable
from typing import Any, Final

try:
    from portway.stream import _fastpath as compiled
except ImportError:  # not built (no compiler where it was installed): the classes below serve
    compiled = None  # type: ignore[assignment]

__all__ = [
    "COMPILED",
    "EPOLL_FAILED",
    "EPOLL_PEER_CLOSED",
    "EPOLL_SETS",
    "HAVE_EPOLL",
    "AnyEpollSet",
    "EpollSet",
    "compiled",
    "compiled_enabled",
    "epoll_set_for",
]

HAVE_EPOLL: Final[bool] = hasattr(select, "epoll")

_RDHUP: Final = getattr(select, "EPOLLRDHUP", 0x2000)
# Read interest includes EPOLLRDHUP: a reader learns "the peer sent FIN" from the event that
# carries its last bytes, and can forward data and FIN together (see `splice._PumpBase`).
_IN: Final = getattr(select, "EPOLLIN", 1) | _RDHUP
_OUT: Final = getattr(select, "EPOLLOUT", 4)
_ERR: Final = getattr(select, "EPOLLERR", 8) | getattr(select, "EPOLLHUP", 16)
#: Set in `EpollSet.ready_events` when the descriptor failed or hung up (or nothing is known).
EPOLL_FAILED: Final = _ERR
#: Set in `EpollSet.ready_events` when the peer has sent FIN (everything before it is queued).
EPOLL_PEER_CLOSED: Final = _RDHUP
_READ_EVENTS: Final = _IN | _ERR
_WRITE_EVENTS: Final = _OUT | _ERR
#: Ready descriptors taken per `epoll_wait`; more stay ready and wake the loop again.
_MAX_EVENTS: Final = 512

Callback = Callable[..., object]


class _Watch:
    """One descriptor: its callbacks, the mask we want and the mask the kernel has (0: not added)."""

    __slots__ = ("armed", "reader", "reader_args", "writer", "writer_args")

    def __init__(self) -> None:
        self.armed = 0
        self.reader: Callback | None = None
        self.reader_args: tuple[Any, ...] = ()
        self.writer: Callback | None = None
        self.writer_args: tuple[Any, ...] = ()


class EpollSet:
    """The loop's `add_reader`/`add_writer` interface on an engine-owned epoll set.

    Callers must call `forget(fd)` before closing a descriptor they registered.
    """

    __slots__ = ("__weakref__", "_dirty", "_dispatching", "_ep", "_gone", "_loop", "_watches", "ready_events")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ep = select.epoll()
        self._watches: dict[int, _Watch] = {}
        self._dirty: set[int] = set()
        self._gone: set[int] = set()
        self._dispatching = False
        #: The events of the descriptor whose callback is running. A connecting socket reported
        #: writable without EPOLLERR/EPOLLHUP is connected: no getsockopt(SO_ERROR) needed.
        #: EPOLL_FAILED outside a batch, so a caller relying on it asks the socket instead.
        self.ready_events = _ERR
        loop.add_reader(self._ep.fileno(), self.dispatch)

    @property
    def closed(self) -> bool:
        return self._ep.closed

    def close(self) -> None:
        """Stop watching the set and close it (the loop is closing)."""
        if self._ep.closed:
            return
        with contextlib.suppress(RuntimeError, OSError):  # the loop is already closed
            self._loop.remove_reader(self._ep.fileno())
        self._ep.close()
        self._watches.clear()
        self._dirty.clear()

    # -- the loop's interface ----------------------------------------------------------------

    def add_reader(self, fd: int, callback: Callback, *args: Any) -> None:
        w = self._watches.get(fd)
        if w is None:
            w = self._watches[fd] = _Watch()
        w.reader, w.reader_args = callback, args
        self._changed(fd, w)

    def add_writer(self, fd: int, callback: Callback, *args: Any) -> None:
        w = self._watches.get(fd)
        if w is None:
            w = self._watches[fd] = _Watch()
        w.writer, w.writer_args = callback, args
        self._changed(fd, w)

    #: A dial's writer (the compiled set registers it edge-triggered for the pump that follows).
    add_connecting = add_writer

    def remove_reader(self, fd: int) -> bool:
        w = self._watches.get(fd)
        if w is None or w.reader is None:
            return False
        w.reader, w.reader_args = None, ()
        self._changed(fd, w)
        return True

    def remove_writer(self, fd: int) -> bool:
        w = self._watches.get(fd)
        if w is None or w.writer is None:
            return False
        w.writer, w.writer_args = None, ()
        self._changed(fd, w)
        return True

    def watching(self, fd: int) -> bool:
        """True while `fd` has a reader or a writer (it is in the kernel's set or about to be)."""
        return fd in self._watches

    def forget(self, fd: int) -> None:
        """The descriptor is about to be closed: drop it without a syscall (close removes it
        from the kernel's set); pending events for it in this batch are skipped."""
        if self._watches.pop(fd, None) is not None:
            self._dirty.discard(fd)
            if self._dispatching:
                self._gone.add(fd)

    # -- internals ---------------------------------------------------------------------------

    def _changed(self, fd: int, w: _Watch) -> None:
        if self._dispatching:
            self._dirty.add(fd)
        else:
            self._apply(fd, w)

    def _apply(self, fd: int, w: _Watch) -> None:
        """Bring the kernel's mask for `fd` in line with its callbacks (one epoll_ctl at most).

        Raises OSError from epoll_ctl (EBADF, ENOMEM, ENOSPC for max_user_watches) when called
        outside a batch, so the caller sees the failure as it would from `loop.add_reader`.
        """
        want = (_IN if w.reader is not None else 0) | (_OUT if w.writer is not None else 0)
        have = w.armed
        if want == 0:
            del self._watches[fd]
            if have:
                w.armed = 0
                with contextlib.suppress(OSError):  # already closed: the kernel dropped it
                    self._ep.unregister(fd)
            return
        if want == have:
            return
        ep = self._ep
        if have == 0:
            try:
                ep.register(fd, want)
            except FileExistsError:  # forgotten but not closed (yet): take it over
                ep.modify(fd, want)
            w.armed = want
        else:
            try:
                ep.modify(fd, want)
            except FileNotFoundError:  # closed without `forget` and the number reused: re-add
                ep.register(fd, want)
            w.armed = want

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        watches = self._watches
        for fd in dirty:
            w = watches.get(fd)
            if w is None:
                continue
            try:
                self._apply(fd, w)
            except OSError:
                # The descriptor failed under us (closed by a bug, or the kernel is out of
                # watches): report it as ready so its owner's next syscall fails and tears the
                # connection down, instead of leaving it unwatched forever.
                watches.pop(fd, None)
                if w.reader is not None:
                    self._loop.call_soon(w.reader, *w.reader_args)
                elif w.writer is not None:
                    self._loop.call_soon(w.writer, *w.writer_args)

    def dispatch(self) -> None:
        """Run the callbacks of the ready descriptors (the loop calls this when the set is readable)."""
        try:
            events = self._ep.poll(0, _MAX_EVENTS)
        except InterruptedError:
            return
        watches, gone = self._watches, self._gone
        self._dispatching = True
        try:
            for fd, ev in events:
                if gone and fd in gone:
                    continue
                w = watches.get(fd)
                if w is None:
                    continue
                self.ready_events = ev
                if ev & _READ_EVENTS and w.reader is not None:
                    w.reader(*w.reader_args)
                    if gone and fd in gone:
                        continue
                if ev & _WRITE_EVENTS and w.writer is not None:
                    w.writer(*w.writer_args)
        finally:
            self._dispatching = False
            self.ready_events = _ERR
            gone.clear()
            if self._dirty:
                self._flush()


#: True when the compiled epoll set and pump (`_fastpath.c`) were built with the package.
COMPILED: Final[bool] = compiled is not None

if compiled is not None:
    AnyEpollSet = EpollSet | compiled.EpollSet
    #: For `isinstance`: either epoll set, the one written in Python or the compiled one.
    EPOLL_SETS: Final = (EpollSet, compiled.EpollSet)
else:  # pragma: no cover - the compiled module is built wherever the tests run
    AnyEpollSet = EpollSet  # type: ignore[misc]
    EPOLL_SETS = (EpollSet,)


def compiled_enabled() -> bool:
    """Whether new epoll sets are the compiled ones: when built, unless $PORTWAY_FASTPATH=0
    (for measuring one against the other, and as a way out should the C code misbehave)."""
    return COMPILED and os.environ.get("PORTWAY_FASTPATH", "1") != "0"


_sets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AnyEpollSet] = weakref.WeakKeyDictionary()


def epoll_set_for(loop: asyncio.AbstractEventLoop) -> AnyEpollSet | None:
    """The loop's engine epoll set, created on first use; None where epoll does not exist.

    The compiled set (see `compiled_enabled`) runs the compiled pump's events without the
    interpreter; both kinds take Python callbacks exactly alike.
    """
    if not HAVE_EPOLL:
        return None
    es = _sets.get(loop)
    if es is None or es.closed:
        es = _sets[loop] = compiled.EpollSet(loop) if compiled_enabled() else EpollSet(loop)
    return es
