"""TCPStream on real loopback sockets: transfer, half-close, faults, backpressure, hooks.

Every test runs on both engines (raw sockets + splice, and asyncio transports) under both loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest

from portway.config.load import load_config_text
from portway.server import build_stream
from portway.stream import HookContext, TCPStream, tcp_splice
from portway.stream.epollset import COMPILED
from portway.stream.tcp import ENGINE_ENV, HIGH_WATER, _Client
from portway.stream.tcp_splice import SpliceConn
from tests.targets import TCPEchoTarget


@pytest.fixture(autouse=True, params=["splice", "splice-python", "transport"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The engine every TCPStream of the test uses (through the environment override).

    "splice" is the raw engine on its compiled core where that was built; "splice-python" the
    same engine on the Python epoll set and pump it falls back to (PORTWAY_FASTPATH=0)."""
    name = cast(str, request.param)
    if name == "splice-python":
        if not COMPILED:
            pytest.skip("the compiled core was not built: 'splice' runs the Python classes already")
        monkeypatch.setenv("PORTWAY_FASTPATH", "0")
        name = "splice"
    monkeypatch.setenv(ENGINE_ENV, name)
    return name


@pytest.fixture
async def proxy(tcp_echo: TCPEchoTarget) -> AsyncIterator[TCPStream]:
    stream = TCPStream("tcp4", "127.0.0.1:0", tcp_echo.addr, name="echo")
    await stream.listen_and_serve()
    yield stream
    await stream.close()


async def connect(stream: TCPStream) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    addr = stream.local_addr
    assert addr is not None
    return await asyncio.open_connection(addr[0], addr[1])


@asynccontextmanager
async def proxy_to(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    *,
    half_close: bool = True,
) -> AsyncIterator[TCPStream]:
    """A TCPStream in front of an asyncio server running `handle`; both closed afterwards."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stream = TCPStream("tcp4", "127.0.0.1:0", f"127.0.0.1:{port}", half_close=half_close)
    await stream.listen_and_serve()
    try:
        yield stream
    finally:
        await stream.close()
        server.close()


async def closed_by_proxy(reader: asyncio.StreamReader) -> None:
    """The proxy ends the connection: a FIN (EOF) or, with unread bytes in its socket, a RST."""
    try:
        data = await asyncio.wait_for(reader.read(-1), 5)
    except ConnectionResetError:
        return
    assert data == b""


async def test_describe_and_local_addr(proxy: TCPStream, tcp_echo: TCPEchoTarget) -> None:
    assert proxy.local_addr is not None and proxy.local_addr[1] != 0
    desc = proxy.describe()
    assert desc.protocol == "tcp4->tcp4"
    assert desc.listen == f"127.0.0.1:{proxy.local_addr[1]}"
    assert desc.dst == tcp_echo.addr


async def test_large_payload_both_directions_at_once(proxy: TCPStream) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    reader, writer = await connect(proxy)

    async def send() -> None:
        for i in range(0, len(payload), 65536):
            writer.write(payload[i : i + 65536])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await asyncio.wait_for(reader.read(-1), 30)
    await sender
    writer.close()
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_independent_streams_each_way() -> None:
    """The target sends its own payload while receiving the client's: neither direction waits."""
    up = os.urandom(3 * 1024 * 1024)
    down = os.urandom(5 * 1024 * 1024)
    got_up = asyncio.get_running_loop().create_future()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async def push() -> None:
            w.write(down)
            await w.drain()
            w.write_eof()

        pusher = asyncio.create_task(push())
        got_up.set_result(await r.read(-1))
        await pusher
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stream = TCPStream("tcp4", "127.0.0.1:0", f"127.0.0.1:{port}")
    await stream.listen_and_serve()
    try:
        reader, writer = await connect(stream)
        writer.write(up)
        writer.write_eof()
        received = await asyncio.wait_for(reader.read(-1), 30)
        assert received == down
        assert await asyncio.wait_for(got_up, 10) == up
        writer.close()
    finally:
        await stream.close()
        server.close()


async def test_half_close_client_still_gets_reply() -> None:
    """Client sends a request then SHUT_WR; the target answers after seeing EOF."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        request = await r.read(-1)  # until the client's EOF arrives through the proxy
        w.write(b"reply to " + request + b"." * 200_000)
        await w.drain()
        w.close()

    async with proxy_to(handle) as stream:
        reader, writer = await connect(stream)
        writer.write(b"question")
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(-1), 10)
        assert reply == b"reply to question" + b"." * 200_000
        writer.close()


async def test_half_close_by_target_keeps_upstream_flowing() -> None:
    """The target shuts its write side first; the client keeps sending and the target gets it all."""
    got = asyncio.get_running_loop().create_future()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"banner")
        w.write_eof()
        got.set_result(await r.read(-1))
        w.close()

    async with proxy_to(handle) as stream:
        reader, writer = await connect(stream)
        assert await asyncio.wait_for(reader.read(-1), 5) == b"banner"  # EOF relayed to the client
        body = os.urandom(1_000_000)
        writer.write(body)
        writer.write_eof()
        assert await asyncio.wait_for(got, 10) == body
        writer.close()


@pytest.mark.parametrize("size", [5, 300_000])
async def test_without_half_close_the_target_fin_ends_both_sides_after_its_bytes(size: int) -> None:
    """Without half-close (nginx's default) the target answers and closes: the client gets
    every byte, then the proxy closes it without waiting for the client's own FIN, and lets go
    of the connection. A small answer is copied, a large one spliced."""
    body = os.urandom(size)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(3)
        w.write(body)
        await w.drain()
        w.close()

    async with proxy_to(handle, half_close=False) as stream:
        reader, writer = await connect(stream)
        writer.write(b"get")
        assert await asyncio.wait_for(reader.read(-1), 10) == body
        assert await _settles(stream)  # gone while the client's side is still open
        assert not writer.is_closing()
        writer.close()


async def test_without_half_close_a_client_fin_cuts_off_the_answer() -> None:
    """The client half-closes and waits (`nc -N`): the target gets the request and its EOF, and
    the client gets nothing back: the price of `half_close: false`, as with nginx's default."""
    got = asyncio.get_running_loop().create_future()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.set_result(await r.read(-1))
        with contextlib.suppress(ConnectionError):
            w.write(b"too late")
            await w.drain()
        w.close()

    async with proxy_to(handle, half_close=False) as stream:
        reader, writer = await connect(stream)
        writer.write(b"question")
        writer.write_eof()
        assert await asyncio.wait_for(got, 5) == b"question"
        assert await asyncio.wait_for(reader.read(-1), 5) == b""
        assert await _settles(stream)
        writer.close()


def test_half_close_comes_from_the_route() -> None:
    config = load_config_text(
        "routes:\n  a:\n    host: 127.0.0.1\n    port: 9001:22\n    half_close: false\n"
        "  b:\n    host: 127.0.0.1\n    port: 9002:22\n",
        "f.yml",
    )
    assert build_stream("a", config.routes["a"]).half_close is False
    assert build_stream("b", config.routes["b"]).half_close is True


async def test_server_speaks_first_protocol_skips_the_early_read(engine: str) -> None:
    """A banner protocol (SSH, SMTP: the client waits for the server). The raw engine reads the
    client as soon as the target answers; here that read finds nothing, so the route skips it
    for the next connections, and every banner and reply still arrives."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"SSH-2.0-test\r\n")
        await w.drain()
        w.write(b"echo " + await r.readline())
        await w.drain()
        w.close()

    async with proxy_to(handle) as stream:
        for _ in range(2):
            reader, writer = await connect(stream)
            assert await asyncio.wait_for(reader.readline(), 5) == b"SSH-2.0-test\r\n"
            writer.write(b"hello\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"echo hello\n"
            writer.close()
        if engine == "splice":
            assert stream.quiet_clients == 64 - 1  # one early read failed, the next was skipped


async def test_200_concurrent_connections(proxy: TCPStream, tcp_echo: TCPEchoTarget) -> None:
    async def one(i: int) -> bytes:
        reader, writer = await connect(proxy)
        msg = f"hello {i} ".encode() * 100
        writer.write(msg)
        writer.write_eof()
        data = await reader.read(-1)
        writer.close()
        return data if data == msg else b""

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 30)
    assert all(results)
    assert tcp_echo.accepted == 200


async def test_target_down_closes_client_promptly(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # closed again: nothing listens there
    stream = TCPStream("tcp4", "127.0.0.1:0", f"127.0.0.1:{dead_port}", name="dead")
    await stream.listen_and_serve()
    try:
        reader, writer = await connect(stream)
        assert await asyncio.wait_for(reader.read(-1), 3) == b""
        writer.close()
    finally:
        await stream.close()
    failures = [r for r in caplog.records if r.getMessage() == "dial failed"]
    assert failures and failures[0].route == "dead"  # type: ignore[attr-defined]
    assert failures[0].dst == f"127.0.0.1:{dead_port}"  # type: ignore[attr-defined]


@pytest.mark.parametrize("clients", [1, 4])
async def test_connect_timeout(clients: int) -> None:
    """A target whose accept queue is full never completes the handshake: we give up in time,
    also with several dials pending at once (one `DialWatch` timer for all of them)."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the (tiny) accept queue so further SYNs are dropped
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", port))
        fillers.append(f)
    stream = TCPStream("tcp4", "127.0.0.1:0", f"127.0.0.1:{port}", connect_timeout=0.3)
    await stream.listen_and_serve()
    try:
        connected = [await connect(stream) for _ in range(clients)]
        loop = asyncio.get_running_loop()
        start = loop.time()
        for reader, _ in connected:
            assert await asyncio.wait_for(reader.read(-1), 5) == b""
        assert loop.time() - start < 3
        for _, writer in connected:
            writer.close()
        assert not stream.conns
    finally:
        await stream.close()
        for f in fillers:
            f.close()
        blackhole.close()


async def test_target_reset_mid_stream_closes_client() -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"partial")
        await w.drain()
        await r.readexactly(1)
        sock = cast(socket.socket, w.get_extra_info("socket"))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()  # RST

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stream = TCPStream("tcp4", "127.0.0.1:0", f"127.0.0.1:{port}")
    await stream.listen_and_serve()
    try:
        reader, writer = await connect(stream)
        assert await reader.readexactly(7) == b"partial"
        writer.write(b"x")
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 5)
        writer.close()
        assert not stream.conns or await _settles(stream)
    finally:
        await stream.close()
        server.close()


async def _settles(stream: TCPStream) -> bool:
    for _ in range(100):
        if not stream.conns:
            return True
        await asyncio.sleep(0.01)
    return False


async def test_client_reset_closes_target(proxy: TCPStream, tcp_echo: TCPEchoTarget) -> None:
    reader, writer = await connect(proxy)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    sock = cast(socket.socket, writer.get_extra_info("socket"))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    await asyncio.wait_for(tcp_echo.closed_event.wait(), 5)
    assert tcp_echo.closed == 1


class _Firehose(asyncio.Protocol):
    """A target that writes as fast as it may and records how far it got before being paused."""

    def __init__(self) -> None:
        self.sent = 0
        self.paused = asyncio.Event()
        self.chunk = b"z" * 65536

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._pump()

    def _pump(self) -> None:
        while not self.paused.is_set() and not self.transport.is_closing():
            self.transport.write(self.chunk)
            self.sent += len(self.chunk)

    def pause_writing(self) -> None:
        self.paused.set()

    def resume_writing(self) -> None:
        self.paused.clear()
        asyncio.get_running_loop().call_soon(self._pump)


async def test_slow_reader_bounds_proxy_memory() -> None:
    """A client that never reads must stall the target, not make the proxy buffer everything."""
    loop = asyncio.get_running_loop()
    hose = _Firehose()
    server = await loop.create_server(lambda: hose, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stream = TCPStream("tcp4", "127.0.0.1:0", f"127.0.0.1:{port}")
    await stream.listen_and_serve()
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        addr = stream.local_addr
        assert addr is not None
        sock.connect(addr)
        # The target's own buffer pauses only once the proxy stopped reading from it.
        await asyncio.wait_for(hose.paused.wait(), 20)
        (conn,) = stream.conns
        if isinstance(conn, _Client):
            assert conn.transport is not None
            buffered = conn.transport.get_write_buffer_size()
            assert buffered <= HIGH_WATER + 512 * 1024
        else:
            # Raw engine: the bytes wait in kernel buffers; the pump holds at most one pipe
            # per direction and has stopped reading the target.
            assert isinstance(conn, SpliceConn)
            assert conn.pump is not None
            assert getattr(conn.pump, "pipes_held", 0) <= 2
        assert hose.sent < 64 * 1024 * 1024  # kernel buffers + our bound, not "everything"
        # Now drain it and check every byte the target sent arrives.
        sock.setblocking(False)
        total = 0
        hose.transport.close()
        while True:
            data = await loop.sock_recv(sock, 1 << 20)
            if not data:
                break
            total += len(data)
        assert total == hose.sent
        sock.close()
    finally:
        await stream.close()
        server.close()


async def test_pre_dial_hook_rejects_without_dialing(tcp_echo: TCPEchoTarget) -> None:
    seen: list[HookContext] = []

    async def deny(ctx: HookContext) -> None:
        seen.append(ctx)
        raise PermissionError("not you")

    stream = TCPStream("tcp4", "127.0.0.1:0", tcp_echo.addr, name="guarded")
    await stream.listen_and_serve(pre_dial=deny)
    try:
        reader, writer = await connect(stream)
        writer.write(b"hello")
        await closed_by_proxy(reader)
        writer.close()
    finally:
        await stream.close()
    assert tcp_echo.accepted == 0
    assert seen[0].route == "guarded"
    assert seen[0].target == tcp_echo.addr
    assert seen[0].client[0] == "127.0.0.1"


async def test_pre_dial_hook_allows(tcp_echo: TCPEchoTarget) -> None:
    async def allow(ctx: HookContext) -> None:
        return None

    stream = TCPStream("tcp4", "127.0.0.1:0", tcp_echo.addr)
    await stream.listen_and_serve(pre_dial=allow)
    try:
        reader, writer = await connect(stream)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.close()
    finally:
        await stream.close()


async def test_on_read_hook_sees_both_directions_and_can_close(tcp_echo: TCPEchoTarget) -> None:
    seen: list[tuple[str | None, bytes]] = []

    async def inspect(ctx: HookContext) -> None:
        seen.append((ctx.direction, ctx.data))
        if b"forbidden" in ctx.data:
            raise ValueError("bad word")

    stream = TCPStream("tcp4", "127.0.0.1:0", tcp_echo.addr)
    await stream.listen_and_serve(on_read=inspect)
    try:
        reader, writer = await connect(stream)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        assert ("client", b"hello") in seen and ("target", b"hello") in seen
        writer.write(b"forbidden")
        await closed_by_proxy(reader)
        writer.close()
    finally:
        await stream.close()


async def test_idle_timeout_closes_quiet_connection(tcp_echo: TCPEchoTarget) -> None:
    stream = TCPStream("tcp4", "127.0.0.1:0", tcp_echo.addr, idle_timeout=0.2)
    await stream.listen_and_serve()
    try:
        reader, writer = await connect(stream)
        loop = asyncio.get_running_loop()
        start = loop.time()
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        assert await asyncio.wait_for(reader.read(-1), 5) == b""
        assert 0.2 <= loop.time() - start < 2
        writer.close()
    finally:
        await stream.close()


async def test_close_stops_accepting_and_closes_live_connections(tcp_echo: TCPEchoTarget) -> None:
    stream = TCPStream("tcp4", "127.0.0.1:0", tcp_echo.addr)
    await stream.listen_and_serve()
    addr = stream.local_addr
    assert addr is not None
    reader, writer = await connect(stream)
    writer.write(b"a")
    assert await reader.readexactly(1) == b"a"
    await stream.close()
    assert await asyncio.wait_for(reader.read(-1), 5) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(addr[0], addr[1])


async def test_ipv6_end_to_end() -> None:
    target = TCPEchoTarget("::1")
    await target.start()
    stream = TCPStream("tcp6", "[::1]:0", f"[::1]:{target.port}")
    await stream.listen_and_serve()
    try:
        addr = stream.local_addr
        assert addr is not None and addr[0] == "::1"
        assert stream.describe().listen.startswith("[::1]:")
        reader, writer = await asyncio.open_connection("::1", addr[1])
        writer.write(b"six")
        assert await reader.readexactly(3) == b"six"
        writer.close()
        assert target.peers[0][0] == "::1"
    finally:
        await stream.close()
        await target.stop()


async def test_dual_stack_listener_accepts_both_families(tcp_echo: TCPEchoTarget) -> None:
    stream = TCPStream("tcp", "[::]:0", tcp_echo.addr)
    await stream.listen_and_serve()
    try:
        addr = stream.local_addr
        assert addr is not None
        for host in ("127.0.0.1", "::1"):
            reader, writer = await asyncio.open_connection(host, addr[1])
            writer.write(b"hi")
            assert await reader.readexactly(2) == b"hi"
            writer.close()
    finally:
        await stream.close()


async def test_localhost_target_finds_the_family_that_listens(tcp_echo: TCPEchoTarget) -> None:
    """`localhost` resolves to ::1 and 127.0.0.1; the echo target listens only on IPv4."""
    stream = TCPStream("tcp", "127.0.0.1:0", f"localhost:{tcp_echo.port}")
    await stream.listen_and_serve()
    try:
        for _ in range(2):
            reader, writer = await connect(stream)
            writer.write(b"ok")
            assert await reader.readexactly(2) == b"ok"
            writer.close()
    finally:
        await stream.close()


async def test_debug_line_reports_bytes_each_way(proxy: TCPStream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="portway.tcp")
    reader, writer = await connect(proxy)
    writer.write(b"x" * 5000)
    writer.write_eof()
    assert len(await asyncio.wait_for(reader.read(-1), 5)) == 5000
    writer.close()
    await _settles(proxy)
    (closed,) = [r for r in caplog.records if r.getMessage() == "closed"]
    assert (closed.bytes_up, closed.bytes_down) == (5000, 5000)  # type: ignore[attr-defined]
    assert closed.route == "echo" and closed.action == "close"  # type: ignore[attr-defined]


async def test_pump_refused_by_the_loop_closes_cleanly_and_serving_goes_on(
    engine: str, tcp_echo: TCPEchoTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the loop refuses to watch a descriptor (uvloop does when it still maps it to a
    transport), the connection is closed with nothing left registered, and the next one works."""
    if engine != "splice":
        pytest.skip("the raw engine's own fault path")
    stream = TCPStream("tcp4", "127.0.0.1:0", tcp_echo.addr)
    await stream.listen_and_serve()
    original = tcp_splice.engine_pump
    failures = [1]

    class Refused:
        """A pump whose start fails as the loop's add_reader would; otherwise the real one."""

        def __init__(self, pump: Any) -> None:
            self.pump = pump

        def start(self) -> None:
            raise RuntimeError("File descriptor is used by transport")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.pump, name)

    def refuse_once(*args: Any) -> Any:
        pump = original(*args)
        if failures:
            failures.pop()
            return Refused(pump)
        return pump

    monkeypatch.setattr(tcp_splice, "engine_pump", refuse_once)
    real_pump = tcp_splice._COMPILED_PUMP

    class OnceRefused:
        """The compiled pump (started by `dial` or `launch`, not through `engine_pump`), refused once."""

        def __init__(self, *args: Any) -> None:
            assert real_pump is not None
            self.pump = real_pump(*args)

        def launch(self, read_first: bool) -> bool:
            if failures:
                failures.pop()
                raise RuntimeError("File descriptor is used by transport")
            return bool(self.pump.launch(read_first))

        def dial(self, on_dialed: Any, read_first: bool, notify: bool) -> None:
            if failures:
                failures.pop()
                raise RuntimeError("File descriptor is used by transport")
            self.pump.dial(on_dialed, read_first, notify)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.pump, name)

    if real_pump is not None:
        monkeypatch.setattr(tcp_splice, "_COMPILED_PUMP", OnceRefused)
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: loop_errors.append(context))
    try:
        reader, writer = await connect(stream)
        assert await closed_by_proxy_or_empty(reader)
        writer.close()
        assert await _settles(stream)
        assert loop_errors == []  # no callback failed on a descriptor already closed
        reader, writer = await connect(stream)
        writer.write(b"after")
        assert await reader.readexactly(5) == b"after"
        writer.close()
    finally:
        await stream.close()


async def closed_by_proxy_or_empty(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(-1), 5) == b""
    except ConnectionResetError:
        return True
