"""ACL rules, evaluation order, the decision cache, GeoIP rules and denial log aggregation."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import maxminddb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway.acl import (
    Acl,
    CidrRule,
    CountryRule,
    Decision,
    DenyLog,
    IpRule,
    TimeZoneRule,
    needs_geoip,
    parse_rule,
)
from portway.errors import ConfigError
from portway.geoip import GeoInfo, GeoIpDatabase
from tests.mmdb_factory import write_city_mmdb

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingGeo:
    """A GeoLookup that records how often it is asked."""

    def __init__(self, table: dict[str, GeoInfo] | None = None) -> None:
        self.table = table or {}
        self.calls = 0

    def lookup(self, address: IPAddress) -> GeoInfo:
        self.calls += 1
        return self.table.get(str(address), GeoInfo())


@pytest.fixture(scope="module")
def city_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_city_mmdb(tmp_path_factory.mktemp("geo") / "city.mmdb")


# -- rule parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("ip:1.2.3.4", IpRule(ipaddress.IPv4Address("1.2.3.4"))),
        ("IP: 2001:DB8::1 ", IpRule(ipaddress.IPv6Address("2001:db8::1"))),
        ("ip:::1", IpRule(ipaddress.IPv6Address("::1"))),
        ("ip:::ffff:127.0.0.66", IpRule(ipaddress.IPv4Address("127.0.0.66"))),
        ("cidr:10.0.0.0/8", CidrRule(ipaddress.IPv4Network("10.0.0.0/8"))),
        ("cidr:10.1.2.3/8", CidrRule(ipaddress.IPv4Network("10.0.0.0/8"))),
        ("cidr:192.168.5.7", CidrRule(ipaddress.IPv4Network("192.168.5.7/32"))),
        ("cidr:fc00::/7", CidrRule(ipaddress.IPv6Network("fc00::/7"))),
        ("cidr:::ffff:10.0.0.0/104", CidrRule(ipaddress.IPv4Network("10.0.0.0/8"))),
        ("country:gb", CountryRule("GB")),
        ("country:US", CountryRule("US")),
        ("tz:Asia/Shanghai", TimeZoneRule("Asia/Shanghai")),
        ("timezone:America/Argentina/Buenos_Aires", TimeZoneRule("America/Argentina/Buenos_Aires")),
        ("tz:Etc/GMT+5", TimeZoneRule("Etc/GMT+5")),
        ("tz:UTC", TimeZoneRule("UTC")),
    ],
)
def test_parse_rule(text: str, rule: object) -> None:
    assert parse_rule(text) == rule


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "expected kind:value"),
        ("1.2.3.4", "expected kind:value"),
        (":1.2.3.4", "expected kind:value"),
        ("ip:", "empty value"),
        ("ip:999.1.1.1", "not an IPv4 or IPv6 address"),
        ("ip:01.2.3.4", "not an IPv4 or IPv6 address"),
        ("ip:10.0.0.0/8", "not an IPv4 or IPv6 address"),
        ("ip:fe80::1%eth0", "zone index"),
        ("cidr:10.0.0.0/33", "33"),
        ("cidr:10.0.0.0/x", "x"),
        ("cidr:::/129", "129"),
        ("cidr:999.0.0.0/8", "999"),
        ("foo:bar", "unknown kind 'foo'"),
        ("country:GBR", "two-letter"),
        ("country:G1", "two-letter"),
        ("country:ÉÉ", "two-letter"),
        ("tz:Asia Shanghai", "IANA"),
        ("tz:/etc/passwd", "IANA"),
        ("tz:Asia//Shanghai", "IANA"),
    ],
)
def test_parse_rule_errors_quote_the_rule(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match="invalid ACL rule") as info:
        parse_rule(text)
    message = str(info.value)
    assert repr(text) in message
    assert complaint in message
    assert "\n" not in message


def test_rules_print_back_as_rule_text() -> None:
    for text in ("ip:1.2.3.4", "cidr:10.0.0.0/8", "country:GB", "tz:Asia/Shanghai"):
        assert str(parse_rule(text)) == text
    assert str(parse_rule("timezone:Asia/Shanghai")) == "tz:Asia/Shanghai"


# -- evaluation order --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "address", "expected"),
    [
        # explicit deny beats allow_local, loopback included
        (
            {"allow_local": True, "deny": ["ip:127.0.0.66"]},
            "127.0.0.66",
            Decision(False, "deny ip:127.0.0.66"),
        ),
        ({"allow_local": True, "deny": ["ip:127.0.0.66"]}, "127.0.0.1", Decision(True, "allow_local")),
        (
            {"allow_local": True, "deny": ["cidr:192.168.5.0/24"]},
            "192.168.5.9",
            Decision(False, "deny cidr:192.168.5.0/24"),
        ),
        (
            {"allow_local": True, "deny": ["cidr:192.168.5.0/24"]},
            "192.168.6.9",
            Decision(True, "allow_local"),
        ),
        # deny beats allow
        (
            {"allow": ["cidr:10.0.0.0/8"], "deny": ["ip:10.0.0.5"]},
            "10.0.0.5",
            Decision(False, "deny ip:10.0.0.5"),
        ),
        (
            {"allow": ["cidr:10.0.0.0/8"], "deny": ["ip:10.0.0.5"]},
            "10.0.0.6",
            Decision(True, "allow cidr:10.0.0.0/8"),
        ),
        # default deny with allow rules
        ({"default": "deny", "allow": ["ip:1.2.3.4"]}, "1.2.3.4", Decision(True, "allow ip:1.2.3.4")),
        ({"default": "deny", "allow": ["ip:1.2.3.4"]}, "1.2.3.5", Decision(False, "default deny")),
        ({"default": "deny", "allow_local": True}, "10.9.8.7", Decision(True, "allow_local")),
        ({"default": "deny", "allow_local": True}, "8.8.8.8", Decision(False, "default deny")),
        ({"default": "deny", "allow_local": True}, "100.64.0.1", Decision(False, "default deny")),
        ({"default": "deny", "allow_local": True}, "fd12::1", Decision(True, "allow_local")),
        ({"default": "deny", "allow_local": True}, "fe80::1", Decision(True, "allow_local")),
        ({"default": "deny", "allow_local": True}, "::1", Decision(True, "allow_local")),
        ({"default": "deny", "allow_local": True}, "169.254.1.1", Decision(True, "allow_local")),
        ({"default": "deny", "allow_local": True}, "172.32.0.1", Decision(False, "default deny")),
        # allow_local off: loopback is not special
        ({"default": "deny", "allow_local": False}, "127.0.0.1", Decision(False, "default deny")),
        ({"default": "allow"}, "127.0.0.1", Decision(True, "default allow")),
        # IPv4-mapped IPv6 is matched as IPv4
        (
            {"allow_local": True, "deny": ["ip:127.0.0.66"]},
            "::ffff:127.0.0.66",
            Decision(False, "deny ip:127.0.0.66"),
        ),
        ({"default": "deny", "allow_local": True}, "::ffff:127.0.0.1", Decision(True, "allow_local")),
        (
            {"default": "deny", "allow": ["cidr:10.0.0.0/8"]},
            "::ffff:10.1.1.1",
            Decision(True, "allow cidr:10.0.0.0/8"),
        ),
        # the most specific matching rule is reported
        (
            {"deny": ["cidr:10.0.0.0/8", "cidr:10.1.0.0/16", "ip:10.1.2.3"]},
            "10.1.2.3",
            Decision(False, "deny ip:10.1.2.3"),
        ),
        (
            {"deny": ["cidr:10.0.0.0/8", "cidr:10.1.0.0/16"]},
            "10.1.9.9",
            Decision(False, "deny cidr:10.1.0.0/16"),
        ),
        # v6 rules do not match v4 sources and vice versa
        ({"default": "deny", "allow": ["cidr:::/0"]}, "1.2.3.4", Decision(False, "default deny")),
        ({"default": "deny", "allow": ["cidr:0.0.0.0/0"]}, "2001:db8::1", Decision(False, "default deny")),
    ],
)
def test_evaluation_order(policy: dict[str, object], address: str, expected: Decision) -> None:
    acl = Acl(**policy)  # type: ignore[arg-type]
    assert acl.decide(address) == expected
    assert acl.decide(ipaddress.ip_address(address)) == expected


def test_decide_rejects_non_addresses() -> None:
    with pytest.raises(ValueError, match="does not appear"):
        Acl().decide("example.com")


def test_acl_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"invalid ACL rule 'cidr:10\.0\.0\.0/33'"):
        Acl(deny=["cidr:10.0.0.0/33"])
    with pytest.raises(ValueError, match="default"):
        Acl(default="maybe")  # type: ignore[arg-type]


# -- cache ---------------------------------------------------------------------------------------


def test_cache_serves_fresh_decisions_and_expires_them() -> None:
    clock = FakeClock()
    geo = CountingGeo({"127.0.0.1": GeoInfo("US", "America/New_York")})
    acl = Acl(deny=["country:US"], geo=geo, cache_ttl=60, clock=clock)
    assert not acl.decide("127.0.0.1").allowed
    assert not acl.decide("127.0.0.1").allowed
    assert geo.calls == 1
    clock.now += 59.9
    acl.decide("127.0.0.1")
    assert geo.calls == 1
    clock.now += 0.2
    acl.decide("127.0.0.1")
    assert geo.calls == 2


def test_cache_stays_bounded_under_a_flood_of_sources() -> None:
    acl = Acl(deny=["cidr:10.0.0.0/8"], cache_size=1000)
    for n in range(100_000):
        acl.decide(ipaddress.IPv4Address(0x0B000000 + n))
        assert acl.cache_len <= 1000
    assert acl.cache_len == 1000


def test_cache_evicts_least_recently_used() -> None:
    geo = CountingGeo()
    acl = Acl(allow=["country:GB"], geo=geo, cache_size=2, clock=FakeClock())
    acl.decide("1.1.1.1")
    acl.decide("2.2.2.2")
    acl.decide("1.1.1.1")  # refreshes 1.1.1.1, so 2.2.2.2 is the oldest
    acl.decide("3.3.3.3")
    assert geo.calls == 3
    acl.decide("1.1.1.1")
    assert geo.calls == 3
    acl.decide("2.2.2.2")
    assert geo.calls == 4


def test_cache_can_be_disabled() -> None:
    geo = CountingGeo()
    acl = Acl(allow=["country:GB"], geo=geo, cache_size=0)
    acl.decide("1.1.1.1")
    acl.decide("1.1.1.1")
    assert geo.calls == 2
    assert acl.cache_len == 0


# -- GeoIP ---------------------------------------------------------------------------------------


def test_geoip_is_never_consulted_without_geo_rules() -> None:
    geo = CountingGeo()
    acl = Acl(allow=["cidr:10.0.0.0/8"], deny=["ip:1.2.3.4"], geo=geo, allow_local=True)
    assert not acl.needs_geoip
    for address in ("10.0.0.1", "1.2.3.4", "8.8.8.8", "127.0.0.1"):
        acl.decide(address)
    assert geo.calls == 0


def test_needs_geoip() -> None:
    assert needs_geoip([parse_rule("country:GB")])
    assert needs_geoip([parse_rule("ip:1.2.3.4"), parse_rule("tz:UTC")])
    assert not needs_geoip([parse_rule("ip:1.2.3.4"), parse_rule("cidr:::/0")])


def test_geo_rules_without_a_database_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="GeoIP database"):
        Acl(allow=["tz:Asia/Shanghai"])


def test_factory_database_is_readable_by_maxminddb(city_db: str) -> None:
    with maxminddb.open_database(city_db) as reader:
        assert reader.get("127.0.2.1") == {
            "country": {"iso_code": "CN", "names": {"en": "CN"}},
            "location": {"time_zone": "Asia/Shanghai"},
        }
        assert reader.get("127.0.9.1") is None


@pytest.mark.parametrize(
    ("address", "info"),
    [
        ("127.0.0.1", GeoInfo("GB", "Europe/London")),
        ("127.0.1.200", GeoInfo("US", "America/New_York")),
        ("127.0.2.9", GeoInfo("CN", "Asia/Shanghai")),
        ("::ffff:127.0.2.9", GeoInfo("CN", "Asia/Shanghai")),
        ("2001:db8::5", GeoInfo("DE", "Europe/Berlin")),
        ("127.0.3.1", GeoInfo()),
        ("::1", GeoInfo()),
    ],
)
def test_geoip_lookup_city_layout(city_db: str, address: str, info: GeoInfo) -> None:
    with GeoIpDatabase(city_db) as db:
        assert db.lookup(ipaddress.ip_address(address)) == info


def test_geoip_lookup_country_layout(tmp_path: Path) -> None:
    path = write_city_mmdb(tmp_path / "country.mmdb", with_location=False)
    with GeoIpDatabase(path) as db:
        assert db.lookup(ipaddress.ip_address("127.0.1.1")) == GeoInfo("US", None)
        acl = Acl(default="deny", allow=["country:us", "tz:America/New_York"], geo=db)
        assert acl.decide("127.0.1.1") == Decision(True, "allow country:US")
        assert acl.decide("127.0.2.1") == Decision(False, "default deny")


def test_missing_database_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mmdb"
    with pytest.raises(ConfigError, match=r"nope\.mmdb.*does not exist"):
        GeoIpDatabase(missing)


@pytest.mark.parametrize("content", [b"", b"not a maxmind database" * 10])
def test_unreadable_database_names_the_path(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=r"bad\.mmdb.*cannot be read"):
        GeoIpDatabase(bad)


def test_directory_instead_of_database_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        GeoIpDatabase(tmp_path)


@pytest.mark.parametrize(
    ("policy", "address", "expected"),
    [
        ({"default": "deny", "allow": ["country:GB"]}, "127.0.0.7", Decision(True, "allow country:GB")),
        ({"default": "deny", "allow": ["country:GB"]}, "127.0.1.7", Decision(False, "default deny")),
        (
            {"default": "deny", "allow": ["tz:asia/shanghai"]},
            "127.0.2.7",
            Decision(True, "allow tz:asia/shanghai"),
        ),
        (
            {"default": "deny", "allow": ["timezone:Asia/Shanghai"]},
            "::ffff:127.0.2.7",
            Decision(True, "allow tz:Asia/Shanghai"),
        ),
        # a country deny beats allow_local for loopback sources
        ({"allow_local": True, "deny": ["country:US"]}, "127.0.1.7", Decision(False, "deny country:US")),
        ({"allow_local": True, "deny": ["country:US"]}, "127.0.0.7", Decision(True, "allow_local")),
        # a geo deny beats an ip allow
        (
            {"allow": ["ip:127.0.2.7"], "deny": ["tz:Asia/Shanghai"]},
            "127.0.2.7",
            Decision(False, "deny tz:Asia/Shanghai"),
        ),
        # an address the database does not know matches no geo rule
        (
            {"default": "deny", "allow": ["country:GB"], "deny": ["country:US"]},
            "127.0.3.1",
            Decision(False, "default deny"),
        ),
        ({"default": "deny", "allow": ["country:DE"]}, "2001:db8::1", Decision(True, "allow country:DE")),
    ],
)
def test_geo_rules_against_the_factory_database(
    city_db: str, policy: dict[str, object], address: str, expected: Decision
) -> None:
    with GeoIpDatabase(city_db) as db:
        assert Acl(geo=db, **policy).decide(address) == expected  # type: ignore[arg-type]


# -- properties ----------------------------------------------------------------------------------

addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
networks = st.one_of(
    st.builds(
        lambda a, p: ipaddress.ip_network((a, p), strict=False), st.ip_addresses(v=4), st.integers(0, 32)
    ),
    st.builds(
        lambda a, p: ipaddress.ip_network((a, p), strict=False), st.ip_addresses(v=6), st.integers(0, 128)
    ),
)


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@given(networks, addresses)
def test_cidr_rule_matches_exactly_the_network(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network, address: IPAddress
) -> None:
    rule = parse_rule(f"cidr:{network}")
    assert isinstance(rule, CidrRule)
    acl = Acl(default="deny", allow=[rule], cache_size=0)
    source = _unmapped(address)
    expected = rule.network.version == source.version and source in rule.network
    assert acl.decide(address).allowed is expected
    inside = network.network_address + (network.num_addresses // 2)
    if _unmapped(inside) == inside:
        assert acl.decide(inside).allowed


rule_texts = st.one_of(
    st.builds(lambda a: f"ip:{a}", addresses),
    st.builds(lambda n: f"cidr:{n}", networks),
    st.sampled_from(["country:GB", "country:US", "tz:Asia/Shanghai", "tz:Europe/London"]),
)
geo_table = {
    "127.0.0.1": GeoInfo("GB", "Europe/London"),
    "127.0.1.1": GeoInfo("US", "America/New_York"),
    "127.0.2.1": GeoInfo("CN", "Asia/Shanghai"),
}
probe_addresses = st.one_of(addresses, st.sampled_from([*geo_table, "::ffff:127.0.0.1", "10.0.0.1", "::1"]))


@given(
    st.sampled_from(["allow", "deny"]),
    st.booleans(),
    st.lists(rule_texts, max_size=6),
    st.lists(rule_texts, max_size=6),
    st.lists(probe_addresses, min_size=1, max_size=10),
)
def test_cached_decisions_equal_uncached_ones(
    default: str, allow_local: bool, allow: list[str], deny: list[str], probes: list[object]
) -> None:
    clock = FakeClock()
    cached = Acl(
        default=default,  # type: ignore[arg-type]
        allow_local=allow_local,
        allow=allow,
        deny=deny,
        geo=CountingGeo(geo_table),
        clock=clock,
        cache_size=4,
    )
    for probe in probes * 2:
        address = probe if isinstance(probe, str) else str(probe)
        decision = cached.decide(address)
        assert decision == cached.evaluate(address) == cached.decide(address)
        assert decision.allowed is cached.decide(ipaddress.ip_address(address)).allowed
        clock.now += 1
        if any(str(_unmapped(ipaddress.ip_address(address))) == d.removeprefix("ip:") for d in deny):
            assert not decision.allowed


# -- denial log ----------------------------------------------------------------------------------


def test_deny_log_reports_first_denial_and_summarises_repeats() -> None:
    clock = FakeClock()
    log = DenyLog(10, clock=clock)
    assert log.record("127.0.0.66", "deny ip:127.0.0.66") == "denied 127.0.0.66 (deny ip:127.0.0.66)"
    for _ in range(152):
        assert log.record("127.0.0.66") is None
    assert log.record("10.0.0.1") == "denied 10.0.0.1"
    clock.now += 9
    assert log.summaries() == []
    clock.now += 1
    assert log.summaries() == ["denied 127.0.0.66 x 153 in the last 10s"]  # 10.0.0.1 was denied once
    assert log.summaries() == []
    assert log.record("127.0.0.66") == "denied 127.0.0.66"  # a new window reports at once


def test_deny_log_keeps_summaries_of_windows_ended_before_they_are_read() -> None:
    clock = FakeClock()
    log = DenyLog(10, clock=clock)
    log.record("1.1.1.1")
    log.record("1.1.1.1")
    clock.now += 15
    assert log.record("1.1.1.1") == "denied 1.1.1.1"
    assert log.summaries() == ["denied 1.1.1.1 x 2 in the last 10s"]


def test_deny_log_force_flushes_open_windows() -> None:
    clock = FakeClock()
    log = DenyLog(10, clock=clock)
    log.record("1.1.1.1")
    log.record("1.1.1.1")
    clock.now += 2.5
    assert log.summaries(force=True) == ["denied 1.1.1.1 x 2 in the last 2.5s"]
    assert log.summaries(force=True) == []


def test_deny_log_is_bounded() -> None:
    clock = FakeClock()
    log = DenyLog(10, max_addresses=100, clock=clock)
    emitted = [log.record(str(ipaddress.IPv4Address(n))) for n in range(100_000)]
    assert sum(line is not None for line in emitted) == 100
    assert len(log._windows) == 100
    clock.now += 10
    assert log.summaries() == ["denied 99900 more attempts not itemised (deny log full)"]
    assert len(log._windows) == 0
