"""One UDP port, several routes told apart by the SNI of the client's QUIC Initial.

Real QUIC v1 Initial datagrams (built and protected as a QUIC stack would, by the builder of
tests/test_quic.py) go through portway to UDP echo targets on loopback: a client reaches the
target of its SNI route with every datagram, the target gets the Initial unchanged, and the
undecided-client table stays bounded under a flood of sources.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from portway.config.load import load_config_text
from portway.errors import ConfigError
from portway.server import Server
from portway.stream.shared_udp import SharedUDPListener
from tests.hellos import real_hello, unframe
from tests.polling import eventually
from tests.ports import free_udp_port
from tests.targets import UDPClient, UDPEchoTarget
from tests.test_quic import crypto, protect


def hello(sni: str) -> bytes:
    return unframe(real_hello(sni, ("h3",), tls13_only=True))


def initial(sni: str, dcid: bytes) -> bytes:
    return protect(crypto(0, hello(sni)), dcid=dcid)


def split_initial(sni: str, dcid: bytes) -> tuple[bytes, bytes]:
    """The hello's second half in the first datagram, its first half in the second."""
    data = hello(sni)
    half = len(data) // 2
    return (
        protect(crypto(half, data[half:]), dcid=dcid, packet_number=0),
        protect(crypto(0, data[:half]), dcid=dcid, packet_number=1),
    )


def route(name: str, port: int, target: int, match: str | None, extra: str = "") -> str:
    text = f"  {name}:\n    scheme: udp4\n    bind: 127.0.0.1\n    port: {port}:{target}\n"
    text += "    host: 127.0.0.1\n    peek_timeout: 0.5s\n" + extra
    return text + (f"    match: {match}\n" if match is not None else "")


@contextlib.asynccontextmanager
async def targets(count: int) -> AsyncIterator[list[UDPEchoTarget]]:
    started = [UDPEchoTarget() for _ in range(count)]
    for target in started:
        await target.start()
    try:
        yield started
    finally:
        for target in started:
            await target.stop()


@contextlib.asynccontextmanager
async def serving(text: str) -> AsyncIterator[tuple[Server, SharedUDPListener]]:
    server = Server(load_config_text(text, "quic.yml"))
    await server.start()
    try:
        [listener] = server.listeners.values()
        assert isinstance(listener, SharedUDPListener)
        yield server, listener
    finally:
        await server.stop()


def two_routes(port: int, a: int, b: int, fallback: int | None = None, extra: str = "") -> str:
    text = "routes:\n" + route("a", port, a, "{sni: [a.example.com]}", extra)
    text += route("b", port, b, "{sni: [b.example.com]}", extra)
    if fallback is not None:
        text += route("other", port, fallback, None, extra)
    return text


async def client(port: int, local: str = "127.0.0.1") -> UDPClient:
    return await UDPClient.connect("127.0.0.1", port, local=local)


async def test_each_client_reaches_the_target_of_its_sni_with_every_datagram() -> None:
    port = free_udp_port()
    async with targets(2) as (ta, tb), serving(two_routes(port, ta.port, tb.port)):
        ca, cb = await client(port), await client(port)
        first_a, first_b = initial("a.example.com", b"\x01" * 8), initial("b.example.com", b"\x02" * 8)
        ca.send(first_a)
        cb.send(first_b)
        # The echo is what the target received: the Initial arrived unchanged.
        assert await ca.recv() == first_a
        assert await cb.recv() == first_b
        for i in range(5):  # short-header packets, or anything: pinned to the route
            ca.send(b"\x40a" + bytes([i]))
            cb.send(b"\x40b" + bytes([i]))
            assert await ca.recv() == b"\x40a" + bytes([i])
            assert await cb.recv() == b"\x40b" + bytes([i])
        assert (ta.received, tb.received) == (6, 6)
        assert len(ta.sources) == len(tb.sources) == 1  # one session each
        ca.close()
        cb.close()


async def test_an_initial_split_over_two_datagrams_still_decides() -> None:
    port = free_udp_port()
    async with targets(3) as (ta, tb, tf), serving(two_routes(port, ta.port, tb.port, tf.port)) as (_, lst):
        c = await client(port)
        one, two = split_initial("b.example.com", b"\x03" * 8)
        c.send(one)
        await eventually(lambda: _true(len(lst.pending) == 1))
        assert tb.received == 0  # held until the hello is complete
        c.send(two)
        assert await c.recv() == one  # both, in order, to b
        assert await c.recv() == two
        assert (ta.received, tb.received, tf.received) == (0, 2, 0)
        assert not lst.pending
        c.close()


async def test_not_quic_goes_to_the_fallback() -> None:
    port = free_udp_port()
    async with targets(3) as (ta, tb, tf), serving(two_routes(port, ta.port, tb.port, tf.port)):
        c = await client(port)
        c.send(b"\x00plain DNS-ish query")
        assert await c.recv() == b"\x00plain DNS-ish query"
        c.send(initial("a.example.com", b"\x04" * 8))  # pinned already: stays on the fallback
        await c.recv()
        unknown = await client(port)
        unknown.send(initial("nobody.example.com", b"\x05" * 8))  # QUIC, no route: the fallback
        await unknown.recv()
        assert (ta.received, tb.received, tf.received) == (0, 0, 3)
        c.close()
        unknown.close()


async def test_without_a_fallback_unmatched_clients_are_dropped_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="portway")
    port = free_udp_port()
    async with targets(2) as (ta, tb), serving(two_routes(port, ta.port, tb.port)):
        junk = await client(port)
        for _ in range(3):
            junk.send(b"not quic at all")
        nobody = await client(port)
        nobody.send(initial("nobody.example.com", b"\x06" * 8))
        ok = await client(port)
        first = initial("a.example.com", b"\x07" * 8)
        ok.send(first)
        assert await ok.recv() == first  # served after the dropped ones (one socket, in order)
        assert (ta.received, tb.received) == (1, 0)
        assert junk.inbox.empty() and nobody.inbox.empty()
        dropped = [r for r in caplog.records if "dropped before routing" in r.getMessage()]
        assert len(dropped) == 1, caplog.text
        assert getattr(dropped[0], "listen", "") == f"127.0.0.1:{port}"
        assert "no route matches protocol unknown and there is no fallback route" in dropped[0].getMessage()
        for c in (junk, nobody, ok):
            c.close()


async def test_the_undecided_client_table_is_bounded_under_a_flood_of_sources() -> None:
    port = free_udp_port()
    async with targets(2) as (ta, tb), serving(two_routes(port, ta.port, tb.port)) as (_, listener):
        listener.max_pending = 4
        flood = [await client(port, local=f"127.0.0.{i}") for i in range(2, 12)]
        for i, c in enumerate(flood):
            c.send(split_initial("a.example.com", bytes([i]) * 8)[0])  # never completed
        # A full Initial needs no state: it is still routed while the table is full.
        ok = await client(port)
        first = initial("b.example.com", b"\x08" * 8)
        ok.send(first)
        assert await ok.recv() == first
        assert len(listener.pending) == 4
        assert ta.received == 0
        # The undecided expire after peek_timeout (no fallback: dropped), freeing the table.
        await eventually(lambda: _true(not listener.pending))
        assert ta.received == 0
        for c in (*flood, ok):
            c.close()


async def test_a_client_is_unpinned_when_its_session_idles_out() -> None:
    port = free_udp_port()
    async with targets(2) as (ta, tb):
        text = two_routes(port, ta.port, tb.port, extra="    udp_idle_timeout: 0.2s\n")
        async with serving(text) as (server, listener):
            c = await client(port)
            first = initial("a.example.com", b"\x09" * 8)
            c.send(first)
            assert await c.recv() == first
            assert len(listener.pins) == 1
            await eventually(lambda: _true(not listener.pins))
            stream = server.streams["a"]
            assert len(stream.live()) == 0
            # Back as a new client: sniffed again (not QUIC now, no fallback: dropped).
            c.send(b"not quic")
            c.send(initial("b.example.com", b"\x0a" * 8))
            assert await c.recv() != first
            assert (ta.received, tb.received) == (1, 1)
            c.close()


async def _true(value: bool) -> bool:
    return value


# -- configuration


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "quic.yml")
    return str(info.value)


def test_udp_routes_may_match_sni_and_alpn_only() -> None:
    load_config_text(two_routes(4433, 1, 2, 3), "quic.yml")
    alpn = "routes:\n" + route("h3", 4433, 1, "{alpn: [h3]}") + route("x", 4433, 2, None)
    load_config_text(alpn, "quic.yml")
    for bad in ("{protocol: tls}", "{http_host: [a.example.com]}"):
        message = refused("routes:\n" + route("r", 4433, 1, bad))
        assert "route 'r'" in message and "TCP only" in message and "match.sni" in message


def test_udp_matches_conflict_like_tcp() -> None:
    same = (
        "routes:\n"
        + route("a", 4433, 1, "{sni: [a.example.com]}")
        + route("b", 4433, 2, "{sni: [A.example.com]}")
    )
    assert "routes 'a' and 'b' match the same connections" in refused(same)
    two = two_routes(4433, 1, 2, 3) + route("again", 4433, 4, None)
    assert "both the fallback" in refused(two)
    no_match = "routes:\n" + route("x", 4433, 1, None) + route("y", 4433, 2, None)
    assert "listens on the same address and protocol" in refused(no_match)


async def test_a_reload_that_adds_a_route_rebuilds_the_listener_on_the_same_port() -> None:
    port = free_udp_port()
    async with targets(3) as (ta, tb, tc), serving(two_routes(port, ta.port, tb.port)) as (server, old):
        text = two_routes(port, ta.port, tb.port) + route("c", port, tc.port, "{sni: [c.example.com]}")
        assert await server.apply(load_config_text(text, "quic.yml")) == {}
        [listener] = server.listeners.values()
        assert listener is not old and listener.local_addr == ("127.0.0.1", port)
        for sni, target in (("c.example.com", tc), ("a.example.com", ta)):
            c = await client(port)
            first = initial(sni, b"\x0b" * 8)
            c.send(first)
            assert await c.recv() == first
            assert target.received == 1
            c.close()


async def test_an_undecided_client_cannot_park_more_than_pending_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="portway")
    port = free_udp_port()
    async with targets(3) as (ta, tb, tf), serving(two_routes(port, ta.port, tb.port, tf.port)) as (_, lst):
        lst.pending_bytes = 2000
        c = await client(port)
        one, two = split_initial("a.example.com", b"\x0c" * 8)
        c.send(one)
        c.send(two)  # would complete the hello, but is past the bound: undecidable, the fallback
        assert await c.recv() == one  # not held past the bound: all forwarded, in order
        assert await c.recv() == two
        assert (ta.received, tf.received) == (0, 2)
        assert not lst.pending
