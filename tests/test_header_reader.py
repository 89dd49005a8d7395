"""HeaderReader: the PROXY header phase both TCP engines share, tested without sockets."""

from __future__ import annotations

import ipaddress
from typing import Literal

from hypothesis import given
from hypothesis import strategies as st

from portway.proxy_header import HEADER_LIMIT, HeaderDone, HeaderReader, HeaderRefused, ProxyProtocolPolicy
from portway.proxy_protocol import build_v1, build_v2


def reader(mode: Literal["required", "mixed"] = "required") -> HeaderReader:
    return HeaderReader(ProxyProtocolPolicy(mode, (ipaddress.ip_network("127.0.0.1/32"),), 5.0))


def feed_in_pieces(r: HeaderReader, data: bytes, cuts: list[int]) -> HeaderDone | HeaderRefused | None:
    outcome = None
    start = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        if cut <= start:
            continue
        outcome = r.feed(data[start:cut])
        start = cut
        if outcome is not None:
            return outcome
    return outcome


@given(st.booleans(), st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=5))
def test_header_then_data_in_any_pieces(v2: bool, rest: bytes, cuts: list[int]) -> None:
    src, dst = ("192.0.2.7", 40000), ("198.51.100.1", 443)
    header = build_v2(src, dst) if v2 else build_v1(src, dst)
    outcome = feed_in_pieces(reader(), header + rest, cuts)
    if outcome is None:  # the last piece ended exactly at the header; nothing after it yet
        return
    assert isinstance(outcome, HeaderDone)
    assert outcome.header is not None and outcome.header.source == src
    assert header + outcome.rest == (header + rest)[: len(header) + len(outcome.rest)]
    assert rest.startswith(outcome.rest)  # never more than was sent, never reordered


def test_garbage_is_refused_with_a_reason() -> None:
    outcome = reader().feed(b"GET / HTTP/1.1\r\n\r\n")
    assert isinstance(outcome, HeaderRefused) and outcome.reason


def test_mixed_mode_client_without_header_is_plain_data() -> None:
    outcome = reader("mixed").feed(b"SSH-2.0-OpenSSH\r\n")
    assert outcome == HeaderDone(None, b"SSH-2.0-OpenSSH\r\n")


def test_short_prefix_waits_then_ends_as_data_in_mixed_mode_only() -> None:
    mixed, required = reader("mixed"), reader("required")
    assert mixed.feed(b"PRO") is None and required.feed(b"PRO") is None
    assert mixed.end_of_stream() == HeaderDone(None, b"PRO")
    assert isinstance(required.end_of_stream(), HeaderRefused)
    assert isinstance(reader("mixed").expired(), HeaderRefused)  # nothing at all is never data


def test_timeout_names_what_arrived() -> None:
    r = reader()
    r.feed(b"PROXY TCP4 1.2.3.4")
    outcome = r.expired()
    assert isinstance(outcome, HeaderRefused)
    assert "within 5s (18 bytes received)" in outcome.reason


def test_reading_is_bounded() -> None:
    r = reader()
    assert r.room() == HEADER_LIMIT + 1
    r.feed(b"\r\n\r\n\x00\r\nQUIT\n")
    assert r.room() == HEADER_LIMIT + 1 - 12
