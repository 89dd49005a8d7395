"""Which route of a shared listener gets a connection, from what its first bytes said. Pure.

Several routes may share one listen address when each has a distinct ``match:``; at most one has
none and is the listener's fallback. All conditions given in one match must hold (SNI *and* ALPN).

Precedence, first that matches wins:

| rank | the route's match | example |
|---|---|---|
| 1 | exact SNI with ALPN | ``sni: [db.example.com]`` + ``alpn: [postgresql]`` |
| 2 | exact SNI | ``sni: [db.example.com]`` |
| 3 | wildcard SNI with ALPN | ``sni: ["*.example.com"]`` + ``alpn: [h2]`` |
| 4 | wildcard SNI | ``sni: ["*.example.com"]`` |
| 5 | ALPN alone | ``alpn: [acme-tls/1]`` |
| 6 | HTTP Host | ``http_host: [status.example.com]`` |
| 7 | protocol | ``protocol: ssh`` |
| 8 | the fallback (no ``match``) | |

Within ranks 1, 3 and 5 several routes may match a client that offers several ALPN protocols;
the client's own preference order decides (its first offered protocol that some route takes).
An exact name always beats a wildcard, whatever the ALPN. A wildcard is one whole left-most
label as in certificates: ``*.b.example.com`` matches ``x.b.example.com``, not ``b.example.com``
nor ``y.x.b.example.com``. A ``protocol`` given beside ``sni``/``alpn``/``http_host`` only
restricts (and must agree: ``protocol: ssh`` with ``sni`` could never match, and is an error).

Every rank is a dict lookup (exact name; name minus its first label; ALPN id; host; protocol),
so choosing costs the same with 3 routes or 3000.

Conflicts (a config error naming both routes, see `check_conflicts`): two routes that would
claim the same connection at the same rank: the same SNI name with the same ALPN protocol (or
both without ALPN), the same ALPN alone, the same Host, the same protocol, two fallbacks. The
same name with and without ALPN is fine: rank decides. Overlapping ALPN lists for one name
(``[h2, http/1.1]`` and ``[h2]``) are a conflict too: there is no honest way to pick.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from portway.errors import ConfigError
from portway.sniff import Sniffed, Sniffer, SniffError, is_dns_name, normalize_http_host

__all__ = ["Match", "MatchProtocol", "MatchTable", "check_conflicts", "check_routes"]

MatchProtocol = Literal["tls", "ssh", "http"]
_PROTOCOLS: tuple[str, ...] = ("tls", "ssh", "http")


@dataclass(frozen=True, slots=True)
class Match:
    """One route's ``match:`` block, as written (normalised by `MatchTable`). All given must hold."""

    sni: tuple[str, ...] = ()
    alpn: tuple[str, ...] = ()
    protocol: MatchProtocol | None = None
    http_host: tuple[str, ...] = ()

    @property
    def is_fallback(self) -> bool:
        return not (self.sni or self.alpn or self.protocol or self.http_host)


# A claim is what one route asks for at one rank; two routes with an equal claim conflict.
_Claim = tuple[str, str, str | None]  # (kind, key, alpn or None)


@dataclass(slots=True)
class _Normalised:
    route: str
    sni: list[str] = field(default_factory=list)
    alpn: list[str] = field(default_factory=list)
    protocol: str | None = None
    http_host: list[str] = field(default_factory=list)


def _normalise(route: str, match: Match | None) -> tuple[_Normalised, list[ConfigError]]:
    out = _Normalised(route)
    problems: list[ConfigError] = []

    def bad(where: str, message: str) -> None:
        problems.append(ConfigError(message, route=route, field=f"match.{where}"))

    if match is None:
        return out, problems
    for name in match.sni:
        lowered = name.lower().removesuffix(".")
        bare = lowered[2:] if lowered.startswith("*.") else lowered
        if not is_dns_name(bare):
            bad(
                "sni",
                f"{name!r} is not a host name or a one-label wildcard like '*.example.com'"
                + (" (write non-ASCII names in their xn-- form)" if not name.isascii() else ""),
            )
        else:
            out.sni.append(lowered)
    for protocol in match.alpn:
        if not 0 < len(protocol) < 256 or not all(ord(c) < 256 for c in protocol):
            bad("alpn", f"ALPN protocol {protocol!r} must be 1-255 bytes (Latin-1)")
        else:
            out.alpn.append(protocol)
    if match.protocol is not None and match.protocol not in _PROTOCOLS:
        bad("protocol", f"protocol {match.protocol!r} is not one of tls, ssh, http")
    out.protocol = match.protocol
    for host in match.http_host:
        try:
            if host.startswith("[") or ":" not in host:
                normal = normalize_http_host(host)
                if host.startswith("[") and not host.endswith("]"):
                    raise SniffError("port")
            else:
                normal = f"[{ipaddress.IPv6Address(host).compressed}]"
            out.http_host.append(normal)
        except (SniffError, ValueError):
            bad("http_host", f"{host!r} is not a host name or IP address (without a port)")
    tls_side = bool(match.sni or match.alpn)
    if tls_side and match.http_host:
        bad("http_host", "sni/alpn (TLS) and http_host (plain HTTP) can never both hold")
    elif tls_side and match.protocol not in (None, "tls"):
        bad("protocol", f"protocol {match.protocol} with sni/alpn can never match (SNI and ALPN are TLS)")
    elif match.http_host and match.protocol not in (None, "http"):
        bad("protocol", f"protocol {match.protocol} with http_host can never match")
    return out, problems


def _alpn_keys(alpn: list[str]) -> list[str | None]:
    """A route's ALPN list as index keys; None stands for "any ALPN, or none"."""
    return list(alpn) if alpn else [None]


def _claims(n: _Normalised) -> Iterator[tuple[_Claim, str]]:
    """Each (claim, field) a route makes at its own rank."""
    if n.sni:
        for name in n.sni:
            for alpn in _alpn_keys(n.alpn):
                yield ("sni", name, alpn), ("match.alpn" if alpn else "match.sni")
    elif n.alpn:
        for alpn in n.alpn:
            yield ("alpn", alpn, None), "match.alpn"
    elif n.http_host:
        for host in n.http_host:
            yield ("host", host, None), "match.http_host"
    elif n.protocol:
        yield ("protocol", n.protocol, None), "match.protocol"
    else:
        yield ("fallback", "", None), "match"


def _analyse(
    routes: Mapping[str, Match | None],
) -> tuple[list[_Normalised], list[ConfigError], list[tuple[str, str, str]]]:
    normalised: list[_Normalised] = []
    problems: list[ConfigError] = []
    for route, match in routes.items():
        n, errors = _normalise(route, match)
        normalised.append(n)
        problems += errors
    owner: dict[_Claim, str] = {}
    conflicts: list[tuple[str, str, str]] = []
    reported: set[tuple[str, str, str]] = set()
    for n in normalised:
        for claim, where in _claims(n):
            first = owner.setdefault(claim, n.route)
            if first != n.route and (first, n.route, where) not in reported:
                reported.add((first, n.route, where))
                conflicts.append((first, n.route, where))
    return normalised, problems, conflicts


def check_conflicts(routes: Mapping[str, Match | None]) -> list[tuple[str, str, str]]:
    """(first route, second route, field) for every pair that claims the same connections at the
    same rank, in the mapping's order. None and an empty `Match` are both "the fallback"."""
    return _analyse(routes)[2]


def check_routes(routes: Mapping[str, Match | None]) -> list[ConfigError]:
    """Every problem with one listener's matches: bad names, conditions that can never all hold,
    conflicts. Each error names the route and the field; a conflict names both routes."""
    _, problems, conflicts = _analyse(routes)
    return problems + _conflict_errors(conflicts)


def _conflict_errors(conflicts: list[tuple[str, str, str]]) -> list[ConfigError]:
    errors = []
    for first, second, where in conflicts:
        what = "are both the fallback (no match)" if where == "match" else "match the same connections"
        errors.append(ConfigError(f"routes {first!r} and {second!r} {what}", route=second, field=where))
    return errors


class MatchTable:
    """The routes of one shared listener, indexed for `choose`. Raises the first `check_routes`
    problem as a `ConfigError`, so a table that exists is consistent."""

    __slots__ = ("_alpn", "_exact", "_fallback", "_host", "_protocol", "_wildcard", "needs_peek",
                 "wants_hello", "wants_http_host")  # fmt: skip

    def __init__(self, routes: Mapping[str, Match | None]) -> None:
        normalised, problems, conflicts = _analyse(routes)
        problems += _conflict_errors(conflicts)
        if problems:
            raise problems[0]
        self._exact: dict[str, dict[str | None, str]] = {}
        self._wildcard: dict[str, dict[str | None, str]] = {}
        self._alpn: dict[str, str] = {}
        self._host: dict[str, str] = {}
        self._protocol: dict[str, str] = {}
        self._fallback: str | None = None
        # A `protocol` beside sni/alpn/http_host is implied by them, so it adds no index of its own.
        for n in normalised:
            if n.sni:
                for name in n.sni:
                    table, key = (self._wildcard, name[2:]) if name.startswith("*.") else (self._exact, name)
                    by_alpn = table.setdefault(key, {})
                    for alpn in _alpn_keys(n.alpn):
                        by_alpn[alpn] = n.route
            elif n.alpn:
                for alpn in n.alpn:
                    self._alpn[alpn] = n.route
            elif n.http_host:
                for host in n.http_host:
                    self._host[host] = n.route
            elif n.protocol:
                self._protocol[n.protocol] = n.route
            else:
                self._fallback = n.route
        #: Only a fallback: the data path must not peek at all (and must not wait peek_timeout).
        self.needs_peek = bool(self._exact or self._wildcard or self._alpn or self._host or self._protocol)
        #: Some route needs the whole ClientHello (SNI/ALPN), not just "this is TLS".
        self.wants_hello = bool(self._exact or self._wildcard or self._alpn)
        #: Some route matches on the HTTP Host header.
        self.wants_http_host = bool(self._host)

    @property
    def fallback(self) -> str | None:
        return self._fallback

    def sniffer(self) -> Sniffer:
        """A `Sniffer` that reads exactly as much as this table's routes need."""
        return Sniffer(want_hello=self.wants_hello, want_http_host=self.wants_http_host)

    def choose(self, sniffed: Sniffed | None) -> str | None:
        """The route for a connection, or None (no route matches and there is no fallback: close).
        None for `sniffed` means nothing was peeked (a fallback-only listener)."""
        if sniffed is None:
            return self._fallback
        if sniffed.sni is not None:
            name = sniffed.sni
            for table, key in ((self._exact, name), (self._wildcard, name.partition(".")[2])):
                by_alpn = table.get(key)
                if by_alpn is not None:
                    for alpn in sniffed.alpn:
                        route = by_alpn.get(alpn)
                        if route is not None:
                            return route
                    route = by_alpn.get(None)
                    if route is not None:
                        return route
        for alpn in sniffed.alpn:
            route = self._alpn.get(alpn)
            if route is not None:
                return route
        if sniffed.http_host is not None:
            route = self._host.get(sniffed.http_host)
            if route is not None:
                return route
        return self._protocol.get(sniffed.protocol, self._fallback)
