"""PROXY protocol v1/v2: vectors from the spec, malformed input, and round-trip properties."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway.errors import ProxyProtocolError
from portway.proxy_protocol import (
    MAX_V1_LENGTH,
    MAX_V2_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeader,
    build_v1,
    build_v2,
    classify_prefix,
    maybe_parse_header,
)


def v2(ver_cmd: int, fam: int, payload: bytes, *, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return V2_SIGNATURE + bytes((ver_cmd, fam)) + struct.pack("!H", n) + payload


def tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind,)) + struct.pack("!H", len(value)) + value


V4_BLOCK = bytes([192, 168, 0, 1, 192, 168, 0, 11]) + struct.pack("!HH", 56324, 443)
V6_BLOCK = (
    ipaddress.IPv6Address("2001:db8::1").packed + ipaddress.IPv6Address("::1").packed + b"\x00\x50\x01\xbb"
)


# -- valid vectors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), 47),
        ),
        (
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            ProxyHeader(1, "PROXY", "TCP4", ("255.255.255.255", 65535), ("255.255.255.255", 65535), 56),
        ),
        (
            b"PROXY TCP4 0.0.0.0 1.2.3.4 0 0\r\n",
            ProxyHeader(1, "PROXY", "TCP4", ("0.0.0.0", 0), ("1.2.3.4", 0), 32),
        ),
        (
            b"PROXY TCP6 2001:DB8::1 ::1 1 2\r\n",
            ProxyHeader(1, "PROXY", "TCP6", ("2001:db8::1", 1), ("::1", 2), 32),
        ),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(1, "PROXY", "UNKNOWN", None, None, 15)),
        (
            b"PROXY UNKNOWN ffff:f:ffff ffff::f:ffff 65535 65535\r\n",
            ProxyHeader(1, "PROXY", "UNKNOWN", None, None, 52),
        ),
        (
            v2(0x21, 0x11, V4_BLOCK),
            ProxyHeader(2, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), 28),
        ),
        (
            v2(0x21, 0x12, V4_BLOCK),
            ProxyHeader(2, "PROXY", "UDP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), 28),
        ),
        (
            v2(0x21, 0x21, V6_BLOCK),
            ProxyHeader(2, "PROXY", "TCP6", ("2001:db8::1", 80), ("::1", 443), 52),
        ),
        (
            v2(0x21, 0x22, V6_BLOCK),
            ProxyHeader(2, "PROXY", "UDP6", ("2001:db8::1", 80), ("::1", 443), 52),
        ),
        (v2(0x20, 0x00, b""), ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, 16)),
        # LOCAL with an address block: the block is discarded, family included.
        (v2(0x20, 0x11, V4_BLOCK), ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, 28)),
        (v2(0x21, 0x00, b"whatever"), ProxyHeader(2, "PROXY", "UNKNOWN", None, None, 24)),
        (v2(0x21, 0x31, b"\0" * 216), ProxyHeader(2, "PROXY", "UNKNOWN", None, None, 232)),
    ],
)
def test_valid_headers_parse_and_leave_trailing_data(raw: bytes, expected: ProxyHeader) -> None:
    assert maybe_parse_header(raw) == expected
    data = raw + b"GET / HTTP/1.1\r\n\r\n"
    header = maybe_parse_header(memoryview(data))
    assert header == expected
    assert data[header.length :] == b"GET / HTTP/1.1\r\n\r\n"


def test_v2_tlvs_are_skipped() -> None:
    tlvs = tlv(0x02, b"example.com") + tlv(0x05, b"\x01" * 32) + tlv(0x04, b"")
    header = maybe_parse_header(v2(0x21, 0x11, V4_BLOCK + tlvs) + b"rest")
    assert header is not None
    assert header.source == ("192.168.0.1", 56324)
    assert header.length == 16 + 12 + len(tlvs)


def test_v2_accepts_bytearray_and_memoryview() -> None:
    raw = v2(0x21, 0x11, V4_BLOCK)
    assert (
        maybe_parse_header(bytearray(raw)) == maybe_parse_header(memoryview(raw)) == maybe_parse_header(raw)
    )


# -- incomplete input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"P",
        b"PROXY",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
        b"\r\n\r\n\x00",
        V2_SIGNATURE + b"\x21\x11\x00",
        v2(0x21, 0x11, V4_BLOCK)[:-1],
    ],
)
def test_incomplete_header_asks_for_more(raw: bytes) -> None:
    assert maybe_parse_header(raw) is None


# -- malformed input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "signature"),
        (b"PROXZ TCP4", "signature"),
        (b"\r\n\r\nX", "signature"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 80\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 80\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 80\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 80\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n", "exactly 4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 80 80\r\n", "exactly 4 fields"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 80 80\r\n", "exactly 4 fields"),
        (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "IPv4 address"),
        (b"PROXY TCP4 999.1.1.1 5.6.7.8 1 2\r\n", "IPv4 address"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "IPv4 address"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "IPv6 address"),
        (b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n", "IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "IPv6 address"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "invalid byte"),
        (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "invalid byte"),
        (b"PROXY TCP4 1.2.3.4 \xff", "invalid byte"),
        (b"PROXY UNKNOWN " + b"f" * 100, "no CRLF within 107"),
        (v2(0x11, 0x11, V4_BLOCK), "version"),
        (v2(0x22, 0x11, V4_BLOCK), "command"),
        (v2(0x21, 0x13, V4_BLOCK), "family"),
        (v2(0x21, 0x41, V4_BLOCK), "family"),
        (v2(0x21, 0x11, V4_BLOCK[:8]), "too short"),
        (v2(0x21, 0x21, V4_BLOCK), "too short"),
        (v2(0x21, 0x11, b"", length=MAX_V2_PAYLOAD + 1), "too long"),
        (v2(0x21, 0x11, b"", length=0xFFFF), "too long"),
        (v2(0x21, 0x11, V4_BLOCK + b"\x02\x00"), "truncated TLV"),
        (v2(0x21, 0x11, V4_BLOCK + b"\x02\x00\x05abc"), "TLV longer"),
    ],
)
def test_malformed_headers_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError, match=reason):
        maybe_parse_header(raw)


def test_oversized_v2_is_rejected_before_the_payload_arrives() -> None:
    with pytest.raises(ProxyProtocolError, match="too long"):
        maybe_parse_header(V2_SIGNATURE + b"\x21\x11\xff\xff")


def test_garbage_fails_fast_without_waiting_for_107_bytes() -> None:
    with pytest.raises(ProxyProtocolError):
        maybe_parse_header(b"PROXY \x00")


def test_v1_line_of_exactly_107_bytes_is_accepted() -> None:
    line = b"PROXY UNKNOWN " + b"f" * (MAX_V1_LENGTH - 16) + b"\r\n"
    assert len(line) == MAX_V1_LENGTH
    header = maybe_parse_header(line + b"x")
    assert header is not None
    assert header.length == MAX_V1_LENGTH


# -- classify_prefix (mixed mode) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", None),
        (b"PRO", None),
        (b"PROXY", None),
        (b"PROXY ", True),
        (b"PROXY TCP4 garbage", True),
        (b"\r\n\r\n\x00\r\nQUI", None),
        (V2_SIGNATURE, True),
        (V2_SIGNATURE + b"\xff", True),
        (b"GET / HTTP/1.1\r\n", False),
        (b"PROXYZ", False),
        (b"\r\n\r\nhello", False),
        (b"\x16\x03\x01\x02\x00", False),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH\r\n", False),
    ],
)
def test_classify_prefix(raw: bytes, expected: bool | None) -> None:
    assert classify_prefix(raw) is expected
    assert classify_prefix(memoryview(raw)) is expected


# -- builders ----------------------------------------------------------------------------------


def test_build_v1_vectors() -> None:
    assert build_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    assert build_v1(("2001:db8::1", 1), ("::1", 2)) == b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"
    assert build_v1(None, ("::1", 2)) == b"PROXY UNKNOWN\r\n"


def test_builders_normalise_mapped_addresses_to_ipv4() -> None:
    assert build_v1(("::ffff:1.2.3.4", 1), ("5.6.7.8", 2)) == b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    header = maybe_parse_header(build_v2(("::ffff:1.2.3.4", 1), ("::ffff:5.6.7.8", 2)))
    assert header is not None
    assert header.transport == "TCP4"
    assert header.source == ("1.2.3.4", 1)


def test_builders_map_ipv4_when_the_other_side_is_ipv6() -> None:
    for built in (build_v1(("1.2.3.4", 1), ("2001:db8::1", 2)), build_v2(("1.2.3.4", 1), ("2001:db8::1", 2))):
        header = maybe_parse_header(built)
        assert header is not None
        assert header.transport == "TCP6"
        assert header.source is not None
        assert ipaddress.IPv6Address(header.source[0]).ipv4_mapped == ipaddress.IPv4Address("1.2.3.4")


def test_build_v2_local_and_unspec() -> None:
    assert build_v2(None, None, local=True) == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), local=True) == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert build_v2(None, None) == V2_SIGNATURE + b"\x21\x00\x00\x00"


@pytest.mark.parametrize("build", [build_v1, build_v2])
def test_builders_reject_bad_input(build: object) -> None:
    assert callable(build)
    with pytest.raises(ValueError, match="port"):
        build(("1.2.3.4", 70000), ("5.6.7.8", 1))
    with pytest.raises(ValueError, match="does not appear"):
        build(("not-an-ip", 1), ("5.6.7.8", 1))


# -- properties --------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
ports = st.integers(0, 65535)


def _norm(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


endpoints = st.tuples(st.one_of(ipv4, ipv6), ports)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    (src, sport), (dst, dport) = draw(st.tuples(endpoints, endpoints))
    if draw(st.booleans()):
        return build_v1((str(src), sport), (str(dst), dport))
    built = build_v2((str(src), sport), (str(dst), dport), datagram=draw(st.booleans()))
    extra = b"".join(draw(st.lists(st.builds(tlv, st.integers(0, 255), st.binary(max_size=40)), max_size=4)))
    if not extra:
        return built
    (length,) = struct.unpack_from("!H", built, 14)
    return built[:14] + struct.pack("!H", length + len(extra)) + built[16:] + extra


@given(endpoints, endpoints, st.sampled_from(["v1", "v2", "v2-udp"]))
def test_build_then_parse_round_trips(
    src: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int],
    dst: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int],
    kind: str,
) -> None:
    s, d = (str(src[0]), src[1]), (str(dst[0]), dst[1])
    built = build_v1(s, d) if kind == "v1" else build_v2(s, d, datagram=kind == "v2-udp")
    header = maybe_parse_header(built)
    assert header is not None
    assert header.length == len(built)
    assert header.source is not None
    assert header.destination is not None
    assert (_norm(ipaddress.ip_address(header.source[0])), header.source[1]) == (_norm(src[0]), src[1])
    assert (_norm(ipaddress.ip_address(header.destination[0])), header.destination[1]) == (
        _norm(dst[0]),
        dst[1],
    )
    assert header.transport.startswith("UDP" if kind == "v2-udp" else "TCP")


@given(headers())
def test_every_proper_prefix_asks_for_more(raw: bytes) -> None:
    for cut in range(len(raw)):
        assert maybe_parse_header(raw[:cut]) is None
        assert classify_prefix(raw[:cut]) in (None, True)
    assert classify_prefix(raw) is True


@given(headers(), st.binary(max_size=200))
def test_trailing_bytes_are_never_consumed(raw: bytes, trailing: bytes) -> None:
    header = maybe_parse_header(raw + trailing)
    assert header is not None
    assert header.length == len(raw)


@given(st.one_of(st.binary(max_size=300), st.binary(max_size=120).map(lambda b: b"PROXY " + b)))
def test_random_bytes_only_raise_proxy_protocol_error(raw: bytes) -> None:
    try:
        header = maybe_parse_header(raw)
    except ProxyProtocolError:
        return
    if header is not None:
        assert 0 < header.length <= len(raw)


@given(st.binary(max_size=80))
def test_random_v2_bodies_only_raise_proxy_protocol_error(body: bytes) -> None:
    try:
        header = maybe_parse_header(V2_SIGNATURE + body)
    except ProxyProtocolError:
        return
    if header is not None:
        assert 16 <= header.length <= len(body) + 12
