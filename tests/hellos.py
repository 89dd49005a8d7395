"""ClientHellos for the sniffing tests: real ones from Python's ssl module and hand-built ones.

Real hellos come from an `ssl.SSLObject` over memory BIOs: the handshake's first flight is read
from the outgoing BIO, so no socket or network is involved. Hand-built ones exist for what real
clients do not send on demand (GREASE everywhere, hundreds of extensions, hostile lengths).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import ssl
from collections.abc import Iterable, Sequence

GREASE = tuple(0x0A0A + 0x1010 * i for i in range(16))


@functools.cache
def real_hello(
    server_hostname: str | None = None, alpn: tuple[str, ...] = (), tls13_only: bool = False
) -> bytes:
    """The bytes an `ssl` client sends first (one record holding the ClientHello)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls13_only:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def vector(size_bytes: int, body: bytes) -> bytes:
    return len(body).to_bytes(size_bytes, "big") + body


def extension(kind: int, body: bytes) -> bytes:
    return kind.to_bytes(2, "big") + vector(2, body)


def sni_extension(*names: bytes, name_type: int = 0) -> bytes:
    return extension(0, vector(2, b"".join(bytes([name_type]) + vector(2, name) for name in names)))


def alpn_extension(*protocols: bytes) -> bytes:
    return extension(16, vector(2, b"".join(vector(1, p) for p in protocols)))


def versions_extension(*versions: int) -> bytes:
    return extension(43, vector(1, b"".join(v.to_bytes(2, "big") for v in versions)))


def handshake(
    extensions: Iterable[bytes] | None = (),
    *,
    version: int = 0x0303,
    session_id: bytes = bytes(32),
    suites: bytes = b"\x13\x01\x13\x02",
) -> bytes:
    """A ClientHello handshake message (type, 24-bit length, body); `extensions=None` omits the block."""
    body = version.to_bytes(2, "big") + bytes(range(32)) + vector(1, session_id) + vector(2, suites)
    body += vector(1, b"\x00")
    if extensions is not None:
        body += vector(2, b"".join(extensions))
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, cuts: Sequence[int] = (), *, version: int = 0x0301) -> bytes:
    """`message` framed as TLS handshake records, a new record starting at each cut."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(message))), len(message)]
    out = bytearray()
    for start, end in itertools.pairwise(bounds):
        out += bytes([22]) + version.to_bytes(2, "big") + vector(2, message[start:end])
    return bytes(out)


def unframe(stream: bytes) -> bytes:
    """The handshake bytes carried by a run of handshake records."""
    out = bytearray()
    pos = 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        out += stream[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return bytes(out)
