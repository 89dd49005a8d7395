"""Address and port syntax: exhaustive where the space is small, properties where it is not."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway.addr import (
    HostPort,
    PortSpec,
    format_hostport,
    parse_hostport,
    parse_network,
    parse_port_spec,
)
from portway.config.durations import format_duration, parse_duration

ports = st.integers(min_value=1, max_value=65535)


def no_services(name: str, proto: str) -> int:
    raise ValueError(f"unknown service name {name!r} for {proto}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2222:22", PortSpec(2222, 22)),  # the seed's examples mean what they say
        ("53:53", PortSpec(53, 53)),
        ("22", PortSpec(0, 22)),
        ("0:22", PortSpec(0, 22)),
        (":22", PortSpec(0, 22)),
        (" 8080:80 ", PortSpec(8080, 80)),
    ],
)
def test_port_specs(text: str, expected: PortSpec) -> None:
    assert parse_port_spec(text, "tcp", no_services) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1:2:3", "malformed port"),
        ("", "malformed port"),
        ("70000:22", "out of range"),
        ("22:0", "out of range"),
        ("22:70000", "out of range"),
        ("-1:22", "not a number"),
        ("2222:", "target port is missing"),
        ("2222:nosuchservice", "unknown service name"),
        ("٣:22", "not a number"),  # a non-ASCII digit must not pass as a port
    ],
)
def test_bad_port_specs(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_port_spec(text, "tcp", no_services)


def test_service_names_come_from_etc_services() -> None:
    assert parse_port_spec("5354:domain", "udp") == PortSpec(5354, 53)
    assert parse_port_spec("ssh", "tcp") == PortSpec(0, 22)


@given(ports, ports)
def test_port_spec_round_trip(listen: int, target: int) -> None:
    assert parse_port_spec(f"{listen}:{target}", "tcp", no_services) == PortSpec(listen, target)
    assert str(PortSpec(listen, target)) == f"{listen}:{target}"


@given(st.text(max_size=12))
def test_port_spec_never_crashes(text: str) -> None:
    try:
        spec = parse_port_spec(text, "udp", no_services)
    except ValueError:
        return
    assert 0 <= spec.listening <= 65535 and 1 <= spec.target <= 65535


@given(st.ip_addresses(), st.integers(min_value=0, max_value=65535))
def test_hostport_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    text = format_hostport(str(ip), port)
    assert parse_hostport(text) == HostPort(str(ip), port)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.org:53", HostPort("example.org", 53)),
        (":22", HostPort("", 22)),
        ("[::1]:8080", HostPort("::1", 8080)),
    ],
)
def test_hostports(text: str, expected: HostPort) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["::1:80", "[::1]80", "[nothost]:1", "host", "host:http", "[::1]:99999"])
def test_bad_hostports(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


@pytest.mark.parametrize("name", ["tcp", "tcp4", "tcp6", "udp", "udp4", "udp6", "TCP4"])
def test_networks(name: str) -> None:
    assert parse_network(name) == name.lower()


def test_unknown_network() -> None:
    with pytest.raises(ValueError, match="unknown scheme 'sctp'"):
        parse_network("sctp")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5),
        ("300ms", 0.3),
        ("5m", 300),
        ("1m30s", 90),
        ("2h", 7200),
        ("10", 10),
        ("0.5", 0.5),
        ("1d", 86400),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5x", "s", "-1", "1s5", "nan", "inf", "5 s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**6))
def test_duration_format_round_trip(ms: int) -> None:
    seconds = ms / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_family_constants_match_socket_module() -> None:
    from portway.addr import family_of

    assert family_of("tcp4") == socket.AF_INET
    assert family_of("udp6") == socket.AF_INET6
    assert family_of("tcp") == socket.AF_UNSPEC
