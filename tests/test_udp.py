"""UDPStream on real loopback sockets: order, size, isolation, expiry, caps, target errors, hooks."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import AsyncIterator

import pytest

from portway.stream import HookContext, UDPStream
from portway.stream.epollset import COMPILED
from tests.targets import UDPClient, UDPEchoTarget


@pytest.fixture(autouse=True, params=["compiled", "python"])
def core(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test once with sessions on compiled lanes (where the core was built) and once on
    asyncio transports (PORTWAY_FASTPATH=0, as where it was not)."""
    if request.param == "compiled" and not COMPILED:
        pytest.skip("the compiled core was not built: the 'python' run covers this machine")
    if request.param == "python":
        monkeypatch.setenv("PORTWAY_FASTPATH", "0")
    return str(request.param)


@pytest.fixture
async def proxy(udp_echo: UDPEchoTarget) -> AsyncIterator[UDPStream]:
    stream = UDPStream("udp4", "127.0.0.1:0", udp_echo.addr, name="echo")
    await stream.listen_and_serve()
    yield stream
    await stream.close()


async def client_for(stream: UDPStream, local: str | None = None) -> UDPClient:
    addr = stream.local_addr
    assert addr is not None
    return await UDPClient.connect(addr[0], addr[1], local)


async def wait_until(predicate: object, timeout: float = 5.0) -> None:
    """Wait for a condition the code under test reaches by the passage of time (expiry)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_describe(proxy: UDPStream, udp_echo: UDPEchoTarget) -> None:
    d = proxy.describe()
    assert d.protocol == "udp4->udp4"
    assert d.dst == udp_echo.addr


async def test_order_is_kept(proxy: UDPStream) -> None:
    client = await client_for(proxy)
    received: list[int] = []
    for burst in range(10):
        for i in range(100):
            client.send((burst * 100 + i).to_bytes(4, "big") + b"x" * 100)
        for _ in range(100):
            received.append(int.from_bytes((await client.recv())[:4], "big"))
    assert received == list(range(1000))
    client.close()


@pytest.mark.parametrize("size", [60_000, 65_507])
async def test_large_datagrams_arrive_whole(proxy: UDPStream, size: int) -> None:
    client = await client_for(proxy)
    payload = os.urandom(size)
    client.send(payload)
    assert await client.recv() == payload
    client.close()


async def test_two_clients_are_kept_apart(proxy: UDPStream, udp_echo: UDPEchoTarget) -> None:
    a = await client_for(proxy)
    b = await client_for(proxy)
    for i in range(20):
        a.send(b"a%d" % i)
        b.send(b"b%d" % i)
    got_a = [await a.recv() for _ in range(20)]
    got_b = [await b.recv() for _ in range(20)]
    assert got_a == [b"a%d" % i for i in range(20)]
    assert got_b == [b"b%d" % i for i in range(20)]
    assert len(udp_echo.sources) == 2  # one connected socket (source port) per client
    assert len(proxy.sessions) == 2
    a.close()
    b.close()


async def test_idle_sessions_expire(udp_echo: UDPEchoTarget) -> None:
    stream = UDPStream("udp4", "127.0.0.1:0", udp_echo.addr, idle_timeout=0.2)
    await stream.listen_and_serve()
    try:
        client = await client_for(stream)
        client.send(b"1")
        assert await client.recv() == b"1"
        assert len(stream.sessions) == 1
        await wait_until(lambda: len(stream.sessions) == 0)
        client.send(b"2")  # a new session, from a new source port at the target
        assert await client.recv() == b"2"
        assert len(udp_echo.sources) == 2
        client.close()
    finally:
        await stream.close()


async def test_replies_go_through_a_lane_on_the_compiled_core_and_are_counted(
    proxy: UDPStream, core: str
) -> None:
    client = await client_for(proxy)
    for size in (1, 100, 1000):
        client.send(b"r" * size)
        assert await client.recv() == b"r" * size
    (session,) = proxy.sessions
    lane = session.lane
    assert (lane is not None) == (core == "compiled")
    if lane is not None:
        # The first datagram set the session up in Python; the others were relayed in C.
        assert lane.bound and (lane.dgrams_up, lane.bytes_up) == (2, 1100)
    assert session.up() == session.down() == (1101, 3)
    await proxy.close()
    assert session.lane is None and (session.bytes_down, session.dgrams_down) == (1101, 3)
    assert (session.bytes_up, session.dgrams_up) == (1101, 3)
    client.close()


async def test_an_ipv6_listener_relays_to_an_ipv4_target(udp_echo: UDPEchoTarget) -> None:
    """The client's address is in the listener's family, whatever the target's."""
    stream = UDPStream("udp", "[::1]:0", udp_echo.addr)
    await stream.listen_and_serve()
    try:
        client = await client_for(stream)
        for i in range(3):
            client.send(b"v6 to v4 %d" % i)
            assert await client.recv() == b"v6 to v4 %d" % i
        client.close()
    finally:
        await stream.close()


async def test_target_that_only_replies_keeps_the_session(core: str) -> None:
    """Replies count as activity, also where they never enter Python (a lane)."""
    loop = asyncio.get_running_loop()
    sources: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    class Learn(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            sources.put_nowait(addr)

    target, _ = await loop.create_datagram_endpoint(Learn, local_addr=("127.0.0.1", 0))
    port = target.get_extra_info("sockname")[1]
    stream = UDPStream("udp4", "127.0.0.1:0", f"127.0.0.1:{port}", idle_timeout=0.4)
    await stream.listen_and_serve()
    try:
        client = await client_for(stream)
        client.send(b"hello")
        session_addr = await sources.get()
        end = loop.time() + 1.0  # well past the idle timeout
        while loop.time() < end:
            target.sendto(b"tick", session_addr)
            assert await client.recv() == b"tick"
            await asyncio.sleep(0.05)  # the traffic pattern under test, not synchronisation
        assert len(stream.sessions) == 1 and sources.empty()  # the same session throughout
        client.close()
    finally:
        await stream.close()
        target.close()


async def test_client_that_only_sends_keeps_its_session() -> None:
    silent = UDPEchoTarget(reply=False)
    await silent.start()
    stream = UDPStream("udp4", "127.0.0.1:0", silent.addr, idle_timeout=0.4)
    await stream.listen_and_serve()
    try:
        client = await client_for(stream)
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0  # well past the idle timeout
        while loop.time() < end:
            client.send(b"ping")
            await asyncio.sleep(0.05)  # the traffic pattern under test, not synchronisation
        await wait_until(lambda: silent.received >= 10)
        assert len(silent.sources) == 1  # the same session carried every datagram
        client.close()
    finally:
        await stream.close()
        await silent.stop()


async def test_session_cap_refuses_new_clients(
    udp_echo: UDPEchoTarget, caplog: pytest.LogCaptureFixture
) -> None:
    stream = UDPStream("udp4", "127.0.0.1:0", udp_echo.addr, max_sessions=2, name="capped")
    await stream.listen_and_serve()
    try:
        a, b, c = [await client_for(stream) for _ in range(3)]
        a.send(b"a")
        assert await a.recv() == b"a"
        b.send(b"b")
        assert await b.recv() == b"b"
        for _ in range(50):
            c.send(b"c")
        with pytest.raises(TimeoutError):
            await c.recv(timeout=0.3)
        assert len(stream.sessions) == 2
        refusals = [r for r in caplog.records if "session limit" in r.getMessage()]
        assert len(refusals) == 1  # logged at a bounded rate, not once per datagram
        a.send(b"still")
        assert await a.recv() == b"still"
        for x in (a, b, c):
            x.close()
    finally:
        await stream.close()


async def test_target_icmp_error_does_not_kill_listener(udp_echo: UDPEchoTarget) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    down = UDPStream("udp4", "127.0.0.1:0", f"127.0.0.1:{dead}")
    await down.listen_and_serve()
    try:
        client = await client_for(down)
        for _ in range(5):
            client.send(b"anyone?")  # each draws an ICMP port unreachable onto the session socket
        with pytest.raises(TimeoutError):
            await client.recv(timeout=0.3)
        # The listener survives: bring the target up on that port and the same client gets through.
        revived = UDPEchoTarget()
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", dead))
        revived.transport, _ = await loop.create_datagram_endpoint(lambda: _Echo(), sock=sock)
        client.send(b"now?")
        assert await client.recv() == b"now?"
        other = await client_for(down)
        other.send(b"other")
        assert await other.recv() == b"other"
        client.close()
        other.close()
        revived.transport.close()
    finally:
        await down.close()


async def test_target_refusal_is_logged_at_warning_like_a_failed_tcp_dial(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A UDP target that refuses (ICMP port unreachable) is visible at the default level, once per
    burst: 20 refused datagrams make one WARNING, not 20 lines and not a DEBUG line."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    down = UDPStream("udp4", "127.0.0.1:0", f"127.0.0.1:{dead}", name="game")
    await down.listen_and_serve()
    try:
        with caplog.at_level(logging.INFO, logger="portway"):
            client = await client_for(down)
            for _ in range(20):
                client.send(b"anyone?")
                await asyncio.sleep(0)

            def refused() -> list[logging.LogRecord]:
                return [r for r in caplog.records if r.getMessage() == "target unreachable"]

            await wait_until(lambda: refused())
            client.send(b"once more")
            with pytest.raises(TimeoutError):
                await client.recv(timeout=0.2)
        (record,) = refused()
        assert record.levelno == logging.WARNING
        assert getattr(record, "route", None) == "game"
        assert getattr(record, "target", None) == f"127.0.0.1:{dead}"
        client.close()
    finally:
        await down.close()


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def test_pre_dial_hook_drops_datagram(udp_echo: UDPEchoTarget) -> None:
    async def deny(ctx: HookContext) -> None:
        raise PermissionError("no")

    stream = UDPStream("udp4", "127.0.0.1:0", udp_echo.addr)
    await stream.listen_and_serve(pre_dial=deny)
    try:
        client = await client_for(stream)
        client.send(b"x")
        with pytest.raises(TimeoutError):
            await client.recv(timeout=0.3)
        assert udp_echo.received == 0
        assert len(stream.sessions) == 0
        client.close()
    finally:
        await stream.close()


async def test_on_read_hook_sees_datagrams_and_can_close_session(udp_echo: UDPEchoTarget) -> None:
    seen: list[tuple[str | None, bytes]] = []

    async def inspect(ctx: HookContext) -> None:
        seen.append((ctx.direction, ctx.data))
        if ctx.data == b"bad":
            raise ValueError("bad datagram")

    stream = UDPStream("udp4", "127.0.0.1:0", udp_echo.addr)
    await stream.listen_and_serve(on_read=inspect)
    try:
        client = await client_for(stream)
        client.send(b"good")
        assert await client.recv() == b"good"
        assert seen == [("client", b"good"), ("target", b"good")]
        client.send(b"bad")
        await wait_until(lambda: len(stream.sessions) == 0)
        assert udp_echo.received == 1
        client.close()
    finally:
        await stream.close()


async def test_ipv6_end_to_end() -> None:
    target = UDPEchoTarget("::1")
    await target.start()
    stream = UDPStream("udp6", "[::1]:0", target.addr)
    await stream.listen_and_serve()
    try:
        client = await client_for(stream)
        client.send(b"v6")
        assert await client.recv() == b"v6"
        client.close()
    finally:
        await stream.close()
        await target.stop()


async def test_close_ends_sessions(proxy: UDPStream) -> None:
    client = await client_for(proxy)
    client.send(b"x")
    assert await client.recv() == b"x"
    await proxy.close()
    assert len(proxy.sessions) == 0
    client.close()


async def test_churning_sessions_answer_every_datagram_and_leave_nothing_behind(
    udp_echo: UDPEchoTarget, core: str
) -> None:
    """Clients come and go faster than the idle timeout: sessions expire and are made again
    while datagrams flow (on the compiled core: lanes unbound and bound again in the inlet).
    Every datagram is answered, in order per client, and nothing is left once they stop."""
    stream = UDPStream("udp4", "127.0.0.1:0", udp_echo.addr, idle_timeout=0.1)
    await stream.listen_and_serve()
    rng = random.Random(12)
    clients = [await client_for(stream) for _ in range(30)]
    try:
        for rnd in range(25):
            sent = {
                i: [b"%d/%d/%d" % (i, rnd, n) for n in range(rng.randint(1, 6))]
                for i in rng.sample(range(30), 8)
            }
            for i, datagrams in sent.items():
                for data in datagrams:
                    clients[i].send(data)
            for i, datagrams in sent.items():
                assert [await clients[i].recv() for _ in datagrams] == datagrams
            await asyncio.sleep(rng.random() * 0.06)  # the traffic pattern under test: gaps near the timeout
        await wait_until(lambda: len(stream.sessions) == 0)
        listener = stream._listener
        if core == "compiled":
            assert listener is not None and listener.inlet is not None
            assert listener.inlet.bound == 0 and listener.inlet.direct > 0
    finally:
        for c in clients:
            c.close()
        await stream.close()
