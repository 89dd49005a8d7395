"""sniff.py: ClientHello parsing, protocol detection and the Sniffer, on real and hostile bytes."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from portway.sniff import (
    HANDSHAKE_LIMIT,
    HELLO_PREFIX_LIMIT,
    HTTP_HEAD_LIMIT,
    MAX_HELLO_RECORDS,
    REQUEST_LINE_LIMIT,
    ClientHello,
    NeedMore,
    Sniffed,
    Sniffer,
    SniffError,
    classify,
    parse_client_hello,
    parse_http_host,
)
from tests.hellos import (
    GREASE,
    alpn_extension,
    extension,
    handshake,
    real_hello,
    records,
    sni_extension,
    unframe,
    versions_extension,
)

REAL = real_hello("db.example.com", ("postgresql", "h2"))


def parsed(data: bytes) -> ClientHello:
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello), result
    return result


def error(data: bytes) -> str:
    with pytest.raises(SniffError) as caught:
        parse_client_hello(data)
    return caught.value.reason


def sniff_in_pieces(
    data: bytes, cuts: list[int], *, hello: bool = True, host: bool = False
) -> Sniffed | SniffError | None:
    sniffer = Sniffer(want_hello=hello, want_http_host=host)
    start = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        if cut <= start:
            continue
        outcome = sniffer.feed(data[start:cut])
        start = cut
        if outcome is not None:
            return outcome
    return None


# -- real ClientHellos ------------------------------------------------------------------------------


def test_real_hello_from_python_ssl() -> None:
    hello = parsed(REAL)
    assert hello.sni == "db.example.com"
    assert hello.alpn == ("postgresql", "h2")
    assert hello.length == len(REAL) and hello.records == 1
    assert hello.legacy_version == 0x0303 and 0x0304 in hello.supported_versions


def test_real_hello_without_sni_or_alpn() -> None:
    hello = parsed(real_hello(None))
    assert hello.sni is None and hello.alpn == ()


def test_real_tls13_only_hello_and_mixed_case_name() -> None:
    hello = parsed(real_hello("Mixed.Case.Example", ("h2",), tls13_only=True))
    assert hello.sni == "mixed.case.example"
    assert hello.supported_versions == (0x0304,)


def test_every_prefix_of_a_real_hello_needs_more() -> None:
    for cut in range(len(REAL)):
        result = parse_client_hello(REAL[:cut])
        assert isinstance(result, NeedMore), cut
        assert result.examined <= cut < result.wanted <= len(REAL)


def test_sniffer_fed_one_byte_at_a_time_decides_on_the_last_byte() -> None:
    sniffer = Sniffer(want_hello=True, want_http_host=False)
    for i in range(len(REAL) - 1):
        assert sniffer.feed(REAL[i : i + 1]) is None
        assert i + 1 < sniffer.peek_needed() <= len(REAL)
    assert sniffer.feed(REAL[-1:]) == Sniffed("tls", "db.example.com", ("postgresql", "h2"))
    assert sniffer.peek_needed() == 0 and sniffer.seen == len(REAL)


@given(st.lists(st.integers(min_value=0), max_size=12))
def test_real_hello_split_anywhere(cuts: list[int]) -> None:
    assert sniff_in_pieces(REAL, cuts) == Sniffed("tls", "db.example.com", ("postgresql", "h2"))


def test_hello_reframed_into_two_records_at_every_point() -> None:
    message = unframe(REAL)
    for cut in range(1, len(message)):
        stream = records(message, [cut])
        hello = parsed(stream)
        assert (hello.sni, hello.records, hello.length) == ("db.example.com", 2, len(stream))
        assert isinstance(parse_client_hello(stream[:-1]), NeedMore)


@given(
    st.lists(st.integers(min_value=1, max_value=600), max_size=MAX_HELLO_RECORDS - 1), st.binary(max_size=64)
)
def test_hello_in_many_records_with_data_after_it(cuts: list[int], after: bytes) -> None:
    stream = records(unframe(REAL), cuts)
    hello = parsed(stream + after)
    assert hello.sni == "db.example.com" and hello.length == len(stream)


def test_openssl_s_client_hello() -> None:
    """A second, independent TLS stack: what `openssl s_client -servername -alpn` sends."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl binary not installed")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        client = subprocess.Popen(
            [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "Mail.Example.org",
             "-alpn", "imap,smtp"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            server.settimeout(10)
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                sniffer = Sniffer(want_hello=True, want_http_host=False)
                outcome = None
                while outcome is None:
                    chunk = conn.recv(4096)
                    outcome = sniffer.feed(chunk) if chunk else sniffer.end_of_stream()
        finally:
            client.kill()
            client.wait()
    assert outcome == Sniffed("tls", "mail.example.org", ("imap", "smtp"))


# -- hand-built hellos: GREASE, many extensions, old versions -----------------------------------------


def test_grease_and_hundreds_of_unknown_extensions() -> None:
    extensions = [extension(g, b"") for g in GREASE]
    extensions += [extension(1000 + i, bytes(i % 7)) for i in range(300)]
    extensions += [sni_extension(b"a.example"), alpn_extension(bytes([0x0A, 0x0A]), b"h2")]
    extensions += [versions_extension(GREASE[3], 0x0304, 0x0303)]
    hello = parsed(records(handshake(extensions), [1000, 4000]))
    assert hello.sni == "a.example"
    assert hello.alpn == ("\x0a\x0a", "h2")
    assert hello.supported_versions == (GREASE[3], 0x0304, 0x0303)


def test_tls10_hello_without_extensions() -> None:
    hello = parsed(records(handshake(None, version=0x0301)))
    assert (hello.sni, hello.alpn, hello.legacy_version, hello.supported_versions) == (None, (), 0x0301, ())


def test_unknown_name_types_are_skipped_and_trailing_dot_dropped() -> None:
    body = b"\x07" + (3).to_bytes(2, "big") + b"x y" + b"\x00" + (10).to_bytes(2, "big") + b"Host.Test."
    ext = extension(0, len(body).to_bytes(2, "big") + body)
    assert parsed(records(handshake([ext]))).sni == "host.test"


def test_largest_allowed_hello() -> None:
    filler = extension(5000, bytes(HANDSHAKE_LIMIT - len(handshake([sni_extension(b"big.test")])) - 4))
    message = handshake([filler, sni_extension(b"big.test")])
    assert len(message) == HANDSHAKE_LIMIT
    stream = records(message, [10000])
    assert parsed(stream).sni == "big.test"
    sniffer = Sniffer(want_hello=True, want_http_host=False)
    assert len(stream) <= HELLO_PREFIX_LIMIT <= sniffer.limit


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (b"\x17\x03\x03\x00\x10", "type 23 is not a handshake"),
        (b"\x16\x02\x00", "version 0x02.."),
        (b"\x16\x03\x05", "version 0x0305"),
        (b"\x16\x03\x01\x00\x00", "empty TLS handshake record"),
        (b"\x16\x03\x01\x40\x01", "over 16384"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "type 2, not a ClientHello"),
        (b"\x16\x03\x01\x00\x04\x01\x00\x40\x01", "over the 16384-byte limit"),
        (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "over the 16384-byte limit"),
    ],
)
def test_bad_records_fail_on_their_first_bytes(stream: bytes, reason: str) -> None:
    assert reason in error(stream)


def test_oversized_hello_is_refused_before_its_bytes_arrive() -> None:
    """A 24-bit length lets a client announce 16 MiB; the limit is checked from the 4-byte header,
    so a proxy never buffers (or waits for) a hello it would refuse."""
    header = b"\x01" + (HANDSHAKE_LIMIT - 3).to_bytes(3, "big")
    assert "over the 16384-byte limit" in error(records(header + bytes(100)))


@pytest.mark.parametrize("want_http_host", [False, True])
def test_a_full_peek_buffer_always_decides(want_http_host: bool) -> None:
    """The I/O edge never reads more than `limit`: by then every worst case has an outcome."""
    worst = [
        records(handshake([extension(9, bytes(HANDSHAKE_LIMIT))])[:HANDSHAKE_LIMIT], list(range(1, 64))),
        records(
            b"\x01" + (HANDSHAKE_LIMIT - 4).to_bytes(3, "big") + bytes(HANDSHAKE_LIMIT), list(range(1, 70))
        ),
        b"GET /" + b"a" * HELLO_PREFIX_LIMIT,
        b"GET / HTTP/1.1\r\nX: " + b"a" * HELLO_PREFIX_LIMIT,
        b"SSH-2.0-" + b"a" * HELLO_PREFIX_LIMIT,
    ]
    for stream in worst:
        sniffer = Sniffer(want_hello=True, want_http_host=want_http_host)
        assert sniffer.feed(stream[: sniffer.limit]) is not None
        huge = Sniffer(want_hello=True, want_http_host=want_http_host)
        assert huge.feed(stream + bytes(1 << 20)) is not None and huge.seen <= huge.limit
        one_by_one = Sniffer(want_hello=True, want_http_host=want_http_host)
        outcomes = [one_by_one.feed(stream[i : i + 1]) for i in range(one_by_one.limit)]
        assert outcomes[-1] is not None


def test_too_many_records() -> None:
    message = handshake([sni_extension(b"x.test")])
    stream = records(message, list(range(1, MAX_HELLO_RECORDS + 1)))
    assert "more than 64 records" in error(stream)
    assert parsed(records(message, list(range(1, MAX_HELLO_RECORDS)))).records == MAX_HELLO_RECORDS


@pytest.mark.parametrize(
    ("extensions", "reason"),
    [
        ([sni_extension(b"a.test"), sni_extension(b"b.test")], "repeats extension 0"),
        ([sni_extension(b"a.test", b"b.test")], "two host names"),
        ([sni_extension(b"")], "server_name is empty"),
        ([sni_extension(b"bad host")], "not a valid DNS name"),
        ([sni_extension(b"nul\x00.test")], "not a valid DNS name"),
        ([sni_extension(b"caf\xc3\xa9.test")], "not a valid DNS name"),
        ([sni_extension(b"a" * 64 + b".test")], "not a valid DNS name"),
        ([sni_extension(b".".join([b"a" * 60] * 5))], "not a valid DNS name"),
        ([sni_extension(b"a..test")], "not a valid DNS name"),
        ([extension(0, b"")], "truncated in server_name list length"),
        ([extension(0, b"\x00\x00")], "server_name extension malformed"),
        ([alpn_extension(b"h2", b"")], "empty ALPN protocol"),
        ([alpn_extension(b"h2"), alpn_extension(b"h3")], "repeats extension 16"),
        ([extension(16, b"\x00\x05\x02h2")], "truncated in ALPN list"),
        ([extension(43, b"\x03\x03\x04\x03")], "supported_versions extension malformed"),
        ([extension(7, b"abc")[:-1]], "truncated in extension 7"),
    ],
)
def test_malformed_extensions(extensions: list[bytes], reason: str) -> None:
    assert reason in error(records(handshake(extensions)))


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (handshake([], version=0x0300), "version 0x0300"),
        (handshake([], session_id=bytes(33)), "session_id longer than 32"),
        (handshake([], suites=b""), "cipher_suites empty"),
        (handshake([], suites=b"\x13"), "cipher_suites empty or of odd length"),
        (handshake(None)[:-2] + b"\x00", "compression_methods empty"),
        (handshake([]) + b"x", "bytes after its extensions"),
        (b"\x01\x00\x00\x05\x03\x03" + bytes(3), "truncated in random"),
    ],
)
def test_malformed_hello_bodies(message: bytes, reason: str) -> None:
    """(The handshake length is recomputed so each body is wrong in exactly one way.)"""
    message = b"\x01" + (len(message) - 4).to_bytes(3, "big") + message[4:]
    assert reason in error(records(message))


# -- fuzzing: only SniffError, never a count past the input, decisions final ----------------------


def check_contract(data: bytes) -> ClientHello | NeedMore | SniffError:
    try:
        result = parse_client_hello(data)
    except SniffError as exc:
        assert exc.reason  # noqa: PT017 - the reason is part of the contract
        return exc
    if isinstance(result, NeedMore):
        assert result.examined <= len(data) < result.wanted
    else:
        assert result.length <= len(data)
    return result


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
@example(b"\x16\x03\x01\x00\x01\x01")
def test_fuzz_random_bytes(data: bytes) -> None:
    check_contract(data)
    check_contract(b"\x16\x03\x01" + data)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_real_hellos(data: st.DataObject) -> None:
    stream = bytearray(records(unframe(REAL), data.draw(st.lists(st.integers(1, 600), max_size=4))))
    for _ in range(data.draw(st.integers(1, 4))):
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(stream)))
    whole = check_contract(bytes(stream))
    prefix = check_contract(bytes(stream[:cut]))
    # Decisions are final: what a prefix decided, the whole stream decides the same way.
    if isinstance(prefix, SniffError):
        assert isinstance(whole, SniffError) and whole.reason == prefix.reason
    elif isinstance(prefix, ClientHello):
        assert whole == prefix


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=6), st.booleans(), st.booleans())
def test_fuzz_sniffer_any_split_same_outcome(data: bytes, cuts: list[int], hello: bool, host: bool) -> None:
    whole = Sniffer(want_hello=hello, want_http_host=host)
    expected = whole.feed(data)
    pieces = sniff_in_pieces(data, cuts, hello=hello, host=host)
    if expected is None:
        assert pieces is None
        assert isinstance(whole.expired(), Sniffed | SniffError)
    elif isinstance(expected, SniffError):
        assert isinstance(pieces, SniffError) and pieces.reason == expected.reason
    else:
        assert pieces == expected


# -- protocol detection -------------------------------------------------------------------------------


@pytest.mark.parametrize("ident", [b"SSH-2.0-OpenSSH_9.6\r\n", b"SSH-1.99-Legacy\r\n"])
def test_ssh_identification_byte_by_byte(ident: bytes) -> None:
    sniffer = Sniffer(want_hello=True, want_http_host=True)
    decided_at = ident.index(b"-", 4) + 1
    for i in range(len(ident)):
        outcome = sniffer.feed(ident[i : i + 1])
        if i + 1 < decided_at:
            assert outcome is None and classify(ident[: i + 1]) is None
        else:
            assert outcome == Sniffed("ssh")
            return


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (b"SSH-2.0", None),
        (b"SSH-3.0-", "unknown"),
        (b"SSH-1.5-", "unknown"),
        (b"\x16", None),
        (b"\x16\x03\x03\x00\x05", None),
        (b"\x16\x03\x03\x00\x05\x01", "tls"),
        (b"\x16\x03\x03\x00\x05\x02", "unknown"),
        (b"\x16\x03\x00", "unknown"),
        (b"\x80\x2e\x01\x03\x01", "unknown"),  # SSLv2-format hello
        (b"G", None),
        (b"GET", None),
        (b"GET / HTTP/1.1", None),
        (b"GET / HTTP/1.1\r\n", "http"),
        (b"GET / HTTP/1.0\n", "http"),
        (b"OPTIONS * HTTP/1.1\r\n", "http"),
        (b"CONNECT db.example:5432 HTTP/1.1\r\n", "http"),
        (b"GET / HTTP/2.0\r\n", "unknown"),
        (b"PRI * HTTP/2.0\r\n", "unknown"),
        (b"GET /\x00", "unknown"),
        (b"GET / FTP", "unknown"),
        (b"GET  / HTTP/1.1\r\n", "unknown"),
        (b"get / HTTP/1.1\r\n", "unknown"),
        (b"FETCH / HTTP/1.1\r\n", "unknown"),
        (b"\r\n", "unknown"),
        (b"EHLO x\r\n", "unknown"),
        (b"", None),
    ],
)
def test_classify(prefix: bytes, expected: str | None) -> None:
    assert classify(prefix) == expected


def test_http_request_line_past_the_bound_is_unknown() -> None:
    line = b"GET /" + b"a" * REQUEST_LINE_LIMIT
    assert classify(line[: REQUEST_LINE_LIMIT - 1]) is None
    assert classify(line) == "unknown"


def test_expired_and_end_of_stream_before_a_decision_are_unknown() -> None:
    for prefix in (b"", b"SSH-2", b"GET / HTT", b"\x16\x03"):
        sniffer = Sniffer(want_hello=True, want_http_host=True)
        assert sniffer.feed(prefix) is None
        assert sniffer.expired() == Sniffed("unknown")
        assert sniffer.feed(b"SSH-2.0-late") == Sniffed("unknown")  # the outcome sticks
        other = Sniffer(want_hello=False, want_http_host=False)
        other.feed(prefix)
        assert other.end_of_stream() == Sniffed("unknown")


def test_trickled_hello_is_an_error_when_the_peek_expires() -> None:
    sniffer = Sniffer(want_hello=True, want_http_host=False)
    assert sniffer.feed(REAL[:100]) is None
    outcome = sniffer.expired()
    assert (
        isinstance(outcome, SniffError)
        and outcome.reason == "peek timed out inside the TLS ClientHello (100 bytes)"
    )
    ended = Sniffer(want_hello=True, want_http_host=False)
    ended.feed(REAL[:7])
    assert isinstance(ended.end_of_stream(), SniffError)


def test_without_want_hello_tls_is_known_from_six_bytes() -> None:
    sniffer = Sniffer(want_hello=False, want_http_host=False)
    assert sniffer.feed(REAL[:5]) is None
    assert sniffer.feed(REAL[5:6]) == Sniffed("tls")
    assert sniffer.limit < 100 * 1024


def test_malformed_hello_is_an_error_not_unknown() -> None:
    stream = bytearray(REAL)
    stream[9:11] = b"\x02\x00"  # legacy_version 0x0200
    outcome = Sniffer(want_hello=True, want_http_host=False).feed(bytes(stream))
    assert isinstance(outcome, SniffError)
    assert outcome.reason == "ClientHello version 0x0200 is not 0x0301-0x0304"


def test_peek_needed_follows_the_record_length() -> None:
    sniffer = Sniffer(want_hello=True, want_http_host=False)
    assert sniffer.peek_needed() == 1
    sniffer.feed(REAL[:5])
    assert sniffer.peek_needed() == len(REAL)


# -- HTTP Host ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "host"),
    [
        (b"GET / HTTP/1.1\r\nHost: Status.Example.com\r\n\r\n", "status.example.com"),
        (b"GET / HTTP/1.1\r\nhost:status.example.com:8080\r\n\r\n", "status.example.com"),
        (b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHOST: \t a.test. \r\nAccept: */*\r\n\r\n", "a.test"),
        (b"GET / HTTP/1.1\nHost: a.test\n\n", "a.test"),
        (b"GET / HTTP/1.1\r\nHost: [2001:DB8:0::1]:443\r\n\r\n", "[2001:db8::1]"),
        (b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", "[::1]"),
        (b"GET / HTTP/1.1\r\nHost: 192.0.2.1:80\r\n\r\n", "192.0.2.1"),
        (b"GET / HTTP/1.0\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", None),
        (b"GET http://Proxy.Test:81/x HTTP/1.1\r\nHost: other.test\r\n\r\n", "proxy.test"),
        (b"GET https://u:p@abs.test?q HTTP/1.1\r\n\r\n", "abs.test"),
    ],
)
def test_http_host(head: bytes, host: str | None) -> None:
    assert parse_http_host(head) == host
    assert sniff_in_pieces(head + b"body", [], hello=False, host=True) == Sniffed("http", http_host=host)


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", "more than one Host"),
        (b"GET / HTTP/1.1\r\nX: 1\r\n  folded\r\nHost: a.test\r\n\r\n", "obsolete line folding"),
        (b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n", "malformed HTTP header line"),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", "malformed HTTP header line"),
        (b"GET / HTTP/1.1\r\nHost: a.test:http\r\n\r\n", "bad port"),
        (b"GET / HTTP/1.1\r\nHost: a.test:123456\r\n\r\n", "bad port"),
        (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", "bad IPv6"),
        (b"GET / HTTP/1.1\r\nHost: [zz::1]\r\n\r\n", "bad IPv6"),
        (b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", "bad port"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "not a valid DNS name"),
        (b"GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n", "not a valid DNS name"),
        (b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9.test\r\n\r\n", "not ASCII"),
    ],
)
def test_bad_http_host(head: bytes, reason: str) -> None:
    with pytest.raises(SniffError, match=reason):
        parse_http_host(head)
    outcome = Sniffer(want_hello=False, want_http_host=True).feed(head)
    assert isinstance(outcome, SniffError) and reason in outcome.reason


@given(st.lists(st.integers(min_value=0), max_size=10))
def test_http_host_split_anywhere(cuts: list[int]) -> None:
    head = b"POST /submit HTTP/1.1\r\nContent-Length: 3\r\nHost: Split.Test:80\r\n\r\nabc"
    assert sniff_in_pieces(head, cuts, hello=False, host=True) == Sniffed("http", http_host="split.test")


def test_http_host_byte_by_byte_ends_at_the_blank_line() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    sniffer = Sniffer(want_hello=True, want_http_host=True)
    for i in range(len(head) - 1):
        assert sniffer.feed(head[i : i + 1]) is None
    assert sniffer.feed(head[-1:]) == Sniffed("http", http_host="a.test")


def test_http_header_block_bound_and_trickle() -> None:
    big = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"p" * HTTP_HEAD_LIMIT + b"\r\n"
    outcome = Sniffer(want_hello=False, want_http_host=True).feed(big)
    assert isinstance(outcome, SniffError) and "longer than" in outcome.reason
    slow = Sniffer(want_hello=False, want_http_host=True)
    assert slow.feed(b"GET / HTTP/1.1\r\nHost: a") is None
    expired = slow.expired()
    assert isinstance(expired, SniffError) and "inside the HTTP header" in expired.reason
    # Without a Host route the request line is enough.
    assert Sniffer(want_hello=True, want_http_host=False).feed(b"GET / HTTP/1.1\r\n") == Sniffed("http")
