"""PROXY protocol on real TCP listeners: receiving (required/mixed/disabled) and relaying.

Clients bind distinct 127.0.0.x source addresses, so "trusted proxy" and "untrusted peer" are
real socket peers, not mocks. A recording target shows exactly which bytes reached it.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Literal

import pytest

from portway.access import AccessControl
from portway.acl import Acl
from portway.proxy_header import ProxyProtocolPolicy
from portway.proxy_protocol import build_v1, build_v2, maybe_parse_header
from portway.stream import TCPStream, tcp_splice
from tests.targets import TCPEchoTarget

# Admission runs in each TCP engine: both must honour every rule.
pytestmark = pytest.mark.usefixtures("both_tcp_engines")

TRUSTED = "127.0.0.1"
UNTRUSTED = "127.0.0.66"


class RecordingTarget:
    """Collects everything each connection sends until EOF, then closes it."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port: int = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.received.put_nowait(await reader.read(-1))
        writer.close()

    async def stop(self) -> None:
        self.server.close()

    async def next(self) -> bytes:
        return await asyncio.wait_for(self.received.get(), 5)


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingTarget]:
    target = RecordingTarget()
    await target.start()
    yield target
    await target.stop()


@pytest.fixture
def refusals(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="portway.tcp")
    return caplog


def policy(mode: Literal["required", "mixed"], timeout: float = 5.0) -> ProxyProtocolPolicy:
    return ProxyProtocolPolicy(mode, (ipaddress.ip_network(TRUSTED),), timeout)


async def serve(target: str, **kwargs: object) -> TCPStream:
    stream = TCPStream("tcp4", "127.0.0.1:0", target, name="pp", log_connections=False, **kwargs)  # type: ignore[arg-type]
    await stream.listen_and_serve()
    return stream


async def connect(stream: TCPStream, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert stream.local_addr is not None
    return await asyncio.open_connection(*stream.local_addr, local_addr=(source, 0))


async def exchange(stream: TCPStream, source: str, data: bytes) -> bytes:
    """Send `data` and EOF; return everything that comes back (b"" if the proxy closed us)."""
    reader, writer = await connect(stream, source)
    try:
        writer.write(data)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(-1), 5)
    except OSError:  # reset by the proxy, possibly before our EOF went out
        return b""
    finally:
        writer.close()


# -- required ----------------------------------------------------------------------------------


async def test_required_believes_a_trusted_v1_header_and_forwards_the_rest_intact(
    recorder: RecordingTarget,
) -> None:
    stream = await serve(
        f"127.0.0.1:{recorder.port}", proxy_protocol=policy("required"), relay_proxy_protocol=2
    )
    try:
        header = build_v1(("203.0.113.7", 40000), ("198.51.100.1", 443))
        payload = b"PROXY looks like a header but is the client's data\r\n" + bytes(range(256))
        await exchange(stream, TRUSTED, header + payload)  # one segment: header and data together
        got = await recorder.next()
        relayed = maybe_parse_header(got)
        assert relayed is not None
        assert relayed.source == ("203.0.113.7", 40000)
        assert relayed.destination == ("198.51.100.1", 443)
        assert got[relayed.length :] == payload
    finally:
        await stream.close()


async def test_required_accepts_v2_with_tlvs_and_v1_byte_by_byte(tcp_echo: TCPEchoTarget) -> None:
    stream = await serve(tcp_echo.addr, proxy_protocol=policy("required"))
    try:
        v2 = bytearray(build_v2(("2001:db8::7", 1234), ("2001:db8::1", 80)))
        tlv = b"\x04\x00\x03abc"  # a NOOP TLV, skipped
        v2[14:16] = (int.from_bytes(v2[14:16], "big") + len(tlv)).to_bytes(2, "big")
        assert await exchange(stream, TRUSTED, bytes(v2) + tlv + b"after v2") == b"after v2"

        reader, writer = await connect(stream, TRUSTED)
        for byte in build_v1(("192.0.2.1", 1), ("192.0.2.2", 2)):
            writer.write(bytes([byte]))
            await writer.drain()
        writer.write(b"ping")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(-1), 5) == b"ping"
        writer.close()
    finally:
        await stream.close()


async def test_required_closes_untrusted_peer_without_dialing(
    tcp_echo: TCPEchoTarget, refusals: pytest.LogCaptureFixture
) -> None:
    stream = await serve(tcp_echo.addr, proxy_protocol=policy("required"))
    try:
        spoofed = build_v1(("10.9.9.9", 1), ("10.0.0.1", 2))
        assert await exchange(stream, UNTRUSTED, spoofed + b"data") == b""
        assert tcp_echo.accepted == 0
        assert "not a trusted proxy" in refusals.text
    finally:
        await stream.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # no header at all
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n",  # a field missing
        b"PROXY TCP4 999.1.1.1 5.6.7.8 1 2\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x99\x11\x00\x0c" + bytes(12),  # v2 with version 9
        b"PROXY " + b"x" * 200,  # no CRLF within the v1 limit
    ],
)
async def test_required_closes_on_a_malformed_header(tcp_echo: TCPEchoTarget, garbage: bytes) -> None:
    stream = await serve(tcp_echo.addr, proxy_protocol=policy("required"))
    try:
        assert await exchange(stream, TRUSTED, garbage) == b""
        # ...and only that connection: the listener still serves a good one.
        good = build_v1(("192.0.2.1", 1), ("192.0.2.2", 2))
        assert await exchange(stream, TRUSTED, good + b"still up") == b"still up"
        assert tcp_echo.accepted == 1
    finally:
        await stream.close()


async def test_required_closes_a_truncated_header_at_eof(tcp_echo: TCPEchoTarget) -> None:
    stream = await serve(tcp_echo.addr, proxy_protocol=policy("required"))
    try:
        header = build_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
        assert await exchange(stream, TRUSTED, header[:20]) == b""
        assert tcp_echo.accepted == 0
    finally:
        await stream.close()


@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 192.0.2.1"])
async def test_required_closes_a_silent_or_stalled_peer_after_header_timeout(
    tcp_echo: TCPEchoTarget, sent: bytes, refusals: pytest.LogCaptureFixture
) -> None:
    stream = await serve(tcp_echo.addr, proxy_protocol=policy("required", timeout=0.2))
    try:
        reader, writer = await connect(stream, TRUSTED)
        writer.write(sent)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(-1), 5) == b""
        assert time.monotonic() - started >= 0.15
        writer.close()
        assert tcp_echo.accepted == 0
        assert "no complete PROXY header within 0.2s" in refusals.text
    finally:
        await stream.close()


async def test_local_command_uses_the_socket_address(recorder: RecordingTarget) -> None:
    stream = await serve(
        f"127.0.0.1:{recorder.port}", proxy_protocol=policy("required"), relay_proxy_protocol=1
    )
    try:
        await exchange(stream, TRUSTED, build_v2(None, None, local=True) + b"health")
        got = await recorder.next()
        relayed = maybe_parse_header(got)
        assert relayed is not None and relayed.version == 1
        assert relayed.source is not None and relayed.source[0] == TRUSTED
        assert relayed.destination == stream.local_addr
        assert got[relayed.length :] == b"health"
    finally:
        await stream.close()


# -- mixed and disabled ------------------------------------------------------------------------


async def test_mixed_serves_trusted_peers_with_or_without_a_header(recorder: RecordingTarget) -> None:
    stream = await serve(f"127.0.0.1:{recorder.port}", proxy_protocol=policy("mixed"), relay_proxy_protocol=2)
    try:
        await exchange(stream, TRUSTED, build_v1(("203.0.113.9", 5), ("203.0.113.1", 6)) + b"with")
        await exchange(stream, TRUSTED, b"without")
        await exchange(stream, TRUSTED, b"PRO")  # could have been a header until EOF said otherwise
        results = {}
        for _ in range(3):
            got = await recorder.next()
            relayed = maybe_parse_header(got)
            assert relayed is not None and relayed.source is not None
            results[got[relayed.length :]] = relayed.source[0]
        assert results == {b"with": "203.0.113.9", b"without": TRUSTED, b"PRO": TRUSTED}
    finally:
        await stream.close()


async def test_mixed_never_believes_an_untrusted_peers_header(recorder: RecordingTarget) -> None:
    stream = await serve(f"127.0.0.1:{recorder.port}", proxy_protocol=policy("mixed"), relay_proxy_protocol=2)
    try:
        spoofed = build_v1(("10.9.9.9", 1), ("10.0.0.1", 2))
        await exchange(stream, UNTRUSTED, spoofed + b"data")
        got = await recorder.next()
        relayed = maybe_parse_header(got)
        assert relayed is not None and relayed.source is not None
        assert relayed.source[0] == UNTRUSTED
        assert got[relayed.length :] == spoofed + b"data"  # passed on as data, not believed
    finally:
        await stream.close()


async def test_mixed_serves_a_short_ambiguous_prefix_as_data_after_the_timeout(
    tcp_echo: TCPEchoTarget,
) -> None:
    stream = await serve(tcp_echo.addr, proxy_protocol=policy("mixed", timeout=0.1))
    try:
        reader, writer = await connect(stream, TRUSTED)
        writer.write(b"\r\n")  # a prefix of the v2 signature
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"
        writer.close()
    finally:
        await stream.close()


async def test_disabled_passes_a_header_through_as_data(tcp_echo: TCPEchoTarget) -> None:
    stream = await serve(tcp_echo.addr)
    try:
        header = build_v1(("10.9.9.9", 1), ("10.0.0.1", 2))
        assert await exchange(stream, TRUSTED, header + b"x") == header + b"x"
    finally:
        await stream.close()


async def test_acl_applies_to_the_believed_client_not_the_proxy(tcp_echo: TCPEchoTarget) -> None:
    acl = Acl(default="allow", deny=["ip:203.0.113.66", f"ip:{TRUSTED}"])
    access = AccessControl(acl, logging.getLogger("test.pp.acl"))
    stream = await serve(tcp_echo.addr, proxy_protocol=policy("required"), access=access)
    try:
        denied = build_v1(("203.0.113.66", 1), ("192.0.2.2", 2))
        allowed = build_v1(("203.0.113.67", 1), ("192.0.2.2", 2))
        assert await exchange(stream, TRUSTED, denied + b"no") == b""
        assert tcp_echo.accepted == 0
        # The proxy's own address is denied too, yet a client it speaks for is let in.
        assert await exchange(stream, TRUSTED, allowed + b"yes") == b"yes"
        # A LOCAL header means "the proxy itself", which the ACL denies.
        assert await exchange(stream, TRUSTED, build_v2(None, None, local=True) + b"hc") == b""
        assert tcp_echo.accepted == 1
    finally:
        await stream.close()


async def test_relay_without_receiving_uses_the_socket_peer(recorder: RecordingTarget) -> None:
    stream = await serve(f"127.0.0.1:{recorder.port}", relay_proxy_protocol=2)
    try:
        await exchange(stream, "127.0.0.23", b"")
        got = await recorder.next()
        relayed = maybe_parse_header(got)
        assert relayed is not None and relayed.length == len(got)
        assert relayed.source is not None and relayed.source[0] == "127.0.0.23"
        assert relayed.destination == stream.local_addr
    finally:
        await stream.close()


async def test_large_first_segment_after_the_header_arrives_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes read together with the header go out before the relay starts; when the target
    socket takes less than that at once, the rest must follow, in order.

    Loopback send buffers here start at megabytes, so the splice engine's target sockets are
    made with a small one (real sockets, only their SO_SNDBUF differs) to force a partial send.
    """

    def small_sndbuf_socket(family: int, kind: int) -> socket.socket:
        sock = _socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return sock  # type: ignore[return-value]

    monkeypatch.setattr(tcp_splice, "_socket", SimpleNamespace(socket=small_sndbuf_socket))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accepted sockets
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    received = bytearray()
    done = asyncio.Event()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        received.extend(await r.read(-1))
        done.set()
        w.close()

    target = await asyncio.start_server(sink, sock=listener)
    port = listener.getsockname()[1]
    stream = await serve(f"127.0.0.1:{port}", proxy_protocol=policy("required"))
    try:
        header = build_v1(("203.0.113.9", 5555), ("198.51.100.1", 443))
        payload = os.urandom(3 * 1024 * 1024)
        _, writer = await connect(stream, TRUSTED)
        writer.write(header + payload)  # header and megabytes in one write: a full first read
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(done.wait(), 20)
        writer.close()
        assert len(received) == len(payload)
        assert bytes(received) == payload
    finally:
        await stream.close()
        target.close()
