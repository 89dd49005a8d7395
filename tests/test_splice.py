"""The splice pump on real loopback TCP sockets, under stock asyncio and uvloop.

Layout of every test::

    client <-> a  [pump]  b <-> server

``client`` and ``server`` play the two applications; the pump relays between ``a`` and ``b``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from portway.stream.epollset import COMPILED, HAVE_EPOLL, AnyEpollSet, EpollSet, compiled, epoll_set_for
from portway.stream.splice import (
    HAVE_SPLICE,
    SMALL_READ,
    CopyPump,
    PipePool,
    SplicePump,
    pipe_pool_for,
    start_pump,
)

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

LOOPS: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
if uvloop is not None:
    LOOPS.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
#: The pumps: `SplicePump` and `CopyPump` on the loop's readers, and the compiled pump on the
#: compiled epoll set (`_fastpath.c`), which the raw engine uses wherever it was built.
MODES = [
    pytest.param("splice", id="splice", marks=pytest.mark.skipif(not HAVE_SPLICE, reason="no os.splice")),
    pytest.param("copy", id="copy"),
    pytest.param(
        "compiled", id="compiled", marks=pytest.mark.skipif(not COMPILED, reason="_fastpath not built")
    ),
]


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(asyncio.wait_for(coro, 30))


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected non-blocking TCP sockets on loopback."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.setblocking(False)
        c = socket.socket()
        c.setblocking(False)
        connect = asyncio.ensure_future(loop.sock_connect(c, lsock.getsockname()))
        s, _ = await loop.sock_accept(lsock)
        await connect
    s.setblocking(False)
    return c, s


@dataclass
class Relay:
    client: socket.socket
    server: socket.socket
    pump: Any
    done: asyncio.Future[BaseException | None]
    socks: list[socket.socket] = field(default_factory=list)


class CountingSplicePump(SplicePump):
    """Counts reads from the source sockets, to prove the pump does not spin, and signals when a
    chunk could not be passed on at once (the receiver is stalled)."""

    __slots__ = ("fills", "stalled")

    def _fill(self, d: Any, more: bool) -> int:
        self.fills = getattr(self, "fills", 0) + 1
        return super()._fill(d, more)

    def _flush(self, d: Any) -> None:
        super()._flush(d)
        if d.pending:  # the pump now parks this direction until the receiver is writable
            self.stalled = True


class CountingCopyPump(CopyPump):
    __slots__ = ("fills", "stalled")

    def _fill(self, d: Any, more: bool) -> int:
        self.fills = getattr(self, "fills", 0) + 1
        return super()._fill(d, more)

    def _flush(self, d: Any) -> None:
        super()._flush(d)
        if d.pending:  # the pump now parks this direction until the receiver is writable
            self.stalled = True


@asynccontextmanager
async def relayed(mode: str, *, counting: bool = False) -> AsyncIterator[Relay]:
    """A pump of `mode` (see MODES) between fresh connected pairs, started."""
    loop = asyncio.get_running_loop()
    client, a = await tcp_pair()
    b, server = await tcp_pair()
    done: asyncio.Future[BaseException | None] = loop.create_future()
    pump: Any
    io = None
    if mode == "compiled":
        io = compiled.EpollSet(loop)
        pump = compiled.Pump(io, a, b, done.set_result, pipe_pool_for(loop))
        pump.start()
    elif counting:
        pump = (CountingSplicePump if mode == "splice" else CountingCopyPump)(loop, a, b, done.set_result)
        pump.start()
    else:
        pump = start_pump(loop, a, b, done.set_result, use_splice=mode == "splice")
    relay = Relay(client, server, pump, done, [client, a, b, server])
    try:
        yield relay
    finally:
        pump.close()
        for s in relay.socks:
            if io is not None:
                io.forget(s.fileno())
            s.close()
        if io is not None:
            io.close()


async def recv_all(sock: socket.socket) -> bytes:
    """Read until EOF."""
    loop = asyncio.get_running_loop()
    parts = []
    while chunk := await loop.sock_recv(sock, 1 << 16):
        parts.append(chunk)
    return b"".join(parts)


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        assert chunk, "unexpected EOF"
        buf += chunk
    return bytes(buf)


async def send_and_close(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


def both(loop_test: Callable[[str], Awaitable[None]]) -> Callable[..., None]:
    """Turn ``async def t(mode)`` into a test parametrised over loops and pumps (MODES)."""

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("loop_factory", LOOPS)
    def wrapper(loop_factory: Callable[[], asyncio.AbstractEventLoop], mode: str) -> None:
        async def body() -> None:
            await loop_test(mode)

        run(loop_factory, body())

    wrapper.__name__ = loop_test.__name__
    wrapper.__doc__ = loop_test.__doc__
    return wrapper


@both
async def test_bytes_arrive_exactly_in_both_directions_at_once(mode: str) -> None:
    """Several MiB each way, concurrently: every byte arrives, in order, and EOF is forwarded."""
    up, down = os.urandom(6 << 20), os.urandom(5 << 20)
    async with relayed(mode) as r:
        got_up, got_down, _, _ = await asyncio.gather(
            recv_all(r.server),
            recv_all(r.client),
            send_and_close(r.client, up),
            send_and_close(r.server, down),
        )
        assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
        assert await r.done is None
        assert (r.pump.bytes_a_to_b, r.pump.bytes_b_to_a) == (len(up), len(down))


@both
async def test_half_close_keeps_the_other_direction_flowing(mode: str) -> None:
    """Client says EOF first; the server still answers afterwards and the client reads it all."""
    loop = asyncio.get_running_loop()
    async with relayed(mode) as r:
        await send_and_close(r.client, b"request")
        assert await recv_all(r.server) == b"request"  # EOF reached the server
        assert not r.done.done()
        answer = os.urandom(1 << 20)
        await loop.sock_sendall(r.server, answer)
        assert await recv_exactly(r.client, len(answer)) == answer
        r.server.shutdown(socket.SHUT_WR)
        assert await recv_all(r.client) == b""
        assert await r.done is None


@both
async def test_reset_on_one_side_reports_the_error(mode: str) -> None:
    async with relayed(mode) as r:
        # SO_LINGER with a zero timeout turns close() into a RST.
        r.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.client.close()
        r.socks.remove(r.client)
        exc = await r.done
        assert isinstance(exc, OSError)
        assert r.pump.closed


@both
async def test_slow_reader_applies_backpressure_without_spinning(mode: str) -> None:
    """While the server does not read, the pump holds at most one pipe per direction and stops
    polling the client; once the server reads, everything arrives."""
    loop = asyncio.get_running_loop()
    pool = pipe_pool_for(loop)
    data = os.urandom(32 << 20)  # far more than the socket buffers on both hops can hold
    async with relayed(mode, counting=True) as r:
        pump: Any = r.pump
        sender = asyncio.ensure_future(loop.sock_sendall(r.client, data))

        # Let the buffers fill up: wait until the pump is parked on a chunk it could not pass on.
        # (Each pass yields to the loop once, so the pump and the sender make progress.)
        # The compiled pump counts its reads itself and reports the bytes it holds.
        def stalled() -> bool:
            return bool(pump.held if mode == "compiled" else getattr(pump, "stalled", False))

        def reads() -> int:
            return int(pump.reads if mode == "compiled" else pump.fills)

        for _ in range(100_000):
            if stalled():
                break
            await asyncio.sleep(0)
        assert stalled()
        before = reads()
        for _ in range(200):
            await asyncio.sleep(0)
            assert pool.in_use <= 2
        assert reads() == before, "pump kept reading while the receiver was stalled"
        assert not sender.done()
        got, _ = await asyncio.gather(recv_exactly(r.server, len(data)), sender)
        assert got == data
        if mode != "copy":
            assert r.pump.pipes_held == 0


@both
async def test_idle_connections_hold_no_pipes(mode: str) -> None:
    loop = asyncio.get_running_loop()
    pool = pipe_pool_for(loop)
    async with (
        relayed(mode) as r1,
        relayed(mode) as r2,
        relayed(mode) as r3,
    ):
        for r in (r1, r2, r3):
            await loop.sock_sendall(r.client, b"ping")
            assert await recv_exactly(r.server, 4) == b"ping"
            await loop.sock_sendall(r.server, b"pong")
            assert await recv_exactly(r.client, 4) == b"pong"
        assert pool.in_use == 0
        if mode != "copy":
            assert all(r.pump.pipes_held == 0 for r in (r1, r2, r3))


def test_pool_keeps_at_most_max_idle_pipes() -> None:
    pool = PipePool(max_idle=2, pipe_size=0)
    pipes = [pool.acquire() for _ in range(5)]
    assert pool.in_use == 5
    for p in pipes:
        pool.release(p)
    assert (pool.in_use, pool.idle) == (0, 2)
    # The three pipes beyond the bound were closed.
    closed = 0
    for r, _ in pipes:
        try:
            os.fstat(r)
        except OSError:
            closed += 1
    assert closed == 3
    pool.close()
    assert pool.idle == 0


def on_epoll_set(test: Callable[[], Awaitable[None]]) -> Callable[..., None]:
    """Run ``async def t()`` under both loops with the splice pump on the engine's epoll set."""

    @pytest.mark.skipif(not (HAVE_SPLICE and HAVE_EPOLL), reason="splice and epoll are Linux-only")
    @pytest.mark.parametrize("loop_factory", LOOPS)
    def wrapper(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        run(loop_factory, test())

    wrapper.__name__ = test.__name__
    wrapper.__doc__ = test.__doc__
    return wrapper


PUMPS = [
    pytest.param("python", id="python-pump"),
    pytest.param("compiled", id="compiled-pump", marks=pytest.mark.skipif(not COMPILED, reason="not built")),
]


def on_epoll_set_each_pump(test: Callable[[str], Awaitable[None]]) -> Callable[..., None]:
    """Run ``async def t(kind)`` under both loops, once with `SplicePump` on the Python epoll
    set and once with the compiled pump on the compiled set."""

    @pytest.mark.skipif(not (HAVE_SPLICE and HAVE_EPOLL), reason="splice and epoll are Linux-only")
    @pytest.mark.parametrize("kind", PUMPS)
    @pytest.mark.parametrize("loop_factory", LOOPS)
    def wrapper(loop_factory: Callable[[], asyncio.AbstractEventLoop], kind: str) -> None:
        run(loop_factory, test(kind))

    wrapper.__name__ = test.__name__
    wrapper.__doc__ = test.__doc__
    return wrapper


def pump_of_kind(
    kind: str,
    io: AnyEpollSet,
    a: socket.socket,
    b: socket.socket,
    done: asyncio.Future[BaseException | None],
    pool: PipePool,
) -> Any:
    loop = asyncio.get_running_loop()
    if kind == "compiled":
        assert isinstance(io, compiled.EpollSet)
        return compiled.Pump(io, a, b, done.set_result, pool)
    return SplicePump(loop, a, b, done.set_result, pool, io=io)


class WakeCountingPump(SplicePump):
    """Counts readiness callbacks per direction (0: a -> b)."""

    __slots__ = ("wakeups",)

    def _on_readable(self, d: Any, unprompted: bool = False) -> None:
        if not hasattr(self, "wakeups"):
            self.wakeups = [0, 0]
        self.wakeups[0 if d is self._dirs[0] else 1] += 1
        super()._on_readable(d, unprompted)


@asynccontextmanager
async def on_set_sockets(kind: str = "") -> AsyncIterator[tuple[AnyEpollSet, list[socket.socket]]]:
    """An engine epoll set and ``client, a, b, server`` (as in `relayed`), for a pump the test
    starts itself; the sockets leave the set and close afterwards. The set is the loop's own,
    or for `kind` "python" / "compiled" a fresh one of that kind."""
    loop = asyncio.get_running_loop()
    fresh: AnyEpollSet | None = None
    if kind:
        fresh = EpollSet(loop) if kind == "python" else compiled.EpollSet(loop)
    io = fresh or epoll_set_for(loop)
    assert io is not None
    client, a = await tcp_pair()
    b, server = await tcp_pair()
    socks = [client, a, b, server]
    try:
        yield io, socks
    finally:
        for s in socks:
            io.forget(s.fileno())
            s.close()
        if fresh is not None:
            fresh.close()


@on_epoll_set
async def test_data_and_fin_queued_together_move_in_one_wakeup() -> None:
    """The event carrying the client's last bytes also says it sent FIN (EPOLLRDHUP): the pump
    reads on to the EOF and forwards bytes and FIN in the same callback, not in two."""
    loop = asyncio.get_running_loop()
    async with on_set_sockets() as (io, (client, a, b, server)):
        done: asyncio.Future[BaseException | None] = loop.create_future()
        # On loopback the bytes and the FIN are queued on `a` by the time these calls return.
        client.sendall(b"request" * 20)
        client.shutdown(socket.SHUT_WR)
        pump = WakeCountingPump(loop, a, b, done.set_result, io=io)
        pump.start()
        try:
            assert await recv_all(server) == b"request" * 20
            assert pump.wakeups[0] == 1
            server.shutdown(socket.SHUT_WR)
            assert await recv_all(client) == b""
            assert await done is None
        finally:
            pump.close()


async def peer_closed(sock: socket.socket) -> None:
    """Wait until `sock`'s peer has sent FIN (so everything it sent before is queued)."""
    loop = asyncio.get_running_loop()
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLRDHUP)
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(ep.fileno(), ready.set_result, None)
    try:
        await ready
    finally:
        loop.remove_reader(ep.fileno())
        ep.close()


@on_epoll_set_each_pump
async def test_fin_behind_more_segments_than_a_pipe_holds_loses_nothing(kind: str) -> None:
    """A short splice read is not proof the socket is empty (a one-page pipe takes one segment
    per read): with FIN seen, the pump reads to the real EOF, whatever the segmentation."""
    loop = asyncio.get_running_loop()
    pool = PipePool(max_idle=2, pipe_size=4096)
    async with on_set_sockets(kind) as (io, (client, a, b, server)):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        bulk = os.urandom(2 * SMALL_READ)  # fills the copy buffer: the direction turns to splice
        client.sendall(bulk)
        tail = os.urandom(400 * 30)
        for i in range(0, len(tail), 30):
            client.sendall(tail[i : i + 30])
        sent = bulk + tail
        client.shutdown(socket.SHUT_WR)
        await peer_closed(a)  # every segment and the FIN are queued before the pump starts
        done: asyncio.Future[BaseException | None] = loop.create_future()
        pump = pump_of_kind(kind, io, a, b, done, pool)
        pump.start()
        try:
            got = await recv_all(server)
            assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()
            server.shutdown(socket.SHUT_WR)
            assert await done is None
        finally:
            pump.close()
            pool.close()


class CountingPipePool(PipePool):
    __slots__ = ("acquired",)

    def acquire(self) -> tuple[int, int]:
        self.acquired = getattr(self, "acquired", 0) + 1
        return super().acquire()


@on_epoll_set_each_pump
async def test_small_messages_are_copied_and_bulk_is_spliced(kind: str) -> None:
    """Request/response-sized messages never take a pipe; the first read that fills the copy
    buffer turns that direction (only that one) to splice, and every byte still arrives."""
    loop = asyncio.get_running_loop()
    pool = CountingPipePool()
    async with on_set_sockets(kind) as (io, (client, a, b, server)):
        done: asyncio.Future[BaseException | None] = loop.create_future()
        pump = pump_of_kind(kind, io, a, b, done, pool)
        pump.start()
        try:
            for _ in range(20):
                await loop.sock_sendall(client, b"GET / HTTP/1.1\r\n\r\n")
                assert await recv_exactly(server, 18) == b"GET / HTTP/1.1\r\n\r\n"
                await loop.sock_sendall(server, b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 300)
                assert len(await recv_exactly(client, 19 + 300)) == 319
            assert getattr(pool, "acquired", 0) == 0
            body = os.urandom(4 << 20)
            got, _ = await asyncio.gather(recv_exactly(client, len(body)), loop.sock_sendall(server, body))
            assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
            assert pool.acquired > 0
            acquired = pool.acquired
            await loop.sock_sendall(client, b"still copied")
            assert await recv_exactly(server, 12) == b"still copied"
            assert pool.acquired == acquired  # the client's direction never turned to splice
        finally:
            pump.close()
            pool.close()
