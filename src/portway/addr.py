"""Address and port syntax: networks, ``host:port`` strings and ``[listening:]target`` port specs.

Pure functions, no sockets: the only outside knowledge (service names from /etc/services) is
passed in as a lookup callable so the parsing rules can be tested exhaustively.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Network = Literal["tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"]
NETWORKS: tuple[Network, ...] = ("tcp", "tcp4", "tcp6", "udp", "udp4", "udp6")

_MAX_PORT = 65535


def is_udp(network: Network) -> bool:
    return network.startswith("udp")


def family_of(network: Network) -> int:
    """The socket family a network pins: AF_INET, AF_INET6, or AF_UNSPEC for dual-stack."""
    if network.endswith("4"):
        return socket.AF_INET
    if network.endswith("6"):
        return socket.AF_INET6
    return socket.AF_UNSPEC


def parse_network(text: str) -> Network:
    value = text.strip().lower()
    for network in NETWORKS:
        if value == network:
            return network
    raise ValueError(f"unknown scheme {text!r} (expected one of: {', '.join(NETWORKS)})")


def ip_family(host: str) -> int | None:
    """AF_INET or AF_INET6 when `host` is an IP literal, else None (a name)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def parse_port_number(text: str, *, allow_zero: bool) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"port {text!r} is not a number")
    value = int(text)
    lowest = 0 if allow_zero else 1
    if not lowest <= value <= _MAX_PORT:
        raise ValueError(f"port {value} out of range {lowest}-{_MAX_PORT}")
    return value


@dataclass(frozen=True, slots=True)
class HostPort:
    """A parsed ``host:port``; host is "" when omitted (":port")."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


def format_hostport(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals bracketed, as every log line and error shows addresses."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_hostport(text: str, *, allow_zero_port: bool = True) -> HostPort:
    """Parse ``host:port``, ``[v6]:port`` or ``:port``."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ValueError(f"malformed address {text!r} (expected [ipv6]:port)")
        host, port_text = text[1:end], text[end + 2 :]
        if ip_family(host) != socket.AF_INET6:
            raise ValueError(f"malformed address {text!r}: {host!r} is not an IPv6 address")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"malformed address {text!r} (expected host:port)")
        if ":" in host:
            raise ValueError(f"malformed address {text!r}: write IPv6 addresses as [addr]:port")
    return HostPort(host, parse_port_number(port_text, allow_zero=allow_zero_port))


ServiceLookup = Callable[[str, str], int]


def lookup_service(name: str, proto: str) -> int:
    """The port /etc/services gives `name` for `proto` ("tcp" or "udp"); raises ValueError."""
    try:
        return socket.getservbyname(name, proto)
    except OSError:
        raise ValueError(f"unknown service name {name!r} for {proto}") from None


@dataclass(frozen=True, slots=True)
class PortSpec:
    """``[listening:]target``: listening 0 means any free port."""

    listening: int
    target: int

    def __str__(self) -> str:
        return f"{self.listening}:{self.target}"


def parse_port_spec(
    text: str, proto: Literal["tcp", "udp"], lookup: ServiceLookup = lookup_service
) -> PortSpec:
    """Parse a route's ``port`` field; a non-numeric target is a service name looked up for `proto`."""
    raw = text.strip()
    parts = raw.split(":")
    if len(parts) > 2 or not raw:
        raise ValueError(f"malformed port {text!r} (expected [listening:]target, e.g. 2222:22)")
    listen_text, target_text = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
    listening = parse_port_number(listen_text, allow_zero=True) if listen_text else 0
    if not target_text:
        raise ValueError(f"malformed port {text!r}: the target port is missing")
    if target_text.isdigit():
        target = parse_port_number(target_text, allow_zero=False)
    else:
        target = lookup(target_text, proto)
    return PortSpec(listening, target)
