"""What a client's first bytes say: TLS ClientHello (SNI, ALPN), SSH, HTTP/1 (Host). Sans-I/O.

A shared listener picks a route before it dials anything, from the bytes the client sends first.
Nothing here touches a socket and nothing consumes: the I/O edge peeks (``MSG_PEEK``) or buffers,
and whatever was looked at is forwarded to the chosen target unchanged.

    sniffer = Sniffer(want_hello=table.wants_hello, want_http_host=table.wants_http_host)
    while (outcome := sniffer.feed(new_bytes)) is None:   # feed only the bytes not fed before
        ...wait for at least sniffer.peek_needed() bytes in total, or peek_timeout -> sniffer.expired()
    # outcome: Sniffed -> MatchTable.choose(outcome); SniffError -> log outcome.reason, close

`feed` takes only new bytes (the sniffer keeps its own copy of at most `Sniffer.limit` bytes); a
caller that peeks sees the whole prefix each time and feeds ``peeked[sniffer.seen:]``. With
``MSG_PEEK`` the socket stays readable while unread bytes sit in it, so the edge should set
``SO_RCVLOWAT`` to `peek_needed()` (or wait on a timer) rather than spin on readiness.

Protocols, from the first bytes (each decided as soon as no other reading is possible):

| protocol | recognised by |
|---|---|
| ``tls`` | a handshake record (type 22, version 0x0301-0x0304) starting a ClientHello (6 bytes) |
| ``ssh`` | ``SSH-2.0-`` or ``SSH-1.99-`` (RFC 4253 §4.2: the client sends its identification first) |
| ``http`` | a complete HTTP/1.x request line: a known method, SP, target, SP, ``HTTP/1.x``, line end |
| ``unknown`` | anything else, or too little before the peek timed out (server-speaks-first protocols) |

Not recognised (they are ``unknown``, i.e. the fallback): SSLv2-format hellos, the HTTP/2
cleartext preface (``PRI * HTTP/2.0``), and every protocol where the server speaks first (SMTP,
MySQL, FTP): those clients send nothing until `expired`.

Bounds, and the attacks they stop:
- A ClientHello is at most `HANDSHAKE_LIMIT` (16 KiB) of handshake in at most `MAX_HELLO_RECORDS`
  records, so a peek never holds more than `HELLO_PREFIX_LIMIT` bytes per connection: a client
  announcing a 16 MiB hello (the 24-bit length allows it) cannot make the proxy buffer it, and a
  hello cut into thousands of 1-byte records cannot cost a record header walk per byte.
- HTTP: a request line of at most `REQUEST_LINE_LIMIT`, a header block of at most
  `HTTP_HEAD_LIMIT` (only read when a route matches on Host): no slowloris-sized buffers.
- Work per `feed` is bounded: a walk over the record headers seen (at most 64) for TLS, a C-level
  search of at most 8 KiB for an HTTP request line, a search of the new bytes for the end of the
  header block; the hello body is parsed once, when complete. Trickling 1 byte at a time stays cheap.

Ambiguity is an error, not a guess: two server_name or ALPN extensions, two Host headers, a
folded header line. A proxy that reads one name while the target reads another is a routing bypass.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal

from portway.errors import PortwayError

__all__ = [
    "HANDSHAKE_LIMIT",
    "HELLO_PREFIX_LIMIT",
    "HTTP_HEAD_LIMIT",
    "HTTP_METHODS",
    "MAX_HELLO_RECORDS",
    "REQUEST_LINE_LIMIT",
    "ClientHello",
    "NeedMore",
    "Protocol",
    "SniffError",
    "Sniffed",
    "Sniffer",
    "classify",
    "is_dns_name",
    "normalize_http_host",
    "parse_client_hello",
    "parse_handshake_client_hello",
    "parse_http_host",
]

Protocol = Literal["tls", "ssh", "http", "quic", "unknown"]

HANDSHAKE_LIMIT: Final = 16 * 1024
MAX_HELLO_RECORDS: Final = 64
HELLO_PREFIX_LIMIT: Final = HANDSHAKE_LIMIT + 5 * MAX_HELLO_RECORDS
REQUEST_LINE_LIMIT: Final = 8 * 1024
HTTP_HEAD_LIMIT: Final = 16 * 1024

HTTP_METHODS: Final = (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK",
)  # fmt: skip
_SSH_IDENTS: Final = (b"SSH-2.0-", b"SSH-1.99-")
_TLS_DECIDED: Final = 6  # record header + handshake type

_CONTENT_HANDSHAKE: Final = 22
_HANDSHAKE_CLIENT_HELLO: Final = 1
_EXT_SERVER_NAME: Final = 0
_EXT_ALPN: Final = 16
_EXT_SUPPORTED_VERSIONS: Final = 43
_MAX_RECORD: Final = 1 << 14

_LABEL = re.compile(rb"[a-z0-9_-]{1,63}")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LINE_PREFIX = re.compile(rb"[\x21-\x7e]*(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?)?")
_REQUEST_LINE = re.compile(rb"([A-Z]+) ([\x21-\x7e]+) HTTP/1\.[0-9]\r?\n")


class SniffError(PortwayError):
    """The first bytes are malformed, oversized, ambiguous or stopped short; the caller closes.

    `reason` is short and says which part was wrong; the I/O edge adds the listener and peer.
    Raised by the parsing functions; `Sniffer` returns it instead, so one ``match`` sees every outcome.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Sniffed:
    """What the first bytes said; the input of `portway.matching.MatchTable.choose`.
    ``quic`` (a QUIC v1 Initial on UDP, with `sni`/`alpn`) only ever comes from `portway.quic`."""

    protocol: Protocol
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    http_host: str | None = None


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Too few bytes to decide. `examined` <= the bytes given; `wanted` > the bytes given: the
    prefix length at which asking again can change the answer (a lower bound, not a promise)."""

    examined: int
    wanted: int


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A parsed ClientHello. `length` is the stream prefix it occupied: every record that held part
    of it, headers included (never more than the bytes given). Names are lowercase ASCII; ALPN
    protocol ids are decoded as Latin-1, so every byte string maps to exactly one str."""

    length: int
    sni: str | None
    alpn: tuple[str, ...]
    legacy_version: int
    supported_versions: tuple[int, ...]
    records: int


def is_dns_name(name: str) -> bool:
    """A lowercase ASCII host name: labels of 1-63 letters, digits, ``-`` or ``_``, 253 chars at most.

    Underscores are allowed because real internal names carry them (``_acme``, container names);
    hyphen placement is not checked. The point is to keep bytes that could confuse logs or lookups
    (NUL, spaces, ``/``, non-ASCII) out of routing keys, not to enforce RFC 1123 pedantically."""
    if not 0 < len(name) <= 253 or not name.isascii():
        return False
    return all(_LABEL.fullmatch(label) for label in name.encode().split(b"."))


def _host_name(raw: bytes, what: str) -> str:
    """Lowercase and validate a host name from the wire; one trailing dot (the DNS root) is dropped."""
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if not name.isascii() or not is_dns_name(name.decode("ascii")):
        raise SniffError(f"{what} is not a valid DNS name")
    return name.decode("ascii")


# -- TLS ------------------------------------------------------------------------------------------


class _Cursor:
    """Reads length-prefixed TLS vectors; every short read is a `SniffError` naming the field."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def done(self) -> bool:
        return self.pos >= self.end

    def take(self, size: int, what: str) -> bytes:
        if self.end - self.pos < size:
            raise SniffError(f"ClientHello truncated in {what}")
        start = self.pos
        self.pos += size
        return self.data[start : self.pos]

    def number(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, size_bytes: int, what: str) -> _Cursor:
        pos = self.pos
        if self.end - pos < size_bytes:  # the message is formatted only when it is needed
            raise SniffError(f"ClientHello truncated in {what} length")
        size = int.from_bytes(self.data[pos : pos + size_bytes], "big")
        self.pos = pos + size_bytes
        if self.end - self.pos < size:
            raise SniffError(f"ClientHello truncated in {what}")
        inner = _Cursor(self.data, self.pos, self.pos + size)
        self.pos += size
        return inner

    def rest(self) -> bytes:
        return self.data[self.pos : self.end]


def _check_record_header(header: bytes | bytearray | memoryview) -> None:
    """Raise for a (possibly partial) record header that cannot start a ClientHello record."""
    if len(header) >= 1 and header[0] != _CONTENT_HANDSHAKE:
        raise SniffError(f"TLS record type {header[0]} is not a handshake")
    if len(header) >= 2 and header[1] != 3:
        raise SniffError(f"TLS record version 0x{header[1]:02x}.. is not 0x0301-0x0304")
    if len(header) >= 3 and not 1 <= header[2] <= 4:
        raise SniffError(f"TLS record version 0x03{header[2]:02x} is not 0x0301-0x0304")
    if len(header) >= 5:
        length = header[3] << 8 | header[4]
        if length == 0:
            raise SniffError("empty TLS handshake record")
        if length > _MAX_RECORD:
            raise SniffError(f"TLS record of {length} bytes is over 16384")


def parse_client_hello(data: bytes | bytearray | memoryview) -> ClientHello | NeedMore:
    """Parse the ClientHello at the start of `data` (a TCP stream prefix), in as many records as it spans.

    Returns `NeedMore` while the prefix could still become a valid hello, and raises `SniffError`
    as soon as it cannot. Decisions are final: a longer prefix never turns an error or a hello into
    something else. Never reads past `data`; bytes after the hello's last record are not looked at.
    """
    view = memoryview(data)
    size = len(view)
    pos = 0
    fragments: list[bytes] = []
    have = 0
    need = 0  # handshake bytes the hello occupies (header included), once its header is in
    records = 0
    while not need or have < need:
        if records == MAX_HELLO_RECORDS:
            raise SniffError(f"ClientHello spread over more than {MAX_HELLO_RECORDS} records")
        if size - pos < 5:
            _check_record_header(view[pos:])
            return NeedMore(examined=size, wanted=pos + 5)
        _check_record_header(view[pos : pos + 5])
        records += 1
        end = pos + 5 + (view[pos + 3] << 8 | view[pos + 4])
        chunk = min(end, size) - pos - 5
        if not need:
            # Copy only the 4 bytes of handshake header; the body is joined once, when complete.
            fragments.append(bytes(view[pos + 5 : pos + 5 + min(chunk, 4 - have)]))
            if have + chunk >= 4:
                header = b"".join(fragments)[:4]
                if header[0] != _HANDSHAKE_CLIENT_HELLO:
                    raise SniffError(f"first TLS handshake message is type {header[0]}, not a ClientHello")
                need = 4 + int.from_bytes(header[1:4], "big")
                if need > HANDSHAKE_LIMIT:
                    raise SniffError(f"ClientHello of {need} bytes is over the {HANDSHAKE_LIMIT}-byte limit")
        have += chunk
        if end > size:
            return NeedMore(examined=size, wanted=end)
        pos = end
    message = _gather(view, records, need)
    return _parse_hello_body(message, length=pos, records=records)


def parse_handshake_client_hello(stream: bytes | bytearray) -> ClientHello | NeedMore:
    """Parse a ClientHello from bare handshake-layer bytes, with no TLS records around them: the
    CRYPTO stream of a QUIC Initial (RFC 9001 §4). Same bounds and errors as `parse_client_hello`;
    `length` is the handshake message's own length and `records` is 0."""
    if len(stream) < 4:
        if stream and stream[0] != _HANDSHAKE_CLIENT_HELLO:
            raise SniffError(f"first TLS handshake message is type {stream[0]}, not a ClientHello")
        return NeedMore(examined=len(stream), wanted=4)
    if stream[0] != _HANDSHAKE_CLIENT_HELLO:
        raise SniffError(f"first TLS handshake message is type {stream[0]}, not a ClientHello")
    need = 4 + int.from_bytes(stream[1:4], "big")
    if need > HANDSHAKE_LIMIT:
        raise SniffError(f"ClientHello of {need} bytes is over the {HANDSHAKE_LIMIT}-byte limit")
    if len(stream) < need:
        return NeedMore(examined=len(stream), wanted=need)
    return _parse_hello_body(bytes(stream[:need]), length=need, records=0)


def _gather(view: memoryview, records: int, need: int) -> bytes:
    """The hello's handshake bytes, joined once the last of its records is complete."""
    parts: list[bytes] = []
    pos = 0
    for _ in range(records):
        end = pos + 5 + (view[pos + 3] << 8 | view[pos + 4])
        parts.append(bytes(view[pos + 5 : end]))
        pos = end
    return b"".join(parts)[:need]


def _parse_hello_body(message: bytes, *, length: int, records: int) -> ClientHello:
    hello = _Cursor(message, 4)
    legacy_version = hello.number(2, "legacy_version")
    if not 0x0301 <= legacy_version <= 0x0304:
        raise SniffError(f"ClientHello version 0x{legacy_version:04x} is not 0x0301-0x0304")
    hello.take(32, "random")
    if len(hello.vector(1, "session_id").rest()) > 32:
        raise SniffError("ClientHello session_id longer than 32 bytes")
    suites = hello.vector(2, "cipher_suites").rest()
    if not suites or len(suites) % 2:
        raise SniffError("ClientHello cipher_suites empty or of odd length")
    if not hello.vector(1, "compression_methods").rest():
        raise SniffError("ClientHello compression_methods empty")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    if not hello.done():  # TLS 1.0-1.2 hellos may end here, without extensions
        extensions = hello.vector(2, "extensions")
        if not hello.done():
            raise SniffError("ClientHello has bytes after its extensions")
        # The hot loop of a shared listener (every TLS connection walks it): plain offsets, and a
        # cursor only for the three extensions read.
        seen: set[int] = set()
        data, pos, end = message, extensions.pos, extensions.end
        while pos < end:
            if end - pos < 2:
                raise SniffError("ClientHello truncated in extension type")
            kind = data[pos] << 8 | data[pos + 1]
            if end - pos < 4:
                raise SniffError(f"ClientHello truncated in extension {kind} length")
            size = data[pos + 2] << 8 | data[pos + 3]
            pos += 4
            if end - pos < size:
                raise SniffError(f"ClientHello truncated in extension {kind}")
            if kind in seen:
                raise SniffError(f"ClientHello repeats extension {kind}")
            seen.add(kind)
            if kind == _EXT_SERVER_NAME:
                sni = _parse_server_name(_Cursor(data, pos, pos + size))
            elif kind == _EXT_ALPN:
                alpn = _parse_alpn(_Cursor(data, pos, pos + size))
            elif kind == _EXT_SUPPORTED_VERSIONS:
                versions = _parse_supported_versions(_Cursor(data, pos, pos + size))
            pos += size
    return ClientHello(length, sni, alpn, legacy_version, versions, records)


def _parse_server_name(body: _Cursor) -> str | None:
    names = body.vector(2, "server_name list")
    if not body.done() or names.done():
        raise SniffError("ClientHello server_name extension malformed")
    host: str | None = None
    while not names.done():
        kind = names.number(1, "server_name type")
        raw = names.vector(2, "server_name").rest()
        if kind != 0:  # only host_name (0) is defined; others are skipped as Go and OpenSSL do
            continue
        if host is not None:
            raise SniffError("ClientHello carries two host names")
        if not raw:
            raise SniffError("ClientHello server_name is empty")
        host = _host_name(raw, "ClientHello server_name")
    return host


def _parse_alpn(body: _Cursor) -> tuple[str, ...]:
    protocols = body.vector(2, "ALPN list")
    if not body.done() or protocols.done():
        raise SniffError("ClientHello ALPN extension malformed")
    offered: list[str] = []
    while not protocols.done():
        name = protocols.vector(1, "ALPN protocol").rest()
        if not name:
            raise SniffError("ClientHello offers an empty ALPN protocol")
        offered.append(name.decode("latin-1"))
    return tuple(offered)


def _parse_supported_versions(body: _Cursor) -> tuple[int, ...]:
    raw = body.vector(1, "supported_versions").rest()
    if not body.done() or not raw or len(raw) % 2:
        raise SniffError("ClientHello supported_versions extension malformed")
    return tuple(int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2))


# -- protocol detection ---------------------------------------------------------------------------


def _tls_prefix(data: bytes | bytearray) -> bool | None:
    """True: a ClientHello record starts here; False: it cannot; None: too few bytes to tell."""
    try:
        _check_record_header(data[:5])
    except SniffError:
        return False
    if len(data) < _TLS_DECIDED:
        return None
    return data[5] == _HANDSHAKE_CLIENT_HELLO


def _ssh_prefix(data: bytes | bytearray) -> bool | None:
    if data.startswith(_SSH_IDENTS):
        return True
    return None if any(ident.startswith(data) for ident in _SSH_IDENTS) else False


def _http_prefix(data: bytes | bytearray) -> bool | None:
    """A complete, valid HTTP/1.x request line starts `data` (True), cannot (False), or may (None).

    Only the method is checked early; the rest waits for the line end or `REQUEST_LINE_LIMIT`."""
    space = data.find(b" ", 0, 10)
    if space < 0:
        if len(data) >= 10:
            return False
        return None if any(method.startswith(data) for method in HTTP_METHODS) else False
    if bytes(data[:space]) not in HTTP_METHODS:
        return False
    line_end = data.find(b"\n", 0, REQUEST_LINE_LIMIT)
    if line_end < 0:
        if len(data) >= REQUEST_LINE_LIMIT or not _plausible_line_start(data[space + 1 :]):
            return False
        return None
    return _REQUEST_LINE.fullmatch(data, 0, line_end + 1) is not None


def _plausible_line_start(rest: bytes | bytearray) -> bool:
    """After ``METHOD SP`` and before the line end: visible target bytes, then SP and a prefix of
    ``HTTP/1.x``. Rules out binary protocols that happen to start with "GET " long before the bound."""
    return _LINE_PREFIX.fullmatch(rest) is not None


def classify(data: bytes | bytearray) -> Protocol | None:
    """The protocol `data` (a stream prefix) begins with; None while more bytes could change it."""
    if not data:
        return None
    tls, ssh, http = _tls_prefix(data), _ssh_prefix(data), _http_prefix(data)
    if tls:
        return "tls"
    if ssh:
        return "ssh"
    if http:
        return "http"
    return None if None in (tls, ssh, http) else "unknown"


# -- HTTP Host --------------------------------------------------------------------------------------


def normalize_http_host(value: str) -> str:
    """An HTTP authority without userinfo (``Host`` value), as a routing key: lowercase, no port, no
    trailing dot; an IPv6 literal stays in brackets in its compressed form (``[2001:db8::1]``)."""
    if value.startswith("["):
        literal, bracket, port = value[1:].partition("]")
        try:
            address = ipaddress.IPv6Address(literal if bracket else "-")
        except ValueError:
            raise SniffError("HTTP Host has a bad IPv6 literal") from None
        if address.scope_id is not None:
            raise SniffError("HTTP Host has a bad IPv6 literal")
        if port and not _is_port(port[1:], port[0]):
            raise SniffError("HTTP Host has a bad port")
        return f"[{address.compressed}]"
    host, colon, port = value.partition(":")
    if colon and not _is_port(port, colon):
        raise SniffError("HTTP Host has a bad port")
    return _host_name(host.encode("ascii", "replace"), "HTTP Host")


def _is_port(port: str, separator: str) -> bool:
    return separator == ":" and len(port) <= 5 and (not port or (port.isascii() and port.isdigit()))


def parse_http_host(head: bytes | bytearray) -> str | None:
    """The Host an HTTP/1 request head names (request line up to its blank line), normalized.

    An absolute-form target (``GET http://a.example/ HTTP/1.1``) wins over the Host header, as
    RFC 9112 §3.2.2 tells servers. None when neither names a host (HTTP/1.0 without Host, or an
    empty Host). Raises `SniffError` for two Host headers, a folded or malformed header line, or
    a bad host: the target would reject the request, and the proxy must not route it on a guess.
    """
    lines = bytes(head).split(b"\n")
    request = _REQUEST_LINE.fullmatch(lines[0] + b"\n")
    if request is None:
        raise SniffError("malformed HTTP request line")
    hosts: list[bytes] = []
    for raw in lines[1:]:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            raise SniffError("HTTP header uses obsolete line folding")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise SniffError("malformed HTTP header line")
        if name.lower() == b"host":
            hosts.append(value.strip(b" \t"))
    if len(hosts) > 1:
        raise SniffError("HTTP request has more than one Host header")
    target = request.group(2)
    authority = hosts[0] if hosts else b""
    for scheme in (b"http://", b"https://"):
        if target[: len(scheme)].lower() == scheme:
            authority = re.split(rb"[/?#]", target[len(scheme) :], maxsplit=1)[0].rpartition(b"@")[2]
    if not authority:
        return None
    if not authority.isascii():
        raise SniffError("HTTP Host is not ASCII")
    return normalize_http_host(authority.decode("ascii"))


def _head_end(data: bytes | bytearray, start: int) -> int:
    """Index just past the blank line ending the header block, searching from `start`; -1 if absent."""
    while (newline := data.find(b"\n", start)) >= 0:
        after = newline + 1
        if data.startswith(b"\n", after):
            return after + 1
        if data.startswith(b"\r\n", after):
            return after + 2
        start = after
    return -1


# -- the incremental object -----------------------------------------------------------------------


class Sniffer:
    """One connection's first bytes, fed as they arrive, until they say enough to pick a route.

    `want_hello`: parse the whole ClientHello (some route matches on SNI or ALPN); without it a TLS
    client is recognised from 6 bytes. `want_http_host`: read the HTTP header block for Host.
    Feed only bytes not fed before. Once an outcome is returned, every later call returns it again.
    """

    __slots__ = ("_buffer", "_outcome", "_protocol", "_scan", "_wanted", "want_hello", "want_http_host")

    def __init__(self, *, want_hello: bool, want_http_host: bool) -> None:
        self.want_hello = want_hello
        self.want_http_host = want_http_host
        self._buffer = bytearray()
        self._protocol: Protocol | None = None
        self._outcome: Sniffed | SniffError | None = None
        self._scan = 0
        self._wanted = 1

    @property
    def limit(self) -> int:
        """The most bytes this sniffer can need before it decides: the size of a peek buffer."""
        tls = HELLO_PREFIX_LIMIT if self.want_hello else _TLS_DECIDED
        http = HTTP_HEAD_LIMIT if self.want_http_host else REQUEST_LINE_LIMIT
        return max(tls, http)

    @property
    def seen(self) -> int:
        """Bytes fed so far (a peeking caller feeds ``peeked[seen:]``)."""
        return len(self._buffer)

    def peek_needed(self) -> int:
        """Total prefix length to wait for before feeding again can help (0 once decided)."""
        return 0 if self._outcome is not None else max(self._wanted, len(self._buffer) + 1)

    def feed(self, data: bytes | bytearray | memoryview) -> Sniffed | SniffError | None:
        """Add the next bytes of the stream. None: need more (see `peek_needed`)."""
        if self._outcome is not None:
            return self._outcome
        self._buffer += data[: self.limit - len(self._buffer)]  # more can never be needed
        return self._step(None)

    def end_of_stream(self) -> Sniffed | SniffError:
        """The client half-closed before the sniffer decided."""
        return self._final("connection ended")

    def expired(self) -> Sniffed | SniffError:
        """peek_timeout passed. Undecided bytes (none at all, a prefix of ``SSH-2.0-``, an unfinished
        request line) are ``unknown``: the fallback's. A started but unfinished ClientHello or
        HTTP header block is a trickling client, and an error."""
        return self._final("peek timed out")

    def _final(self, why: str) -> Sniffed | SniffError:
        if self._outcome is not None:
            return self._outcome
        outcome = self._step(why)
        assert outcome is not None
        return outcome

    def _done(self, outcome: Sniffed | SniffError) -> Sniffed | SniffError:
        self._outcome = outcome
        return outcome

    def _undecided_wanted(self) -> int:
        """A TLS prefix already says how long its first record is: wait for all of it at once."""
        if self.want_hello and self._buffer[:1] == b"\x16":
            try:
                hello = parse_client_hello(self._buffer)
            except SniffError:
                pass
            else:
                if isinstance(hello, NeedMore):
                    return hello.wanted
        return len(self._buffer) + 1

    def _step(self, final: str | None) -> Sniffed | SniffError | None:
        buffer = self._buffer
        if self._protocol is None:
            self._protocol = classify(buffer)
            if self._protocol is None:
                self._wanted = self._undecided_wanted()
                return self._done(Sniffed("unknown")) if final else None
        protocol = self._protocol
        if protocol == "tls" and self.want_hello:
            try:
                hello = parse_client_hello(buffer)
            except SniffError as exc:
                return self._done(exc)
            if isinstance(hello, NeedMore):
                self._wanted = hello.wanted
                if final:
                    return self._done(SniffError(f"{final} inside the TLS ClientHello ({len(buffer)} bytes)"))
                return None
            return self._done(Sniffed("tls", hello.sni, hello.alpn))
        if protocol == "http" and self.want_http_host:
            end = _head_end(buffer, max(0, self._scan - 2))
            if end < 0:
                self._scan = len(buffer)
                self._wanted = len(buffer) + 1
                if final:
                    return self._done(SniffError(f"{final} inside the HTTP header ({len(buffer)} bytes)"))
                if len(buffer) >= HTTP_HEAD_LIMIT:  # the blank line can no longer end in bounds
                    return self._done(SniffError(f"HTTP header longer than {HTTP_HEAD_LIMIT} bytes"))
                return None
            if end > HTTP_HEAD_LIMIT:
                return self._done(SniffError(f"HTTP header longer than {HTTP_HEAD_LIMIT} bytes"))
            try:
                return self._done(Sniffed("http", http_host=parse_http_host(buffer[:end])))
            except SniffError as exc:
                return self._done(exc)
        return self._done(Sniffed(protocol))
