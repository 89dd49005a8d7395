"""PROXY protocol v1 (text) and v2 (binary): a sans-I/O parser and builders.

The HAProxy PROXY protocol lets a proxy in front of portway tell it the real client address,
and lets portway tell its targets the same. Nothing here touches a socket: the caller buffers
the first bytes of a connection (or takes a whole UDP datagram) and asks:

    header = maybe_parse_header(buffer)
    if header is None:            # not enough bytes yet: read more (with a timeout)
        ...
    else:                         # forward buffer[header.length:] to the target untouched
        client = header.source or transport.get_extra_info("peername")

`maybe_parse_header` never looks at, and never counts, a byte past the header, so whatever
the client sent right after it belongs to the application stream. It raises
`ProxyProtocolError` for anything that is not a valid header; the caller closes the connection.

Mixed mode (accepting connections with and without a header on one port) uses
`classify_prefix`: True means "a header starts here, parse it", False means "ordinary client
data, forward as is", None means "too few bytes to tell, read more". The spec forbids guessing
because any client can then forge its address; mixed mode is only sane when the listener's
ACL restricts who may connect at all. A client that legitimately sends fewer than 12 bytes
that look like a header prefix (e.g. ``b"PROX"``) and then waits would stall, so the caller
needs a short timeout after which it treats the buffered bytes as data.

Transport names: ``"TCP4"``, ``"TCP6"``, ``"UDP4"``, ``"UDP6"`` or ``"UNKNOWN"``. UNKNOWN covers
v1 ``PROXY UNKNOWN``, every v2 LOCAL header, v2 AF_UNSPEC, and v2 AF_UNIX (portway has no use
for Unix socket paths, so they are parsed for length and then treated like AF_UNSPEC, which
the spec allows). For UNKNOWN, ``source`` and ``destination`` are None: use the socket's own
addresses. Otherwise they are ``(host, port)`` with the host in Python's canonical text form;
an IPv4-mapped address in a TCP6/UDP6 header is reported as sent (``::ffff:102:304``), and
`portway.acl.Acl.decide` matches it as IPv4. v2 TLVs are checked to fit and then skipped
(their values, including PP2_TYPE_CRC32C, are not interpreted).

The builders pick the family from the addresses: IPv4-mapped addresses are reduced to IPv4
first, and if the two sides still differ the IPv4 side is mapped into IPv6 (TCP6 / AF_INET6).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal

from portway.errors import ProxyProtocolError

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_PAYLOAD",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "Address",
    "ProxyHeader",
    "Transport",
    "build_v1",
    "build_v2",
    "classify_prefix",
    "maybe_parse_header",
]

Transport = Literal["TCP4", "TCP6", "UDP4", "UDP6", "UNKNOWN"]
Address = tuple[str, int]
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

V1_PREFIX: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"

# The spec's worst case line, "PROXY UNKNOWN <v6> <v6> 65535 65535\r\n", is 107 bytes.
MAX_V1_LENGTH: Final = 107
# v2 announces its own length (up to 65535). Each connection buffers the whole header before
# it is parsed, so an unchecked length would let any client pin 64 KiB per connection while
# trickling bytes. Real senders need 216 bytes of Unix addresses plus a few TLVs (SSL info,
# authority, unique id); 4096 is generous for that and keeps the per-connection bound small.
MAX_V2_PAYLOAD: Final = 4096

_V2_FIXED = 16  # signature, version/command, family/protocol, length
_V2_CMD_LOCAL: Final = 0x0
_V2_CMD_PROXY: Final = 0x1
# family/protocol byte -> (address block size, transport). Only these are valid on the wire.
_V2_FAMILIES: Final[dict[int, tuple[int, Transport]]] = {
    0x00: (0, "UNKNOWN"),
    0x11: (12, "TCP4"),
    0x12: (12, "UDP4"),
    0x21: (36, "TCP6"),
    0x22: (36, "UDP6"),
    0x31: (216, "UNKNOWN"),  # AF_UNIX stream: skipped, see the module docstring
    0x32: (216, "UNKNOWN"),  # AF_UNIX datagram
}
# Printable ASCII: a header is a text line, so any other byte before the CRLF (including a
# lone CR or LF, which the spec says must not end the line) proves the input is not one.
_V1_ALLOWED = frozenset(range(0x20, 0x7F))
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header; `length` is how many bytes of the input it occupied."""

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    transport: Transport
    source: Address | None
    destination: Address | None
    length: int


def classify_prefix(data: bytes | bytearray | memoryview) -> bool | None:
    """Tell whether `data` starts with a PROXY header: True, False, or None if too short to say.

    Only the fixed signatures are compared (6 bytes for v1, 12 for v2); True does not mean
    the header is valid, only that `maybe_parse_header` must decide.
    """
    head = bytes(data[: len(V2_SIGNATURE)])
    for signature in (V1_PREFIX, V2_SIGNATURE):
        if head.startswith(signature):
            return True
        if len(head) < len(signature) and signature.startswith(head):
            return None
    return False


def maybe_parse_header(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """Parse a v1 or v2 header at the start of `data`, or return None if more bytes are needed.

    Raises ProxyProtocolError as soon as the bytes seen cannot be the start of a valid header,
    so a client sending garbage is rejected without waiting for a timeout.
    """
    if not data:
        return None
    first = data[0]
    if first == V1_PREFIX[0]:
        return _maybe_parse_v1(data)
    if first == V2_SIGNATURE[0]:
        return _maybe_parse_v2(data)
    raise ProxyProtocolError("not a PROXY protocol header (bad signature)")


# -- version 1 -------------------------------------------------------------------------------


def _maybe_parse_v1(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    head = bytes(data[:MAX_V1_LENGTH])
    prefix = head[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(prefix):
        raise ProxyProtocolError("not a PROXY protocol header (bad v1 signature)")
    end = head.find(b"\r\n")
    line = head if end < 0 else head[:end]
    # Reject early rather than wait for a CRLF that garbage may never send.
    for i, byte in enumerate(line):
        if byte == 0x0D and i == len(line) - 1 and end < 0:
            break  # a CR at the very end of the buffer may be followed by its LF
        if byte not in _V1_ALLOWED:
            raise ProxyProtocolError(f"v1 header contains an invalid byte 0x{byte:02x}")
    if end < 0:
        if len(head) >= MAX_V1_LENGTH:
            raise ProxyProtocolError(f"v1 header has no CRLF within {MAX_V1_LENGTH} bytes")
        return None
    return _parse_v1_line(line.decode("ascii"), end + 2)


def _parse_v1_line(line: str, length: int) -> ProxyHeader:
    parts = line.split(" ")
    if len(parts) < 2 or parts[0] != "PROXY":
        raise ProxyProtocolError(f"malformed v1 header {line!r}")
    proto = parts[1]
    if proto == "UNKNOWN":
        # The spec says to ignore whatever follows UNKNOWN up to the CRLF.
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, length)
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"v1 header has unknown protocol {proto!r}")
    if len(parts) != 6:
        raise ProxyProtocolError(f"v1 header needs exactly 4 fields after {proto}: {line!r}")
    transport: Transport = "TCP4" if proto == "TCP4" else "TCP6"
    version = 4 if proto == "TCP4" else 6
    src = _v1_address(parts[2], version)
    dst = _v1_address(parts[3], version)
    sport = _v1_port(parts[4])
    dport = _v1_port(parts[5])
    return ProxyHeader(1, "PROXY", transport, (src, sport), (dst, dport), length)


def _v1_address(text: str, version: int) -> str:
    # ipaddress already refuses leading zeros in IPv4 (the spec forbids them: octal confusion);
    # for IPv6 the spec allows only hex groups and colons, so no dotted tail and no zone id.
    try:
        if version == 4:
            return str(ipaddress.IPv4Address(text))
        if not text or not _HEX_COLON.issuperset(text):
            raise ValueError(text)
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise ProxyProtocolError(f"v1 header has an invalid IPv{version} address {text!r}") from None


def _v1_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError(f"v1 header has an invalid port {text!r}")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"v1 header has an out-of-range port {text!r}")
    return port


# -- version 2 -------------------------------------------------------------------------------


def _maybe_parse_v2(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    fixed = bytes(data[:_V2_FIXED])
    sig = fixed[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(sig):
        raise ProxyProtocolError("not a PROXY protocol header (bad v2 signature)")
    if len(fixed) > 12:
        ver_cmd = fixed[12]
        if ver_cmd >> 4 != 2:
            raise ProxyProtocolError(f"v2 header has unsupported version {ver_cmd >> 4}")
        if ver_cmd & 0x0F not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
            raise ProxyProtocolError(f"v2 header has unknown command {ver_cmd & 0x0F}")
    if len(fixed) > 13 and fixed[13] not in _V2_FAMILIES:
        raise ProxyProtocolError(f"v2 header has unknown family/protocol 0x{fixed[13]:02x}")
    if len(fixed) < _V2_FIXED:
        return None
    (payload_len,) = struct.unpack_from("!H", fixed, 14)
    if payload_len > MAX_V2_PAYLOAD:
        raise ProxyProtocolError(f"v2 header too long ({payload_len} > {MAX_V2_PAYLOAD} bytes)")
    total = _V2_FIXED + payload_len
    if len(data) < total:
        return None
    addr_len, transport = _V2_FAMILIES[fixed[13]]
    if fixed[12] & 0x0F == _V2_CMD_LOCAL:
        # LOCAL: the spec says to discard the whole block, family included.
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, total)
    if payload_len < addr_len:
        raise ProxyProtocolError(
            f"v2 header length {payload_len} is too short for its {addr_len}-byte addresses"
        )
    payload = bytes(data[_V2_FIXED:total])
    if fixed[13] == 0x00:
        # AF_UNSPEC: the spec says to ignore the block, so its bytes need not be TLVs.
        return ProxyHeader(2, "PROXY", "UNKNOWN", None, None, total)
    _check_tlvs(payload[addr_len:])
    if transport == "UNKNOWN":
        return ProxyHeader(2, "PROXY", "UNKNOWN", None, None, total)
    size = 4 if addr_len == 12 else 16
    make = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    src = str(make(payload[:size]))
    dst = str(make(payload[size : 2 * size]))
    sport, dport = struct.unpack_from("!HH", payload, 2 * size)
    return ProxyHeader(2, "PROXY", transport, (src, sport), (dst, dport), total)


def _check_tlvs(block: bytes) -> None:
    """Walk the TLVs so a length that overruns the header is caught; their values are ignored."""
    offset = 0
    while offset < len(block):
        if len(block) - offset < 3:
            raise ProxyProtocolError("v2 header has a truncated TLV")
        (length,) = struct.unpack_from("!H", block, offset + 1)
        offset += 3 + length
        if offset > len(block):
            raise ProxyProtocolError("v2 header has a TLV longer than the header")


# -- builders --------------------------------------------------------------------------------


def _same_family(source: Address, destination: Address) -> tuple[_IPAddress, _IPAddress]:
    """Parse both addresses and bring them to one family.

    IPv4-mapped IPv6 addresses (what dual-stack sockets report for IPv4 peers) become IPv4;
    if one side is still IPv6, the IPv4 side is mapped into IPv6 so the header stays valid.
    """
    src = _unmap(ipaddress.ip_address(source[0]))
    dst = _unmap(ipaddress.ip_address(destination[0]))
    if src.version != dst.version:
        src, dst = _to_v6(src), _to_v6(dst)
    return src, dst


def _unmap(addr: _IPAddress) -> _IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _to_v6(addr: _IPAddress) -> ipaddress.IPv6Address:
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)
    return addr


def _check_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0..65535")
    return port


def _v1_text(addr: _IPAddress) -> str:
    # Newer Pythons print mapped addresses as ::ffff:1.2.3.4, which v1 does not allow.
    text = str(addr)
    return addr.exploded if "." in text and addr.version == 6 else text


def build_v1(source: Address | None, destination: Address | None) -> bytes:
    """Build a v1 line; None for either address gives ``PROXY UNKNOWN\\r\\n``.

    Mixed families are sent as TCP6 with the IPv4 side mapped (::ffff:a.b.c.d), which keeps
    the information; v1 has no UDP, so use `build_v2(..., datagram=True)` for UDP.
    Raises ValueError for an invalid address or port.
    """
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = _same_family(source, destination)
    sport, dport = _check_port(source[1]), _check_port(destination[1])
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {_v1_text(src)} {_v1_text(dst)} {sport} {dport}\r\n".encode("ascii")


def build_v2(
    source: Address | None,
    destination: Address | None,
    *,
    datagram: bool = False,
    local: bool = False,
) -> bytes:
    """Build a v2 header (no TLVs); `datagram` selects UDP, `local` a LOCAL command.

    LOCAL headers (health checks) and headers with a None address carry no addresses
    (AF_UNSPEC). Families are normalised as in `build_v1`. Raises ValueError for an invalid
    address or port.
    """
    if local or source is None or destination is None:
        command = _V2_CMD_LOCAL if local else _V2_CMD_PROXY
        return V2_SIGNATURE + bytes((0x20 | command, 0x00)) + b"\0\0"
    src, dst = _same_family(source, destination)
    sport, dport = _check_port(source[1]), _check_port(destination[1])
    family = 0x10 if src.version == 4 else 0x20
    protocol = 0x02 if datagram else 0x01
    block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return (
        V2_SIGNATURE
        + bytes((0x20 | _V2_CMD_PROXY, family | protocol))
        + struct.pack("!H", len(block))
        + block
    )
