"""Ports for the servers the tests start, taken from below the kernel's ephemeral range.

A port found by binding to port 0 comes from the ephemeral range, where the kernel also picks
the local port of every outgoing connection: between the probe and the server's own bind, a
connection the suite makes can take it (CI saw "address already in use" on a route's port).
Below that range only explicit binds take ports, so a port that a probe could bind on every
address, without SO_REUSEADDR (so nothing lingers in TIME_WAIT either), stays free for the
server. Successive calls hand out different ports, since callers often take two before binding.
"""

from __future__ import annotations

import errno
import random
import socket


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_HIGH = _ephemeral_low()  # first port of the ephemeral range: excluded
_LOW = max(1024, _HIGH - 12000)
_cursor = random.randrange(_LOW, _HIGH)


def _bindable(port: int, kind: socket.SocketKind) -> bool:
    """Nothing holds `port` on any address, IPv4 or IPv6 (a dual-stack wildcard bind)."""
    try:
        with socket.socket(socket.AF_INET6, kind) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::", port))
        return True
    except OSError as exc:
        if exc.errno != errno.EAFNOSUPPORT:  # else: no IPv6 on this machine, try IPv4 alone
            return False
    try:
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind(("0.0.0.0", port))
        return True
    except OSError:
        return False


def _free(kind: socket.SocketKind) -> int:
    global _cursor
    span = _HIGH - _LOW
    for step in range(span):
        port = _LOW + (_cursor - _LOW + step) % span
        if _bindable(port, kind):
            _cursor = _LOW + (port - _LOW + 1) % span
            return port
    raise RuntimeError(f"no free port between {_LOW} and {_HIGH - 1}")


def free_port() -> int:
    """A TCP port nothing uses, outside the ephemeral range."""
    return _free(socket.SOCK_STREAM)


def free_udp_port() -> int:
    """A UDP port nothing uses, outside the ephemeral range."""
    return _free(socket.SOCK_DGRAM)
