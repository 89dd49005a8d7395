"""The raw-socket engine's own epoll set, on real sockets, under both loops (see conftest).

What it must keep from the loop's `add_reader`/`add_writer`: callbacks run when the descriptor
is ready and not after they are removed; what it adds: interest changes made inside a batch
are applied once after it, and a descriptor forgotten (closed) during a batch gets no stale
callback even if its number is reused at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator

import pytest

from portway.stream.epollset import (
    COMPILED,
    HAVE_EPOLL,
    AnyEpollSet,
    EpollSet,
    compiled,
    compiled_enabled,
    epoll_set_for,
)

pytestmark = pytest.mark.skipif(not HAVE_EPOLL, reason="select.epoll is Linux-only")


@pytest.fixture(
    params=[
        pytest.param("python"),
        pytest.param("compiled", marks=pytest.mark.skipif(not COMPILED, reason="_fastpath not built")),
    ]
)
async def es(request: pytest.FixtureRequest) -> AsyncIterator[AnyEpollSet]:
    """A fresh epoll set of each kind, the one in Python and the compiled one, on this loop."""
    loop = asyncio.get_running_loop()
    s: AnyEpollSet = EpollSet(loop) if request.param == "python" else compiled.EpollSet(loop)
    yield s
    s.close()


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def test_one_set_per_loop_of_the_kind_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    first = epoll_set_for(loop)
    assert first is not None and epoll_set_for(loop) is first
    assert isinstance(first, compiled.EpollSet if compiled_enabled() else EpollSet)
    first.close()
    monkeypatch.setenv("PORTWAY_FASTPATH", "0")  # a closed set is replaced, here by the Python one
    second = epoll_set_for(loop)
    assert isinstance(second, EpollSet) and epoll_set_for(loop) is second
    second.close()


async def test_reports_readable_then_stops_after_remove(es: AnyEpollSet) -> None:
    loop = asyncio.get_running_loop()
    a, b = pair()
    got: asyncio.Queue[bytes] = asyncio.Queue()
    try:
        es.add_reader(a.fileno(), lambda: got.put_nowait(a.recv(100)))
        b.send(b"one")
        assert await got.get() == b"one"
        assert es.remove_reader(a.fileno())
        assert not es.remove_reader(a.fileno())
        b.send(b"two")
        # A reader on the loop itself proves a full loop iteration passed with data waiting.
        seen = asyncio.Event()
        loop.add_reader(a.fileno(), seen.set)
        await seen.wait()
        loop.remove_reader(a.fileno())
        assert got.empty()
        assert a.recv(100) == b"two"
    finally:
        es.forget(a.fileno())
        a.close()
        b.close()


async def test_writer_fires_and_reader_and_writer_share_one_descriptor(es: AnyEpollSet) -> None:
    a, b = pair()
    events: asyncio.Queue[str] = asyncio.Queue()

    def on_write() -> None:
        es.remove_writer(a.fileno())
        events.put_nowait("w")

    try:
        es.add_reader(a.fileno(), lambda: (a.recv(100), events.put_nowait("r")))
        es.add_writer(a.fileno(), on_write)
        assert await events.get() == "w"
        b.send(b"x")
        assert await events.get() == "r"
    finally:
        es.forget(a.fileno())
        a.close()
        b.close()


async def test_changes_inside_a_batch_are_applied_after_it(es: AnyEpollSet) -> None:
    """A reader that swaps itself for a writer (as the pump does under backpressure) keeps
    working: the swap is one MOD after the batch, and the writer then runs."""
    a, b = pair()
    done = asyncio.Event()

    def on_read() -> None:
        a.recv(100)
        es.remove_reader(a.fileno())
        es.add_writer(a.fileno(), on_write)

    def on_write() -> None:
        es.remove_writer(a.fileno())
        done.set()

    try:
        es.add_reader(a.fileno(), on_read)
        b.send(b"x")
        await done.wait()
        assert not es.watching(a.fileno())  # no interest left: removed from the kernel's set
    finally:
        es.forget(a.fileno())
        a.close()
        b.close()


async def test_descriptor_forgotten_in_a_batch_gets_no_stale_callback(es: AnyEpollSet) -> None:
    """The first ready descriptor's callback forgets the second (as a connection does before
    closing it) and registers its number again (as a redial reusing the number would); the
    second's pending event must not reach the new callback in the same batch. Being
    level-triggered, the new owner hears of its readiness on the next batch instead."""
    a1, b1 = pair()
    a2, b2 = pair()
    calls: list[str] = []
    try:

        def first() -> None:
            calls.append("first")
            a1.recv(100)
            es.remove_reader(a1.fileno())
            if "second" not in calls:
                es.forget(a2.fileno())
                es.add_reader(a2.fileno(), lambda: calls.append("new owner"))

        def second() -> None:
            calls.append("second")

        es.add_reader(a1.fileno(), first)
        es.add_reader(a2.fileno(), second)
        b1.send(b"x")
        b2.send(b"y")
        es.dispatch()  # one batch holding both descriptors, in the kernel's order
        assert calls in (["first"], ["second", "first"])
        es.dispatch()
        if calls[0] == "first":
            assert calls == ["first", "new owner"]
    finally:
        for s in (a1, b1, a2, b2):
            s.close()


async def test_a_number_closed_without_forget_and_reused_still_works(es: AnyEpollSet) -> None:
    """A bug elsewhere (a close without `forget`) must not break the next socket that gets the
    same number: the kernel dropped the old registration, so MOD fails and ADD is used."""
    a, b = pair()
    c, d = pair()
    number = a.fileno()
    fired = asyncio.Event()
    try:
        es.add_reader(number, lambda: None)
        a.close()  # no forget
        os.dup2(c.fileno(), number)  # a new socket under the old number
        es.add_writer(number, lambda: (es.remove_writer(number), fired.set()))
        await fired.wait()
    finally:
        es.forget(number)
        os.close(number)
        for s in (b, c, d):
            s.close()
