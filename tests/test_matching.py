"""matching.py: precedence, wildcards, conflicts and the table's peek flags, against a reference."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway.errors import ConfigError
from portway.matching import Match, MatchTable, check_conflicts, check_routes
from portway.sniff import Sniffed, Sniffer
from tests.hellos import real_hello


def tls(sni: str | None, *alpn: str) -> Sniffed:
    return Sniffed("tls", sni, tuple(alpn))


# Every rank of the precedence table, each one route; `everything` matches all of them.
RANKS: dict[str, Match | None] = {
    "exact-alpn": Match(sni=("db.example.com",), alpn=("postgresql",)),
    "exact": Match(sni=("DB.example.com",)),
    "wild-alpn": Match(sni=("*.example.com",), alpn=("postgresql",)),
    "wild": Match(sni=("*.example.com",)),
    "alpn": Match(alpn=("postgresql",)),
    "protocol": Match(protocol="tls"),
    "fallback": None,
}


def test_precedence_table_rank_by_rank() -> None:
    """Remove the winner each time: the next rank of the documented table must win."""
    routes = dict(RANKS)
    client = tls("db.example.com", "h2", "postgresql")
    for expected in RANKS:
        assert MatchTable(routes).choose(client) == expected
        del routes[expected]
    assert MatchTable(routes).choose(client) is None


def test_http_host_before_protocol_before_fallback() -> None:
    routes: dict[str, Match | None] = {
        "host": Match(http_host=("status.example.com",)),
        "http": Match(protocol="http"),
        "fallback": None,
    }
    request = Sniffed("http", http_host="status.example.com")
    for expected in ("host", "http", "fallback"):
        assert MatchTable(routes).choose(request) == expected
        del routes[expected]


def test_exact_name_beats_wildcard_even_with_alpn() -> None:
    table = MatchTable(
        {"wild-h2": Match(sni=("*.example.com",), alpn=("h2",)), "exact": Match(sni=("a.example.com",))}
    )
    assert table.choose(tls("a.example.com", "h2")) == "exact"
    assert table.choose(tls("b.example.com", "h2")) == "wild-h2"
    assert table.choose(tls("b.example.com", "http/1.1")) is None


@pytest.mark.parametrize(
    ("name", "matches"),
    [
        ("x.b.example.com", True),
        ("b.example.com", False),
        ("y.x.b.example.com", False),
        ("xb.example.com", False),
        ("x.b.example.com.evil", False),
        ("com", False),
    ],
)
def test_wildcard_is_one_whole_label(name: str, matches: bool) -> None:
    table = MatchTable({"w": Match(sni=("*.B.Example.Com",))})
    assert table.choose(tls(name)) == ("w" if matches else None)


def test_client_alpn_preference_decides_between_disjoint_lists() -> None:
    table = MatchTable(
        {
            "h1": Match(sni=("a.test",), alpn=("http/1.1",)),
            "h2": Match(sni=("a.test",), alpn=("h2",)),
            "any": Match(sni=("a.test",)),
        }
    )
    assert table.choose(tls("a.test", "h2", "http/1.1")) == "h2"
    assert table.choose(tls("a.test", "http/1.1", "h2")) == "h1"
    assert table.choose(tls("a.test", "imap")) == "any"
    assert table.choose(tls("a.test")) == "any"


def test_all_given_conditions_must_hold() -> None:
    table = MatchTable({"pg": Match(sni=("db.test",), alpn=("postgresql",)), "fallback": None})
    assert table.choose(tls("db.test", "postgresql")) == "pg"
    assert table.choose(tls("db.test")) == "fallback"
    assert table.choose(tls("other.test", "postgresql")) == "fallback"


def test_ssh_and_tls_and_http_on_one_port() -> None:
    table = MatchTable(
        {
            "ssh": Match(protocol="ssh"),
            "web": Match(sni=("www.test",)),
            "plain": Match(protocol="http"),
            "rest": None,
        }
    )
    assert table.choose(Sniffed("ssh")) == "ssh"
    assert table.choose(tls("www.test")) == "web"
    assert table.choose(tls(None)) == "rest"
    assert table.choose(Sniffed("http")) == "plain"
    assert table.choose(Sniffed("unknown")) == "rest"
    assert table.choose(None) == "rest"


def test_no_sni_without_fallback_is_no_route() -> None:
    table = MatchTable({"a": Match(sni=("a.test",))})
    assert table.choose(tls(None)) is None
    assert table.choose(Sniffed("unknown")) is None


def test_ipv6_http_host_in_any_spelling() -> None:
    table = MatchTable({"v6": Match(http_host=("2001:DB8:0::1",)), "br": Match(http_host=("[::1]",))})
    assert table.choose(Sniffed("http", http_host="[2001:db8::1]")) == "v6"
    assert table.choose(Sniffed("http", http_host="[::1]")) == "br"


def test_peek_flags() -> None:
    only_fallback = MatchTable({"web": None})
    assert not only_fallback.needs_peek and only_fallback.fallback == "web"
    assert only_fallback.choose(None) == "web"
    ssh = MatchTable({"ssh": Match(protocol="ssh"), "web": None})
    assert ssh.needs_peek and not ssh.wants_hello and not ssh.wants_http_host
    sni = MatchTable({"a": Match(sni=("a.test",)), "h": Match(http_host=("h.test",))})
    assert sni.needs_peek and sni.wants_hello and sni.wants_http_host
    sniffer = sni.sniffer()
    assert sniffer.want_hello and sniffer.want_http_host
    assert MatchTable({"x": Match(alpn=("h2",))}).wants_hello
    assert MatchTable({}).choose(tls("a.test")) is None


def test_real_hello_end_to_end() -> None:
    table = MatchTable({"pg": Match(sni=("*.example.com",), alpn=("postgresql",)), "web": None})
    sniffer = table.sniffer()
    outcome = sniffer.feed(real_hello("DB.example.com", ("postgresql",)))
    assert isinstance(outcome, Sniffed) and table.choose(outcome) == "pg"
    other = Sniffer(want_hello=True, want_http_host=False).feed(real_hello("db.example.com", ("h2",)))
    assert isinstance(other, Sniffed) and table.choose(other) == "web"


# -- conflicts and config errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "field"),
    [
        (None, None, "match"),
        (None, Match(), "match"),
        (Match(sni=("a.test",)), Match(sni=("A.TEST.",)), "match.sni"),
        (Match(sni=("a.test", "b.test")), Match(sni=("b.test",)), "match.sni"),
        (Match(sni=("*.a.test",)), Match(sni=("*.A.test",)), "match.sni"),
        (Match(sni=("a.test",), alpn=("h2",)), Match(sni=("a.test",), alpn=("h2",)), "match.alpn"),
        (Match(sni=("a.test",), alpn=("h2", "http/1.1")), Match(sni=("a.test",), alpn=("h2",)), "match.alpn"),
        (Match(sni=("a.test",), protocol="tls"), Match(sni=("a.test",)), "match.sni"),
        (Match(alpn=("h2",)), Match(alpn=("h2",)), "match.alpn"),
        (Match(protocol="ssh"), Match(protocol="ssh"), "match.protocol"),
        (Match(http_host=("h.test",)), Match(http_host=("H.test",), protocol="http"), "match.http_host"),
    ],
)
def test_conflicts(a: Match | None, b: Match | None, field: str) -> None:
    routes = {"first": a, "second": b}
    assert check_conflicts(routes) == [("first", "second", field)]
    with pytest.raises(ConfigError) as caught:
        MatchTable(routes)
    assert "'first'" in str(caught.value) and "'second'" in str(caught.value) and field in str(caught.value)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (Match(sni=("a.test",)), Match(sni=("a.test",), alpn=("h2",))),
        (Match(sni=("a.test",), alpn=("h2",)), Match(sni=("a.test",), alpn=("http/1.1",))),
        (Match(sni=("a.test",)), Match(sni=("*.test",))),
        (Match(sni=("a.test",)), Match(alpn=("h2",))),
        (Match(protocol="tls"), Match(protocol="ssh")),
        (Match(protocol="http"), Match(http_host=("a.test",))),
        (Match(sni=("a.test",)), None),
    ],
)
def test_allowed_neighbours(a: Match, b: Match | None) -> None:
    assert check_conflicts({"first": a, "second": b}) == []
    MatchTable({"first": a, "second": b})


@pytest.mark.parametrize(
    ("match", "field", "words"),
    [
        (Match(sni=("a b.test",)), "match.sni", "not a host name"),
        (Match(sni=("a.*.test",)), "match.sni", "one-label wildcard"),
        (Match(sni=("*",)), "match.sni", "one-label wildcard"),
        (Match(sni=("**.test",)), "match.sni", "one-label wildcard"),
        (Match(sni=("café.test",)), "match.sni", "xn--"),
        (Match(alpn=("",)), "match.alpn", "1-255 bytes"),
        (Match(alpn=("x" * 256,)), "match.alpn", "1-255 bytes"),
        (Match(http_host=("a.test:80",)), "match.http_host", "without a port"),
        (Match(http_host=("[::1]:80",)), "match.http_host", "without a port"),
        (Match(sni=("a.test",), http_host=("a.test",)), "match.http_host", "can never both hold"),
        (Match(sni=("a.test",), protocol="ssh"), "match.protocol", "can never match"),
        (Match(alpn=("h2",), protocol="http"), "match.protocol", "can never match"),
        (Match(http_host=("a.test",), protocol="tls"), "match.protocol", "can never match"),
        (Match(protocol="smtp"), "match.protocol", "not one of"),  # type: ignore[arg-type]
    ],
)
def test_bad_matches_name_route_and_field(match: Match, field: str, words: str) -> None:
    problems = check_routes({"r1": match})
    assert len(problems) == 1
    assert problems[0].route == "r1" and problems[0].field == field and words in problems[0].message
    with pytest.raises(ConfigError, match=words):
        MatchTable({"r1": match})


# -- against a brute-force reference ---------------------------------------------------------------------

NAMES = ["a.x.test", "b.x.test", "x.test", "a.y.x.test"]
PATTERNS = [*NAMES, "*.x.test", "*.y.x.test", "*.test"]
ALPNS = ["h2", "http/1.1", "pg"]


def reference(routes: Mapping[str, Match | None], sniffed: Sniffed) -> str | None:
    """The documented precedence, by scanning every route: what MatchTable must agree with."""

    def sni_rank(pattern: str, name: str) -> int | None:
        pattern = pattern.lower()
        if pattern == name:
            return 0
        if pattern.startswith("*.") and name.count(".") == pattern.count(".") and name.endswith(pattern[1:]):
            return 2
        return None

    best: tuple[int, int, str] | None = None
    for route, match in routes.items():
        if match is None or match.is_fallback:
            candidate = (8, 0)
        elif match.protocol is not None and match.protocol != sniffed.protocol:
            continue
        elif match.sni:
            if sniffed.sni is None:
                continue
            ranks = [r for p in match.sni if (r := sni_rank(p, sniffed.sni)) is not None]
            if not ranks:
                continue
            offered = [i for i, a in enumerate(sniffed.alpn) if a in match.alpn]
            if match.alpn and not offered:
                continue
            candidate = (min(ranks) + (0 if match.alpn else 1), offered[0] if offered else 0)
        elif match.alpn:
            offered = [i for i, a in enumerate(sniffed.alpn) if a in match.alpn]
            if not offered:
                continue
            candidate = (5, offered[0])
        elif match.http_host:
            if sniffed.http_host not in match.http_host:
                continue
            candidate = (6, 0)
        else:
            candidate = (7, 0)
        if best is None or candidate < best[:2]:
            best = (*candidate, route)
    return None if best is None else best[2]


matches = st.one_of(
    st.none(),
    st.builds(
        Match,
        sni=st.lists(st.sampled_from(PATTERNS), max_size=2, unique=True).map(tuple),
        alpn=st.lists(st.sampled_from(ALPNS), max_size=2, unique=True).map(tuple),
    ),
    st.builds(Match, protocol=st.sampled_from(["tls", "ssh", "http"])),
    st.builds(
        Match, http_host=st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True).map(tuple)
    ),
)
sniffs = st.one_of(
    st.builds(
        Sniffed,
        protocol=st.just("tls"),
        sni=st.one_of(st.none(), st.sampled_from([*NAMES, "other.test"])),
        alpn=st.lists(st.sampled_from(ALPNS), max_size=3, unique=True).map(tuple),
    ),
    st.builds(Sniffed, protocol=st.just("http"), http_host=st.one_of(st.none(), st.sampled_from(NAMES))),
    st.builds(Sniffed, protocol=st.sampled_from(["ssh", "unknown"])),
)


@given(
    st.dictionaries(st.sampled_from("ABCDEF"), matches, max_size=6), st.lists(sniffs, min_size=1, max_size=5)
)
def test_table_agrees_with_reference(routes: dict[str, Match | None], clients: list[Sniffed]) -> None:
    if check_routes(routes):
        with pytest.raises(ConfigError):
            MatchTable(routes)
        return
    table = MatchTable(routes)
    for client in clients:
        assert table.choose(client) == reference(routes, client)
