"""Access control: which source addresses may use a listener. Pure: address in, decision out.

Rules are written ``kind:value``::

    ip:1.2.3.4   ip:2001:db8::1        one address
    cidr:10.0.0.0/8                    a network (host bits may be set: 10.1.2.3/8 is 10/8)
    country:GB                         ISO 3166 alpha-2 code, any case (needs GeoIP)
    tz:Asia/Shanghai                   IANA time zone, "timezone:" also accepted (needs GeoIP)

`parse_rule` raises ValueError with a one-line message quoting the rule; the config schema adds
the file, route and field.

`Acl.decide(address)` evaluates, first match wins:

1. deny rules (ip/cidr, then country/tz),
2. allow rules (ip/cidr, then country/tz),
3. ``allow_local``: loopback, RFC 1918, link-local and IPv6 unique-local sources (see
   `LOCAL_NETWORKS`),
4. the default.

So an explicit deny beats ``allow_local``, even for loopback: ``deny: [ip:127.0.0.66]`` refuses
127.0.0.66 although 127/8 is local. Among several matching ip/cidr rules of one list the most
specific (longest prefix) is reported. IPv4-mapped IPv6 addresses (``::ffff:127.0.0.66``, as
dual-stack listeners report IPv4 peers) are matched as their IPv4 address, and ip/cidr rules
written in that form are stored as IPv4 too.

Cost: networks are parsed once, at construction, and grouped by prefix length, so a decision
costs one dict probe per distinct prefix length in use, however many rules there are. GeoIP is
consulted only when country/tz rules exist, at most once per decision. Decisions are cached
per address for `cache_ttl` seconds in an LRU of at most `cache_size` entries, so a flood of
distinct (possibly spoofed-via-PROXY) sources cannot grow memory without bound.

`DenyLog` turns a stream of denials into few log lines: the first denial of an address in a
window is reported at once, repeats are counted and summarised by `summaries()`, which the caller
runs on a timer (every `interval` seconds) and at shutdown with ``force=True``.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

from portway.errors import ConfigError
from portway.geoip import GeoInfo, GeoLookup

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_CACHE_TTL",
    "LOCAL_NETWORKS",
    "Acl",
    "CidrRule",
    "CountryRule",
    "Decision",
    "DenyLog",
    "IpRule",
    "Rule",
    "TimeZoneRule",
    "needs_geoip",
    "parse_rule",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Clock = Callable[[], float]

# What allow_local trusts. Deliberately not 100.64.0.0/10 (carrier-grade NAT: shared with other
# customers) nor 0.0.0.0/8 or documentation ranges, which ipaddress.is_private includes.
LOCAL_NETWORKS: Final[tuple[IPNetwork, ...]] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",  # loopback
        "10.0.0.0/8",  # RFC 1918
        "172.16.0.0/12",  # RFC 1918
        "192.168.0.0/16",  # RFC 1918
        "169.254.0.0/16",  # IPv4 link-local
        "::1/128",  # loopback
        "fc00::/7",  # RFC 4193 unique local
        "fe80::/10",  # IPv6 link-local
    )
)


# -- rules -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IpRule:
    """Matches one address."""

    address: IPAddress

    def __str__(self) -> str:
        return f"ip:{self.address}"


@dataclass(frozen=True, slots=True)
class CidrRule:
    """Matches every address in a network."""

    network: IPNetwork

    def __str__(self) -> str:
        return f"cidr:{self.network}"


@dataclass(frozen=True, slots=True)
class CountryRule:
    """Matches addresses the GeoIP database places in a country (ISO 3166 alpha-2, upper case)."""

    code: str

    def __str__(self) -> str:
        return f"country:{self.code}"


@dataclass(frozen=True, slots=True)
class TimeZoneRule:
    """Matches addresses whose GeoIP location has this IANA time zone (compared ignoring case)."""

    name: str

    def __str__(self) -> str:
        return f"tz:{self.name}"


Rule = IpRule | CidrRule | CountryRule | TimeZoneRule

_COUNTRY = re.compile(r"[A-Za-z]{2}")
# IANA names: "UTC", "Asia/Shanghai", "America/Argentina/Buenos_Aires", "Etc/GMT+5". The shape
# is checked, not membership: GeoIP data, not the host's tz database, is what rules match.
_TIME_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(?:/[A-Za-z0-9_+\-]+)*")
_KINDS = "ip, cidr, country, tz"


def parse_rule(text: str) -> Rule:
    """Parse ``kind:value``; raise ValueError quoting `text` and saying what is wrong."""
    kind, sep, value = text.strip().partition(":")
    kind, value = kind.strip().lower(), value.strip()
    if not sep or not kind:
        raise ValueError(f"invalid ACL rule {text!r}: expected kind:value with kind one of {_KINDS}")
    if not value:
        raise ValueError(f"invalid ACL rule {text!r}: empty value")
    if kind == "ip":
        if "%" in value:
            raise ValueError(f"invalid ACL rule {text!r}: zone index not allowed")
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"invalid ACL rule {text!r}: {value!r} is not an IPv4 or IPv6 address") from None
        return IpRule(_unmap(address))
    if kind == "cidr":
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ValueError(f"invalid ACL rule {text!r}: {exc}") from None
        return CidrRule(_unmap_network(network))
    if kind == "country":
        if not _COUNTRY.fullmatch(value):
            raise ValueError(f"invalid ACL rule {text!r}: country must be a two-letter ISO 3166 code")
        return CountryRule(value.upper())
    if kind in ("tz", "timezone"):
        if not _TIME_ZONE.fullmatch(value):
            raise ValueError(f"invalid ACL rule {text!r}: not an IANA time zone name like Asia/Shanghai")
        return TimeZoneRule(value)
    raise ValueError(f"invalid ACL rule {text!r}: unknown kind {kind!r} (expected one of {_KINDS})")


def needs_geoip(rules: Iterable[Rule]) -> bool:
    """Whether any rule is a country or time zone rule, so a GeoIP database must be opened."""
    return any(isinstance(rule, CountryRule | TimeZoneRule) for rule in rules)


def _unmap(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmap_network(network: IPNetwork) -> IPNetwork:
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        v4 = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((v4, network.prefixlen - 96))
    return network


class _NetworkTable:
    """Longest-prefix match over a fixed set of networks, grouped by prefix length.

    A decision masks the address once per distinct prefix length and probes a dict, so a
    thousand /32 rules cost the same as one.
    """

    def __init__(self, entries: Iterable[tuple[IPNetwork, Rule]]) -> None:
        by_length: dict[tuple[int, int], dict[int, Rule]] = {}
        for network, rule in entries:
            bucket = by_length.setdefault((network.version, network.prefixlen), {})
            bucket.setdefault(int(network.network_address), rule)
        self._tables: dict[int, list[tuple[int, dict[int, Rule]]]] = {4: [], 6: []}
        for (version, prefixlen), bucket in sorted(by_length.items(), key=lambda kv: -kv[0][1]):
            bits = 32 if version == 4 else 128
            mask = ((1 << prefixlen) - 1) << (bits - prefixlen)
            self._tables[version].append((mask, bucket))

    def __bool__(self) -> bool:
        return bool(self._tables[4] or self._tables[6])

    def match(self, address: IPAddress) -> Rule | None:
        value = int(address)
        for mask, bucket in self._tables[address.version]:
            rule = bucket.get(value & mask)
            if rule is not None:
                return rule
        return None


class _GeoRules:
    """The country and time zone rules of one list."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.countries: dict[str, Rule] = {}
        self.time_zones: dict[str, Rule] = {}
        for rule in rules:
            if isinstance(rule, CountryRule):
                self.countries.setdefault(rule.code, rule)
            elif isinstance(rule, TimeZoneRule):
                self.time_zones.setdefault(rule.name.lower(), rule)

    def __bool__(self) -> bool:
        return bool(self.countries or self.time_zones)

    def match(self, info: GeoInfo) -> Rule | None:
        if info.country is not None and (rule := self.countries.get(info.country)) is not None:
            return rule
        if info.time_zone is not None:
            return self.time_zones.get(info.time_zone.lower())
        return None


# -- decisions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a source may connect, and why (e.g. ``"deny cidr:192.168.5.0/24"``)."""

    allowed: bool
    reason: str


_ALLOW_LOCAL = Decision(True, "allow_local")
_DEFAULT_ALLOW = Decision(True, "default allow")
_DEFAULT_DENY = Decision(False, "default deny")

DEFAULT_CACHE_TTL: Final = 300.0
# About 250 bytes per entry (key, tuple, LRU links): 16384 entries stay under 5 MB.
DEFAULT_CACHE_SIZE: Final = 16384


def _as_rules(rules: Iterable[Rule | str]) -> list[Rule]:
    return [parse_rule(rule) if isinstance(rule, str) else rule for rule in rules]


class Acl:
    """An immutable access policy with a per-address decision cache (see the module docstring).

    Raises ConfigError if country/tz rules are given without `geo`, and ValueError for a rule
    string that does not parse. Build a new Acl on reload rather than mutating one.
    """

    def __init__(
        self,
        *,
        default: Literal["allow", "deny"] = "allow",
        allow_local: bool = False,
        allow: Iterable[Rule | str] = (),
        deny: Iterable[Rule | str] = (),
        geo: GeoLookup | None = None,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Clock = time.monotonic,
    ) -> None:
        if default not in ("allow", "deny"):
            raise ValueError(f"ACL default must be 'allow' or 'deny', not {default!r}")
        if cache_size < 0 or cache_ttl < 0:
            raise ValueError("ACL cache size and TTL must not be negative")
        self.allow_rules = tuple(_as_rules(allow))
        self.deny_rules = tuple(_as_rules(deny))
        self.needs_geoip = needs_geoip(self.allow_rules + self.deny_rules)
        if self.needs_geoip and geo is None:
            raise ConfigError("country and tz rules need a GeoIP database (acl.geoip.database)")
        self._default = _DEFAULT_ALLOW if default == "allow" else _DEFAULT_DENY
        self._allow_local = allow_local
        self._geo = geo if self.needs_geoip else None
        self._deny_nets = _network_table(self.deny_rules)
        self._allow_nets = _network_table(self.allow_rules)
        self._deny_geo = _GeoRules(self.deny_rules)
        self._allow_geo = _GeoRules(self.allow_rules)
        self._local = _NetworkTable((network, CidrRule(network)) for network in LOCAL_NETWORKS)
        self._cache: OrderedDict[str | IPAddress, tuple[float, Decision]] = OrderedDict()
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size if cache_ttl > 0 else 0
        self._clock = clock

    @property
    def cache_len(self) -> int:
        """How many decisions are cached now (never more than `cache_size`)."""
        return len(self._cache)

    def decide(self, address: str | IPAddress) -> Decision:
        """Decide for a source address, from the cache when fresh; ValueError if not an address.

        May raise whatever the GeoIP lookup raises (a corrupt database); treat that as a
        denial.
        """
        if not self._cache_size:
            return self.evaluate(address)
        now = self._clock()
        cache = self._cache
        entry = cache.get(address)
        if entry is not None and entry[0] > now:
            cache.move_to_end(address)
            return entry[1]
        decision = self.evaluate(address)
        cache[address] = (now + self._cache_ttl, decision)
        cache.move_to_end(address)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        return decision

    def evaluate(self, address: str | IPAddress) -> Decision:
        """Decide without the cache: deny, allow, allow_local, default (first match wins)."""
        ip = _unmap(ipaddress.ip_address(address) if isinstance(address, str) else address)
        rule = self._deny_nets.match(ip)
        if rule is not None:
            return Decision(False, f"deny {rule}")
        info: GeoInfo | None = None
        if self._geo is not None:
            info = self._geo.lookup(ip)
            rule = self._deny_geo.match(info)
            if rule is not None:
                return Decision(False, f"deny {rule}")
        rule = self._allow_nets.match(ip)
        if rule is None and info is not None:
            rule = self._allow_geo.match(info)
        if rule is not None:
            return Decision(True, f"allow {rule}")
        if self._allow_local and self._local.match(ip) is not None:
            return _ALLOW_LOCAL
        return self._default


def _network_table(rules: Iterable[Rule]) -> _NetworkTable:
    entries: list[tuple[IPNetwork, Rule]] = []
    for rule in rules:
        if isinstance(rule, IpRule):
            entries.append((ipaddress.ip_network(rule.address), rule))
        elif isinstance(rule, CidrRule):
            entries.append((rule.network, rule))
    return _NetworkTable(entries)


# -- denial logging --------------------------------------------------------------------------


@dataclass(slots=True)
class _Window:
    start: float
    count: int


class DenyLog:
    """Aggregate denied attempts per address into at most two lines per `interval` seconds.

    `record` returns the line to log now (first denial of an address in its window) or None
    (a repeat, counted). `summaries` returns lines like ``"denied 127.0.0.66 x 153 in the last
    10s"`` for windows that have ended. At most `max_addresses` windows are tracked; denials
    from further addresses while it is full are only counted, so a flood of sources costs
    bounded memory and a bounded number of lines.
    """

    def __init__(
        self, interval: float = 10.0, *, max_addresses: int = 4096, clock: Clock = time.monotonic
    ) -> None:
        if interval <= 0 or max_addresses <= 0:
            raise ValueError("DenyLog interval and max_addresses must be positive")
        self.interval = interval
        self._max = max_addresses
        self._clock = clock
        # address -> [window start, denials in window]; dict order is start order, because
        # a window is only ever added at the end, so expiry scans only from the front.
        self._windows: dict[str, _Window] = {}
        self._pending: list[str] = []
        self._unlisted = 0  # denials counted but not itemised because a table was full

    def record(self, address: str, reason: str | None = None) -> str | None:
        """Count a denial; return the line to emit now, or None if it is a repeat."""
        now = self._clock()
        self._expire(now)
        window = self._windows.get(address)
        if window is not None:
            window.count += 1
            return None
        if len(self._windows) >= self._max:
            self._unlisted += 1
            return None
        self._windows[address] = _Window(now, 1)
        return f"denied {address} ({reason})" if reason else f"denied {address}"

    def summaries(self, *, force: bool = False) -> list[str]:
        """Return summaries of ended windows (all windows with `force`, e.g. at shutdown)."""
        now = self._clock()
        if force:
            for address, window in self._windows.items():
                self._summarise(address, window.count, now - window.start)
            self._windows.clear()
        else:
            self._expire(now)
        if self._unlisted:
            self._pending.append(f"denied {self._unlisted} more attempts not itemised (deny log full)")
            self._unlisted = 0
        lines, self._pending = self._pending, []
        return lines

    def _expire(self, now: float) -> None:
        windows = self._windows
        while windows:
            address = next(iter(windows))
            window = windows[address]
            if now - window.start < self.interval:
                break
            del windows[address]
            self._summarise(address, window.count, self.interval)

    def _summarise(self, address: str, count: int, seconds: float) -> None:
        if count <= 1:
            return  # the single denial was already reported by record()
        if len(self._pending) >= self._max:
            # summaries() is not being called; keep memory bounded and say so later.
            self._unlisted += count - 1
            return
        self._pending.append(f"denied {address} x {count} in the last {round(seconds, 1):g}s")
