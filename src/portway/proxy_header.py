"""The PROXY protocol phase of a TCP connection, as both engines run it. Sans-I/O.

`ProxyProtocolPolicy` says whether a listener expects headers, from whom and for how long;
`HeaderReader` takes the first bytes of a trusted peer's connection and decides, in one place,
what counts as a header, as plain data (mixed mode) or as a reason to close; `relay_header`
builds the header that tells a target who the client is.

Kept apart from ``admission`` (which builds these from the validated config, with pydantic and
GeoIP behind it) so that the data plane imports only what it runs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from portway.errors import ProxyProtocolError
from portway.proxy_protocol import ProxyHeader, build_v1, build_v2, classify_prefix, maybe_parse_header

__all__ = [
    "HEADER_LIMIT",
    "UNTRUSTED",
    "HeaderDone",
    "HeaderOutcome",
    "HeaderReader",
    "HeaderRefused",
    "ProxyProtocolPolicy",
    "relay_header",
    "unmap_net",
]

Address = tuple[str, int]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ProxyProtocolPolicy:
    """Receiving the PROXY protocol on one TCP listener (never built for ``mode: disabled``)."""

    mode: Literal["required", "mixed"]
    trusted: tuple[IPNetwork, ...]
    header_timeout: float

    def first_step(self, host: str) -> Literal["read", "skip", "refuse"]:
        """What a new connection from `host` does first: read a header (a trusted proxy), skip
        it (mixed mode: an untrusted peer is served as itself, its bytes never inspected), or be
        refused (required mode, untrusted peer)."""
        if self.trusts(host):
            return "read"
        return "refuse" if self.mode == "required" else "skip"

    def trusts(self, host: str) -> bool:
        """Whether a peer at `host` may tell us who the client is."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # dual-stack listeners report IPv4 peers as ::ffff:a.b.c.d
        return any(ip in net for net in self.trusted)


UNTRUSTED = "peer is not a trusted proxy (PROXY protocol required)"
#: A v2 header is at most 16 + 65535 bytes and v1 far shorter: reading stops there, so a trusted
#: but broken peer cannot make a connection hold more.
HEADER_LIMIT = 16 + 65535


@dataclass(frozen=True, slots=True)
class HeaderDone:
    """The header phase is over: `header` is None when a mixed-mode client sent none; `rest` are
    the bytes after the header, to be forwarded to the target before anything else."""

    header: ProxyHeader | None
    rest: bytes

    def addresses(self, client: Address, local: Address | None) -> tuple[Address, Address | None]:
        """The client and the address it connected to, as a believed header tells them; a LOCAL
        or UNKNOWN header (the proxy speaking for itself, e.g. health checks) or none at all
        leaves the socket's own."""
        parsed = self.header
        if parsed is None or parsed.source is None:
            return client, local
        return parsed.source, parsed.destination if parsed.destination is not None else local


@dataclass(frozen=True, slots=True)
class HeaderRefused:
    reason: str


HeaderOutcome = HeaderDone | HeaderRefused


class HeaderReader:
    """The start of a trusted peer's connection, until its PROXY header is complete. Sans-I/O.

    Both TCP engines feed it what they read and act on the outcome; it decides, in one place,
    what counts as a header, as plain data (mixed mode), or as a reason to close.
    """

    __slots__ = ("buffer", "mixed", "timeout")

    def __init__(self, policy: ProxyProtocolPolicy) -> None:
        self.mixed = policy.mode == "mixed"
        self.timeout = policy.header_timeout
        self.buffer = bytearray()

    def room(self) -> int:
        """How many more bytes may be read before the header is too long."""
        return HEADER_LIMIT + 1 - len(self.buffer)

    def feed(self, data: bytes) -> HeaderOutcome | None:
        """Add bytes; None means "need more"."""
        buffer = self.buffer
        buffer += data
        if self._plain(final=False):
            return HeaderDone(None, bytes(buffer))
        try:
            parsed = maybe_parse_header(buffer)
        except ProxyProtocolError as exc:
            return HeaderRefused(str(exc))
        if parsed is not None:
            return HeaderDone(parsed, bytes(buffer[parsed.length :]))
        if len(buffer) > HEADER_LIMIT:
            return HeaderRefused(f"PROXY header longer than {HEADER_LIMIT} bytes")
        return None

    def end_of_stream(self) -> HeaderOutcome:
        """The peer stopped sending before the header was complete."""
        if self.buffer and self._plain(final=True):
            return HeaderDone(None, bytes(self.buffer))
        return HeaderRefused("connection ended before the PROXY header did")

    def expired(self) -> HeaderOutcome:
        """`header_timeout` passed before the header was complete."""
        if self.buffer and self._plain(final=True):
            return HeaderDone(None, bytes(self.buffer))
        return HeaderRefused(
            f"no complete PROXY header within {self.timeout:g}s ({len(self.buffer)} bytes received)"
        )

    def _plain(self, *, final: bool) -> bool:
        """Mixed mode only: do these first bytes belong to a client that sent no header?
        `final` (EOF or timeout): a short prefix that could still have become a header is data."""
        if not self.mixed:
            return False
        starts = classify_prefix(self.buffer)
        return starts is False or (final and starts is None)


def relay_header(version: int, source: Address | None, destination: Address | None) -> bytes:
    """The PROXY header (v1 or v2) that tells a target who the client is."""
    try:
        if version == 1:
            return build_v1(source, destination)
        return build_v2(source, destination)
    except ValueError:
        # An address the header cannot carry (e.g. with a zone index): say "unknown" rather than
        # fail the connection; the target then uses our own address.
        return build_v1(None, None) if version == 1 else build_v2(None, None)


def unmap_net(net: IPNetwork) -> IPNetwork:
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(mapped):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net
