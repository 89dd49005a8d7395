"""The compiled core's own fault paths (`stream/_fastpath.c`), on real sockets, under both loops.

Relaying itself is tested with every pump in `test_splice.py` and through the engine in
`test_tcp.py`; here are the cases only C code can get wrong: a pump's descriptor forgotten in
the middle of a batch, a completion callback that raises, a pump dropped while registered, a
closed set, a closed socket, a dial the pump finishes itself (told to Python only when asked,
refused, refused twice); and UDP's: a lane's bursts, a closed listener, ICMP unreachable;
an inlet's bindings (relayed in C, replaced, unbound by an error, released on close); bad
addresses.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
import weakref
from collections.abc import AsyncIterator, Iterator

import pytest

from portway.stream.epollset import COMPILED, compiled
from portway.stream.splice import PipePool, pipe_pool_for
from tests.test_splice import recv_exactly, tcp_pair

pytestmark = pytest.mark.skipif(not COMPILED, reason="the compiled core (_fastpath) was not built")


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


@pytest.fixture
async def es() -> AsyncIterator[compiled.EpollSet]:
    s = compiled.EpollSet(asyncio.get_running_loop())
    yield s
    s.close()


async def test_pump_descriptor_forgotten_in_a_batch_gets_no_stale_event(es: compiled.EpollSet) -> None:
    """A callback earlier in the batch closes a pump and forgets its descriptor, and a new
    owner takes the number at once: the pump's pending event reaches neither."""
    loop = asyncio.get_running_loop()
    a1, b1 = pair()
    a, client = pair()
    b, server = pair()
    done: list[BaseException | None] = []
    pump = compiled.Pump(es, a, b, done.append, pipe_pool_for(loop))
    calls: list[str] = []
    try:
        pump.start()

        def first() -> None:
            calls.append("first")
            a1.recv(100)
            es.remove_reader(a1.fileno())
            if pump.bytes_a_to_b == 0:
                pump.close()
                es.forget(a.fileno())
                es.add_reader(a.fileno(), lambda: calls.append("new owner"))

        es.add_reader(a1.fileno(), first)
        b1.send(b"x")
        client.send(b"for the pump")
        es.dispatch()  # one batch holding both descriptors, in the kernel's order
        assert calls == ["first"]
        if pump.bytes_a_to_b == 0:  # the Python reader ran first and closed the pump
            assert pump.closed and done == []
            es.dispatch()  # level-triggered: the new owner hears of the bytes now
            assert calls == ["first", "new owner"]
        else:  # the pump ran first and relayed
            assert server.recv(100) == b"for the pump"
    finally:
        pump.close()
        for s in (a1, b1, a, b, client, server):
            es.forget(s.fileno())
            s.close()


async def test_a_raising_completion_callback_reaches_the_loop_and_the_set_goes_on(
    es: compiled.EpollSet,
) -> None:
    loop = asyncio.get_running_loop()
    a, client = pair()
    b, server = pair()

    def done(exc: BaseException | None) -> None:
        raise RuntimeError("bug in on_done")

    pump = compiled.Pump(es, a, b, done, pipe_pool_for(loop))
    other_a, other_b = pair()
    try:
        pump.start()
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        with pytest.raises(RuntimeError, match="bug in on_done"):
            es.dispatch()  # both EOFs are queued (socket pairs are synchronous): one batch
        assert pump.closed
        assert not es.watching(a.fileno()) and not es.watching(b.fileno())
        got = asyncio.Event()
        es.add_reader(other_a.fileno(), got.set)
        other_b.send(b"y")
        await got.wait()  # the loop still dispatches the set
    finally:
        pump.close()
        for s in (a, b, client, server, other_a, other_b):
            es.forget(s.fileno())
            s.close()


async def test_a_pump_dropped_while_registered_unhooks_itself(es: compiled.EpollSet) -> None:
    loop = asyncio.get_running_loop()
    a, client = pair()
    b, server = pair()
    try:
        pump = compiled.Pump(es, a, b, lambda exc: None, pipe_pool_for(loop))
        pump.start()
        assert es.watching(a.fileno()) and es.watching(b.fileno())
        del pump
        gc.collect()
        assert not es.watching(a.fileno()) and not es.watching(b.fileno())
        client.send(b"nobody reads this")
        es.dispatch()  # no event for a pump that is gone
        assert a.recv(100) == b"nobody reads this"
    finally:
        for s in (a, b, client, server):
            es.forget(s.fileno())
            s.close()


async def test_a_closed_set_refuses_new_interest_with_a_clear_error() -> None:
    loop = asyncio.get_running_loop()
    es = compiled.EpollSet(loop)
    a, client = pair()
    b, server = pair()
    try:
        pump = compiled.Pump(es, a, b, lambda exc: None, pipe_pool_for(loop))
        es.close()
        assert es.closed
        with pytest.raises(ValueError, match="closed epoll set"):
            es.add_reader(a.fileno(), lambda: None)
        with pytest.raises(ValueError, match="closed epoll set"):
            pump.start()
        assert not es.remove_reader(a.fileno())
        pump.close()
    finally:
        for s in (a, b, client, server):
            s.close()


async def test_a_pump_on_a_closed_socket_is_refused(es: compiled.EpollSet) -> None:
    loop = asyncio.get_running_loop()
    a, b = pair()
    b.close()
    try:
        with pytest.raises(ValueError, match="socket is closed"):
            compiled.Pump(es, a, b, lambda exc: None, pipe_pool_for(loop))
        with pytest.raises(ValueError, match="invalid file descriptor"):
            es.add_reader(-1, lambda: None)
    finally:
        a.close()


async def test_bytes_left_after_a_wakeups_rounds_are_read_without_a_new_edge(es: compiled.EpollSet) -> None:
    """Edge-triggered: a direction that stops after its rounds per wake-up (8 reads of a 4 KiB
    pipe here) with bytes still queued gets no new event for them; the set comes back to it.
    Everything is queued before the pump starts and the client then stays silent."""
    loop = asyncio.get_running_loop()
    client, a = await tcp_pair()
    b, server = await tcp_pair()
    pool = PipePool(max_idle=2, pipe_size=4096)
    done: asyncio.Future[BaseException | None] = loop.create_future()
    data = os.urandom(512 * 1024)
    try:
        await loop.sock_sendall(client, data)  # queued in `a` (and client's send buffer)
        pump = compiled.Pump(es, a, b, done.set_result, pool)
        pump.start()
        assert await recv_exactly(server, len(data)) == data
        assert pump.reads > 8 * 4  # far more than one wake-up's rounds
        pump.close()
    finally:
        for s in (client, a, b, server):
            es.forget(s.fileno())
            s.close()
        pool.close()


def udp_pair() -> tuple[socket.socket, socket.socket]:
    """A session socket connected to a target socket, both bound on loopback."""
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind(("127.0.0.1", 0))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(target.getsockname())
    target.connect(sock.getsockname())
    return sock, target


def udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


async def recv_from(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: got.done() or got.set_result(sock.recv(70000)))
    try:
        return await asyncio.wait_for(got, 5)
    finally:
        loop.remove_reader(sock.fileno())


def quiet_inlet(es: compiled.EpollSet, listener: socket.socket) -> compiled.Inlet:
    """An inlet that is never started: the lanes' replies leave through it."""
    return compiled.Inlet(es, listener, lambda data, addr: None, lambda exc: None)


async def test_a_lane_relays_a_burst_of_replies_whole_and_in_order(es: compiled.EpollSet) -> None:
    """More replies than one recvmmsg takes, of every size up to the largest datagram."""
    sock, target = udp_pair()
    listener, client = udp_socket(), udp_socket()
    inlet = quiet_inlet(es, listener)
    lane = compiled.Lane(es, sock, inlet, client.getsockname(), lambda exc: None)
    replies = [bytes([i]) * size for i, size in enumerate((1, 65507, 300, *range(1, 30)))]
    try:
        lane.start()
        for r in replies:
            target.send(r)
        for r in replies:
            assert await recv_from(client) == r
        assert (lane.dgrams_down, lane.bytes_down) == (len(replies), sum(map(len, replies)))
        assert lane.touched
    finally:
        lane.close()
        es.forget(sock.fileno())
        for s in (sock, target, listener, client):
            s.close()


async def test_a_lane_reports_icmp_unreachable_and_drops_replies_once_its_inlet_closed(
    es: compiled.EpollSet,
) -> None:
    sock, target = udp_pair()
    listener, client = udp_socket(), udp_socket()
    inlet = quiet_inlet(es, listener)
    errors: asyncio.Queue[OSError] = asyncio.Queue()
    lane = compiled.Lane(es, sock, inlet, client.getsockname(), errors.put_nowait)
    try:
        lane.start()
        inlet.close()
        assert inlet.closed and not lane.bind()  # nothing binds to a closed inlet
        target.send(b"nobody gets this")  # loopback delivers it before send returns
        es.dispatch()
        assert lane.dgrams_down == 1  # received and counted, not sent: the listener is gone
        with pytest.raises(BlockingIOError):
            client.recv(100)
        target.close()  # the target's port is closed: the next datagram draws ICMP unreachable
        lane.send(b"anyone?")
        exc = await asyncio.wait_for(errors.get(), 5)
        assert isinstance(exc, ConnectionRefusedError)
    finally:
        lane.close()
        es.forget(sock.fileno())
        for s in (sock, target, listener, client):
            s.close()


class InletRig:
    """A started inlet on a listening socket, a target, and a queue of what reached Python."""

    def __init__(self, es: compiled.EpollSet) -> None:
        self.es = es
        self.listener = udp_socket()
        self.to_python: asyncio.Queue[tuple[bytes, object]] = asyncio.Queue()
        self.errors: asyncio.Queue[OSError] = asyncio.Queue()
        self.inlet = compiled.Inlet(
            es,
            self.listener,
            lambda data, addr: self.to_python.put_nowait((data, addr)),
            self.errors.put_nowait,
        )
        self.inlet.start()
        self.sock, self.target = udp_pair()
        self.target.setblocking(False)
        self.lane_errors: asyncio.Queue[OSError] = asyncio.Queue()
        self.lanes: list[compiled.Lane] = []

    def lane(self, client: object, sock: socket.socket | None = None) -> compiled.Lane:
        lane = compiled.Lane(self.es, sock or self.sock, self.inlet, client, self.lane_errors.put_nowait)
        lane.start()
        self.lanes.append(lane)
        return lane

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()
        return host, port

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()
        self.inlet.close()
        self.es.forget(self.listener.fileno())
        self.es.forget(self.sock.fileno())
        for s in (self.listener, self.sock, self.target):
            s.close()


@pytest.fixture
def rig(es: compiled.EpollSet) -> Iterator[InletRig]:
    r = InletRig(es)
    yield r
    r.close()


async def test_an_inlet_relays_a_bound_client_in_c_and_everyone_else_through_python(rig: InletRig) -> None:
    client, stranger = udp_socket(), udp_socket()
    try:
        client.sendto(b"first", rig.address)
        assert await asyncio.wait_for(rig.to_python.get(), 5) == (b"first", client.getsockname())
        lane = rig.lane(client.getsockname())
        assert lane.bind() and lane.bound and rig.inlet.bound == 1
        burst = [bytes([i]) * size for i, size in enumerate((1, 65507, 300, *range(1, 30)))]
        for data in burst:
            client.sendto(data, rig.address)
        for data in burst:
            assert await recv_from(rig.target) == data  # whole and in order
        assert (lane.dgrams_up, lane.bytes_up) == (len(burst), sum(map(len, burst)))
        assert rig.inlet.direct == len(burst) and lane.touched
        stranger.sendto(b"who?", rig.address)
        assert await asyncio.wait_for(rig.to_python.get(), 5) == (b"who?", stranger.getsockname())
        lane.unbind()
        assert not lane.bound and rig.inlet.bound == 0
        client.sendto(b"again", rig.address)
        assert await asyncio.wait_for(rig.to_python.get(), 5) == (b"again", client.getsockname())
        assert rig.to_python.empty() and rig.inlet.direct == len(burst)
    finally:
        client.close()
        stranger.close()


async def test_a_binding_sends_its_prefix_before_every_datagram_and_counts_it(rig: InletRig) -> None:
    client = udp_socket()
    try:
        lane = rig.lane(client.getsockname())
        lane.bind(b"HEADER:")
        client.sendto(b"payload", rig.address)
        assert await recv_from(rig.target) == b"HEADER:payload"
        assert (lane.dgrams_up, lane.bytes_up) == (1, len(b"HEADER:payload"))
        lane.send(b"from python")  # Python adds its own header: the lane does not add another
        assert await recv_from(rig.target) == b"from python"
    finally:
        client.close()


async def test_a_new_binding_for_a_client_replaces_the_old_one(rig: InletRig) -> None:
    client = udp_socket()
    sock2, target2 = udp_pair()
    try:
        first = rig.lane(client.getsockname())
        second = rig.lane(client.getsockname(), sock2)
        first.bind()
        second.bind()
        assert not first.bound and second.bound and rig.inlet.bound == 1
        client.sendto(b"to the second", rig.address)
        assert await recv_from(target2) == b"to the second"
        first.close()  # closing the old one must not unbind the new one
        assert second.bound and rig.inlet.bound == 1
        second.close()
        assert not second.bound and rig.inlet.bound == 0
    finally:
        rig.es.forget(sock2.fileno())
        for s in (client, sock2, target2):
            s.close()


async def test_an_unreachable_target_unbinds_its_lane_and_the_client_goes_through_python(
    rig: InletRig,
) -> None:
    client = udp_socket()
    try:
        lane = rig.lane(client.getsockname())
        lane.bind()
        rig.target.close()  # ICMP port unreachable for what the lane sends from now on
        client.sendto(b"lost", rig.address)
        exc = await asyncio.wait_for(rig.lane_errors.get(), 5)
        assert isinstance(exc, ConnectionRefusedError)
        assert not lane.bound
        client.sendto(b"to python", rig.address)
        assert await asyncio.wait_for(rig.to_python.get(), 5) == (b"to python", client.getsockname())
    finally:
        client.close()


async def test_unbind_all_and_close_release_every_binding(rig: InletRig) -> None:
    clients = [udp_socket() for _ in range(3)]
    try:
        lanes = [rig.lane(c.getsockname()) for c in clients]
        for lane in lanes:
            lane.bind()
        assert rig.inlet.bound == 3
        rig.inlet.unbind_all()
        assert rig.inlet.bound == 0 and not any(lane.bound for lane in lanes)
        for lane in lanes:
            lane.bind()
        rig.inlet.close()
        assert rig.inlet.closed and rig.inlet.bound == 0 and not any(lane.bound for lane in lanes)
        clients[0].sendto(b"nobody reads this", rig.address)
        rig.es.dispatch()
        assert rig.to_python.empty() and rig.inlet.direct == 0
        del lanes
        gc.collect()  # lanes and their inlet refer to each other: the collector frees them
    finally:
        for c in clients:
            c.close()


async def test_an_inlet_and_its_lanes_refuse_bad_input_by_name(es: compiled.EpollSet) -> None:
    sock, target = udp_pair()
    listener = udp_socket()
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    other = compiled.EpollSet(asyncio.get_running_loop())
    inlet = quiet_inlet(es, listener)
    try:
        with pytest.raises(ValueError, match="invalid client address"):
            compiled.Lane(es, sock, inlet, ("not-an-ip", 53), lambda exc: None)
        with pytest.raises(ValueError, match="invalid client address"):
            compiled.Lane(es, sock, inlet, ("127.0.0.1", 53, 0, 0), lambda exc: None)  # not IPv4's form
        with pytest.raises(ValueError, match="share an epoll set"):
            compiled.Lane(other, sock, inlet, ("127.0.0.1", 53), lambda exc: None)
        with pytest.raises(ValueError, match="unsupported address family"):
            compiled.Inlet(es, unix, lambda data, addr: None, lambda exc: None)
    finally:
        other.close()
        for s in (sock, target, listener, unix):
            s.close()


async def test_accept_and_connect_make_working_non_blocking_socket_objects() -> None:
    """The socket objects made without the constructor (`DIRECT_SOCKETS`) behave like any."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    dialed, err = compiled.connect(socket.AF_INET, listener.getsockname())
    assert dialed is not None and err == 0
    accepted, peer = compiled.accept(listener.fileno())
    try:
        assert peer == dialed.getsockname() and accepted.getpeername() == peer
        for s in (dialed, accepted):
            assert s.gettimeout() == 0.0 and s.family == socket.AF_INET and s.type == socket.SOCK_STREAM
            assert not os.get_inheritable(s.fileno())
        assert dialed.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        dialed.send(b"ping")
        assert await asyncio.wait_for(asyncio.get_running_loop().sock_recv(accepted, 4), 5) == b"ping"
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            compiled.accept(listener.fileno())
    finally:
        for s in (dialed, accepted, listener):
            s.close()
    assert dialed.fileno() == -1 and accepted.fileno() == -1


async def test_connect_reports_refusal_and_refuses_bad_addresses_by_name() -> None:
    closed = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    closed.bind(("::1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    sock, err = compiled.connect(socket.AF_INET6, ("::1", port, 0, 0))
    if sock is not None:  # refused later: the error is the socket's
        try:
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            loop.add_writer(sock.fileno(), lambda: ready.done() or ready.set_result(None))
            await asyncio.wait_for(ready, 5)
            loop.remove_writer(sock.fileno())
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        finally:
            sock.close()
    assert err == errno.ECONNREFUSED
    with pytest.raises(ValueError, match="invalid client address"):
        compiled.connect(socket.AF_INET, ("not-an-ip", 80))
    with pytest.raises(ValueError, match="unsupported address family"):
        compiled.connect(socket.AF_UNIX, "/tmp/x")


class Dialed:
    """An `on_dialed` callback that records its codes and can announce the first one."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.first: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        if not self.first.done():
            self.first.set_result(code)


async def accept_one(listener: socket.socket) -> socket.socket:
    conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(listener), 5)
    conn.setblocking(False)
    return conn


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()
    s.setblocking(False)
    yield s
    s.close()


async def test_a_dial_launches_the_pump_in_c_and_python_hears_nothing(
    es: compiled.EpollSet, listener: socket.socket
) -> None:
    """The client spoke before the target answered: its bytes are relayed the moment the dial
    connects, both ways work after, and no Python callback ran (`notify` off)."""
    loop = asyncio.get_running_loop()
    a, client = pair()
    b, err = compiled.connect(socket.AF_INET, listener.getsockname())
    assert b is not None and err == 0
    dialed = Dialed()
    pump = compiled.Pump(es, a, b, lambda exc: None, pipe_pool_for(loop))
    client.send(b"hello")
    pump.dial(dialed, True, False)
    assert not pump.launched
    server = await accept_one(listener)
    try:
        assert await recv_exactly(server, 5) == b"hello"
        assert pump.launched and dialed.codes == []
        server.send(b"world")
        assert await recv_exactly(client, 5) == b"world"
        assert pump.bytes_a_to_b == 5 and pump.bytes_b_to_a == 5
        pump.finish()
        # b (made here, closed without its method) and a (a `socket.socket`) are really closed:
        # each peer reads the end, and the objects know it.
        assert await asyncio.wait_for(loop.sock_recv(server, 1), 5) == b""
        assert await asyncio.wait_for(loop.sock_recv(client, 1), 5) == b""
        assert a.fileno() == -1 and b.fileno() == -1 and dialed.codes == []
        b.close()  # a second close is a no-op, as for any socket object
    finally:
        pump.finish()
        for s in (client, server):
            s.close()


async def test_a_dial_tells_python_when_asked_and_when_the_client_had_not_spoken(
    es: compiled.EpollSet, listener: socket.socket
) -> None:
    loop = asyncio.get_running_loop()
    pumps: list[compiled.Pump] = []
    others: list[socket.socket] = []
    try:
        for notify, expected in ((True, [0, -1]), (False, [-1])):
            a, client = pair()
            b, _ = compiled.connect(socket.AF_INET, listener.getsockname())
            assert b is not None
            dialed = Dialed()
            pump = compiled.Pump(es, a, b, lambda exc: None, pipe_pool_for(loop))
            pumps.append(pump)
            pump.dial(dialed, True, notify)
            others += [client, await accept_one(listener)]
            assert await asyncio.wait_for(dialed.first, 5) == expected[0]
            assert dialed.codes == expected and pump.launched
            client.send(b"late")  # the relay works although the early read found nothing
            assert await recv_exactly(others[-1], 4) == b"late"
    finally:
        for p in pumps:
            p.finish()
        for s in others:
            s.close()


async def test_a_refused_dial_reports_its_errno_and_lets_go_of_the_target(es: compiled.EpollSet) -> None:
    loop = asyncio.get_running_loop()
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    a, client = pair()
    b, err = compiled.connect(socket.AF_INET, ("127.0.0.1", port))
    if b is None:  # refused at once on this kernel: nothing for a pump to watch
        assert err == errno.ECONNREFUSED
        return
    dialed = Dialed()
    pump = compiled.Pump(es, a, b, lambda exc: None, pipe_pool_for(loop))
    pump.dial(dialed, True, True)
    try:
        assert await asyncio.wait_for(dialed.first, 5) == errno.ECONNREFUSED
        assert dialed.codes == [errno.ECONNREFUSED]
        assert pump.closed and not pump.launched
        assert not es.watching(b.fileno()) and not es.watching(a.fileno())
        ref = weakref.ref(dialed)
        del dialed
        gc.collect()
        assert ref() is None  # the pump let go of its callback: no cycle through the connection
    finally:
        es.forget(b.fileno())
        for s in (a, b, client):
            s.close()


async def test_a_dial_is_refused_on_a_started_pump_and_twice(es: compiled.EpollSet) -> None:
    loop = asyncio.get_running_loop()
    a, client = pair()
    b, server = pair()
    try:
        started = compiled.Pump(es, a, b, lambda exc: None, pipe_pool_for(loop))
        started.start()
        with pytest.raises(RuntimeError, match="already started"):
            started.dial(lambda code: None, True, False)
        started.close()
        fresh = compiled.Pump(es, a, b, lambda exc: None, pipe_pool_for(loop))
        fresh.dial(lambda code: None, True, False)
        with pytest.raises(RuntimeError, match="already started"):
            fresh.dial(lambda code: None, True, False)
        with pytest.raises(TypeError, match="dial"):
            fresh.dial(lambda code: None)  # type: ignore[call-arg]
        fresh.close()
        assert not es.watching(b.fileno())
    finally:
        for s in (a, b, client, server):
            es.forget(s.fileno())
            s.close()
