"""Health probes against real loopback servers (and a real dnsmasq), plus the escape syntax."""

from __future__ import annotations

import asyncio
import contextlib
import re
import selectors
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway.probe import (
    REPLY_LIMIT,
    compile_expect_regex,
    first_probe_in,
    format_escapes,
    next_probe_in,
    parse_escapes,
    probe_tcp,
    probe_udp,
)

V4 = (socket.AF_INET, "127.0.0.1")
V6 = (socket.AF_INET6, "::1")

# -- parse_escapes ----------------------------------------------------------------------------------------


def test_known_escapes() -> None:
    assert parse_escapes(r"PING\r\n") == b"PING\r\n"
    assert parse_escapes(r"\t\\\0\x00\xfF\x41") == b"\t\\\0\0\xffA"
    assert parse_escapes("+PONG") == b"+PONG"
    assert parse_escapes("é") == "é".encode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (r"PING\q", r"unknown escape \\q at position 4"),
        ("PING\\", "lone backslash at the end"),
        (r"\x4", r"\\x at position 0 .* needs two hex digits, got '4'"),
        (r"ab\xZZ", r"\\x at position 2 .* got 'ZZ'"),
        (r"\N", r"unknown escape \\N"),
    ],
)
def test_bad_escapes_name_the_escape(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_escapes(text)


@given(st.binary(max_size=200))
def test_format_then_parse_round_trips_any_bytes(data: bytes) -> None:
    text = format_escapes(data)
    assert text.isascii() and text.isprintable()
    assert parse_escapes(text) == data


@given(st.text(max_size=100).filter(lambda t: "\\" not in t))
def test_text_without_backslash_is_its_utf8(text: str) -> None:
    assert parse_escapes(text) == text.encode()


pieces = st.one_of(
    st.text(alphabet=st.characters(exclude_characters="\\"), max_size=5).map(lambda t: (t, t.encode())),
    st.sampled_from([("\\r", b"\r"), ("\\n", b"\n"), ("\\t", b"\t"), ("\\\\", b"\\"), ("\\0", b"\0")]),
    st.integers(0, 255).map(lambda b: (f"\\x{b:02X}", bytes([b]))),
)


@given(st.lists(pieces, max_size=30))
def test_escaped_text_parses_piece_by_piece(parts: list[tuple[str, bytes]]) -> None:
    text = "".join(t for t, _ in parts)
    assert parse_escapes(text) == b"".join(b for _, b in parts)


def test_expect_regex_compiles_to_bytes() -> None:
    assert compile_expect_regex(r"^\+PONG\r\n").match(b"+PONG\r\n")
    with pytest.raises(ValueError, match="bad regular expression '\\('"):
        compile_expect_regex("(")


# -- schedule --------------------------------------------------------------------------------------------


@given(st.floats(0.1, 3600), st.floats(0, 1, exclude_max=True))
def test_probe_schedule_stays_near_the_interval(interval: float, u: float) -> None:
    assert 0 <= first_probe_in(interval, u) < interval
    assert 0.9 * interval <= next_probe_in(interval, u) <= 1.1 * interval


def test_probe_schedule_mean_is_the_interval() -> None:
    steps = [next_probe_in(5.0, k / 1000) for k in range(1000)]
    assert abs(sum(steps) / len(steps) - 5.0) < 0.001


# -- TCP ----------------------------------------------------------------------------------------------


@dataclass
class Server:
    port: int
    connections: int = 0
    accepted: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # set when the prober closed its end


@contextlib.asynccontextmanager
async def tcp_server(
    host: str, reply: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> AsyncIterator[Server]:
    """A TCP server whose handler runs `reply`, then waits for the client to close."""
    state = Server(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        state.accepted.set()
        try:
            await reply(reader, writer)
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            state.closed.set()
            writer.close()

    server = await asyncio.start_server(handle, host, 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


async def pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if await reader.readuntil(b"\n") == b"PING\r\n":
        writer.write(b"+PO")
        await writer.drain()
        writer.write(b"NG\r\n")  # the reply may arrive in pieces
    else:
        writer.write(b"-ERR unknown command\r\n")


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts and never answers: a hung server."""


async def wrong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\n")
    writer.write(b"-ERR not ready\r\n")


async def wrong_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await wrong(reader, writer)
    writer.close()


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"x" * (REPLY_LIMIT * 4))


@contextlib.contextmanager
def refusing_port(family: int, host: str) -> Iterator[int]:
    """A port that is bound (so nobody else takes it) but not listening: connects are refused."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        yield s.getsockname()[1]


@pytest.mark.parametrize(("family", "host"), [V4, V6])
async def test_tcp_refused(family: int, host: str) -> None:
    with refusing_port(family, host) as port:
        assert await probe_tcp(family, (host, port), 2.0) == (False, "connection refused")
        assert await probe_tcp(family, (host, port), 2.0, b"PING\r\n", b"+PONG") == (
            False,
            "connection refused",
        )


@pytest.mark.parametrize(("family", "host"), [V4, V6])
async def test_tcp_correct_reply(family: int, host: str) -> None:
    async with tcp_server(host, pong) as server:
        assert await probe_tcp(family, (host, server.port), 2.0) == (True, "connected")
        assert await probe_tcp(family, (host, server.port), 2.0, b"PING\r\n", b"+PONG\r\n") == (
            True,
            "reply matched",
        )
        await asyncio.wait_for(server.closed.wait(), 2.0)  # the probe closed its socket


async def test_tcp_hung_server_is_caught_only_by_send_expect() -> None:
    async with tcp_server("127.0.0.1", silent) as server:
        assert await probe_tcp(socket.AF_INET, ("127.0.0.1", server.port), 2.0) == (True, "connected")
        started = time.monotonic()
        ok, reason = await probe_tcp(socket.AF_INET, ("127.0.0.1", server.port), 0.3, b"PING\r\n", b"+PONG")
        assert (ok, reason) == (False, "timeout waiting for reply")
        assert 0.25 <= time.monotonic() - started < 1.5
        server.closed.clear()
        await asyncio.wait_for(server.closed.wait(), 2.0)  # closed after the timeout as well


async def test_tcp_wrong_reply() -> None:
    async with tcp_server("127.0.0.1", wrong) as server:
        ok, reason = await probe_tcp(socket.AF_INET, ("127.0.0.1", server.port), 2.0, b"PING\r\n", b"+PONG")
        assert not ok and reason == r"reply did not match: -ERR not ready\r\n"


async def test_tcp_regex() -> None:
    async with tcp_server("127.0.0.1", pong) as server:
        addr = ("127.0.0.1", server.port)
        assert await probe_tcp(socket.AF_INET, addr, 2.0, b"PING\r\n", re.compile(rb"PO+NG\r\n")) == (
            True,
            "reply matched",
        )
        # the server keeps the connection open, so a regex that never matches waits for the timeout
        assert await probe_tcp(socket.AF_INET, addr, 0.3, b"PING\r\n", re.compile(rb"^OK")) == (
            False,
            "timeout waiting for reply",
        )
    async with tcp_server("127.0.0.1", wrong_then_close) as server:
        ok, reason = await probe_tcp(
            socket.AF_INET, ("127.0.0.1", server.port), 2.0, b"PING\r\n", re.compile(rb"^\+")
        )
        assert (ok, reason) == (False, r"connection closed before the reply matched: -ERR not ready\r\n")


async def test_tcp_reply_is_read_up_to_the_limit_only() -> None:
    async with tcp_server("127.0.0.1", flood) as server:
        ok, reason = await probe_tcp(socket.AF_INET, ("127.0.0.1", server.port), 2.0, b"", re.compile(rb"OK"))
        assert not ok and reason.startswith(f"reply did not match in {REPLY_LIMIT} bytes: xxx")


async def test_tcp_closed_without_reply() -> None:
    async with tcp_server("127.0.0.1", hang_up) as server:
        ok, reason = await probe_tcp(socket.AF_INET, ("127.0.0.1", server.port), 2.0, b"PING\r\n", b"+PONG")
        assert not ok and reason in ("connection closed without a reply", "connection reset")


async def test_tcp_cancelled_probe_closes_its_socket() -> None:
    async with tcp_server("127.0.0.1", silent) as server:
        task = asyncio.create_task(probe_tcp(socket.AF_INET, ("127.0.0.1", server.port), 30.0, b"x", b"y"))
        await asyncio.wait_for(server.accepted.wait(), 2.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed.wait(), 2.0)


# -- UDP ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def udp_socket(family: int, host: str) -> Iterator[socket.socket]:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        s.setblocking(False)
        yield s


def unused_udp_port(family: int, host: str) -> int:
    with udp_socket(family, host) as s:
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize(("family", "host"), [V4, V6])
async def test_udp_nothing_listening_is_down_by_icmp(family: int, host: str) -> None:
    port = unused_udp_port(family, host)
    assert await probe_udp(family, (host, port), 2.0) == (False, "port unreachable (ICMP)")
    assert await probe_udp(family, (host, port), 2.0, b"hello", b"hi") == (False, "port unreachable (ICMP)")


@pytest.mark.parametrize(("family", "host"), [V4, V6])
async def test_udp_silent_listener_is_up_without_expect_down_with_it(family: int, host: str) -> None:
    with udp_socket(family, host) as listener:
        addr = (host, listener.getsockname()[1])
        assert await probe_udp(family, addr, 0.3) == (True, "no reply and no ICMP unreachable")
        assert listener.recv(100) == b""  # the empty probe datagram really went out
        assert await probe_udp(family, addr, 0.3, b"hello", b"hi") == (False, "timeout waiting for reply")
        assert listener.recv(100) == b"hello"


class _Answer(asyncio.DatagramProtocol):
    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(self.answer, addr)


async def test_udp_reply_matched_or_not() -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Answer(b"+PONG"), local_addr=("127.0.0.1", 0))
    try:
        addr = ("127.0.0.1", transport.get_extra_info("sockname")[1])
        assert await probe_udp(socket.AF_INET, addr, 2.0, b"PING", b"+PO") == (True, "reply matched")
        assert await probe_udp(socket.AF_INET, addr, 2.0, b"PING", re.compile(rb"P.NG$")) == (
            True,
            "reply matched",
        )
        assert await probe_udp(socket.AF_INET, addr, 2.0, b"PING", b"+PONG and more") == (
            False,
            "reply did not match: +PONG",
        )
        assert await probe_udp(socket.AF_INET, addr, 2.0, b"PING") == (True, "replied")
    finally:
        transport.close()


# -- UDP against dnsmasq --------------------------------------------------------------------------------

DNSMASQ = shutil.which("dnsmasq") or (shutil.which("dnsmasq", path="/usr/sbin:/sbin"))


def unused_tcp_and_udp_port() -> int:
    """A 127.0.0.1 port free for TCP and UDP alike (a busy machine's TCP ephemeral ports are not)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no port free for both TCP and UDP")


def dns_query(query_id: int, name: str) -> bytes:
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)  # recursion desired, one question
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return header + labels + b"\0" + struct.pack("!HH", 1, 1)  # A, IN


@contextlib.contextmanager
def running_dnsmasq() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A real dnsmasq answering probe.test on a free 127.0.0.1 port; yields the port and the process."""
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq)")
    seen = b""
    for _ in range(5):
        port = unused_tcp_and_udp_port()  # dnsmasq binds both
        proc = subprocess.Popen(
            [
                DNSMASQ,
                "--no-daemon",
                f"--port={port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--address=/probe.test/127.0.0.1",
                "--conf-file=/dev/null",
                "--pid-file=",
                "--user=root",  # as root it would otherwise switch to a user that may not exist
                "--log-facility=-",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        seen = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            deadline = time.monotonic() + 10
            # dnsmasq logs "started" after binding its sockets; a port clash makes it exit instead
            while b"started" not in seen and proc.poll() is None and time.monotonic() < deadline:
                if sel.select(deadline - time.monotonic()):
                    seen += proc.stderr.readline()
        if b"started" in seen:
            break
        proc.kill()
        proc.wait()
        proc.stderr.close()
    else:
        pytest.fail(f"dnsmasq did not start: {seen.decode(errors='replace')}")
    try:
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(5)
        proc.stderr.close()


@pytest.fixture(scope="module")
def dnsmasq() -> Iterator[int]:
    with running_dnsmasq() as (port, _):
        yield port


@pytest.mark.peers
async def test_udp_probe_against_dnsmasq(dnsmasq: int) -> None:
    addr = ("127.0.0.1", dnsmasq)
    query = dns_query(0xBEEF, "probe.test")
    assert await probe_udp(socket.AF_INET, addr, 2.0, query, b"\xbe\xef") == (True, "reply matched")
    # ID, then QR set with NOERROR (rcode 0 in the low bits of byte 3), then one question, one answer
    answered = re.compile(rb"^\xbe\xef[\x80-\xff][\x00-\x0f\x80-\x8f]\x00\x01\x00\x01", re.DOTALL)
    assert await probe_udp(socket.AF_INET, addr, 2.0, query, answered) == (True, "reply matched")
    ok, reason = await probe_udp(socket.AF_INET, addr, 2.0, query, b"\x12\x34")
    assert not ok and reason.startswith(r"reply did not match: \xbe\xef")
    assert await probe_udp(socket.AF_INET, addr, 0.3) == (True, "no reply and no ICMP unreachable")


@pytest.mark.peers
async def test_udp_probe_sees_dnsmasq_stop() -> None:
    """Once the DNS server is gone it is down, both with send/expect and by nginx's ICMP rule."""
    with running_dnsmasq() as (port, proc):
        addr = ("127.0.0.1", port)
        query = dns_query(7, "probe.test")
        assert await probe_udp(socket.AF_INET, addr, 2.0, query, b"\x00\x07") == (True, "reply matched")
        proc.terminate()
        await asyncio.to_thread(proc.wait, 5)
        assert await probe_udp(socket.AF_INET, addr, 2.0, query, b"\x00\x07") == (
            False,
            "port unreachable (ICMP)",
        )
        assert await probe_udp(socket.AF_INET, addr, 2.0) == (False, "port unreachable (ICMP)")
