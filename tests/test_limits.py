"""Token buckets and per-client limits, with time as plain numbers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portway.limits import CONNECTION_LIMIT, RATE_LIMIT, ClientLimits, TokenBucket, client_key

# -- token bucket -------------------------------------------------------------------------------------


def test_bucket_starts_with_one_seconds_burst_then_refills_at_rate() -> None:
    b = TokenBucket(50, now=100.0)
    assert sum(b.take(100.0) for _ in range(60)) == 50
    assert not b.take(100.01)  # 0.5 of a token so far
    assert b.take(100.02)  # 1 token after 1/50 s
    assert not b.take(100.02)
    assert sum(b.take(200.0) for _ in range(60)) == 50  # a long pause refills only up to the burst


def test_bucket_clock_going_backwards_mints_nothing() -> None:
    b = TokenBucket(1, now=10.0)
    assert b.take(10.0)
    assert not b.take(5.0)
    assert not b.take(10.5)
    assert b.take(11.0)


@given(
    st.floats(0.5, 1000),
    st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=200),
)
def test_bucket_never_admits_more_than_burst_plus_rate_times_elapsed(rate: float, gaps: list[float]) -> None:
    b = TokenBucket(rate, now=0.0)
    now, admitted = 0.0, 0
    for gap in gaps:
        now += gap
        admitted += b.take(now)
        assert admitted <= b.burst + rate * now + 1e-6
        assert 0 <= b.tokens <= b.burst


@given(st.floats(1, 100), st.integers(1, 50))
def test_bucket_admits_exactly_the_rate_when_paced(rate: float, seconds: int) -> None:
    """A client that asks exactly as fast as allowed is never refused."""
    b = TokenBucket(rate, now=0.0)
    for _ in range(int(b.burst)):
        assert b.take(0.0)
    steps = int(rate * seconds)
    assert all(b.take((k + 1) / rate) for k in range(steps))


def test_bucket_bad_values() -> None:
    with pytest.raises(ValueError, match="rate must be > 0"):
        TokenBucket(0, 0.0)
    with pytest.raises(ValueError, match="burst must be >= 1"):
        TokenBucket(2, 0.0, burst=0.5)
    slow = TokenBucket(0.5, 0.0)  # 30 a minute: one at a time, every two seconds
    assert slow.take(0.0) and not slow.take(1.9) and slow.take(2.0)


# -- client keys ----------------------------------------------------------------------------------------


def test_client_key_groups_ipv6_by_prefix_and_unmaps_ipv4() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("2001:db8::1", 128) == "2001:db8::1"
    assert client_key("fe80::1%eth0") == "fe80::/64"


# -- per-client limits ------------------------------------------------------------------------------------


def test_connection_limit_per_client() -> None:
    limits = ClientLimits(max_connections=2)
    assert limits.admit("192.0.2.1", 0.0) is None
    assert limits.admit("192.0.2.1", 0.0) is None
    assert limits.admit("192.0.2.1", 0.0) == CONNECTION_LIMIT
    assert limits.admit("192.0.2.2", 0.0) is None  # another client is not affected
    limits.release("192.0.2.1")
    assert limits.active("192.0.2.1") == 1
    assert limits.admit("192.0.2.1", 0.0) is None
    assert limits.admit("192.0.2.1", 0.0) == CONNECTION_LIMIT


def test_rate_limit_per_client() -> None:
    limits = ClientLimits(rate=5)
    results = [limits.admit("192.0.2.1", 0.0) for _ in range(7)]
    assert results == [None] * 5 + [RATE_LIMIT] * 2
    assert limits.admit("192.0.2.9", 0.0) is None
    assert limits.admit("192.0.2.1", 0.2) is None  # one token after 1/5 s
    assert limits.admit("192.0.2.1", 0.2) == RATE_LIMIT


def test_rate_is_kept_while_idle_between_connections() -> None:
    """Closing each connection at once must not reset the bucket (the idle table remembers it)."""
    limits = ClientLimits(rate=3)
    outcomes = []
    for _ in range(5):
        outcome = limits.admit("192.0.2.1", 0.0)
        outcomes.append(outcome)
        if outcome is None:
            limits.release("192.0.2.1", 0.0)
    assert outcomes == [None, None, None, RATE_LIMIT, RATE_LIMIT]


def test_connection_limit_checked_before_rate() -> None:
    limits = ClientLimits(max_connections=1, rate=2)
    assert limits.admit("192.0.2.1", 0.0) is None
    for _ in range(5):
        assert limits.admit("192.0.2.1", 0.0) == CONNECTION_LIMIT
    limits.release("192.0.2.1", 0.0)
    assert limits.admit("192.0.2.1", 0.0) is None  # the refusals above spent no tokens


def test_one_ipv6_host_cannot_escape_by_changing_address() -> None:
    limits = ClientLimits(max_connections=3)
    admitted = [limits.admit(f"2001:db8:0:1::{n:x}", 0.0) for n in range(1, 10)]
    assert admitted.count(None) == 3


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 400), st.booleans(), st.floats(0, 0.5)),
        max_size=400,
    )
)
def test_memory_is_bounded_by_open_connections_plus_max_idle(events: list[tuple[int, bool, float]]) -> None:
    limits = ClientLimits(max_connections=2, rate=2, max_idle=16)
    open_by: dict[str, int] = {}
    now = 0.0
    for source, release, gap in events:
        now += gap
        ip = f"198.51.{source // 256}.{source % 256}"
        if release and open_by.get(ip):
            limits.release(ip, now)
            open_by[ip] -= 1
        elif limits.admit(ip, now) is None:
            open_by[ip] = open_by.get(ip, 0) + 1
        busy = sum(1 for n in open_by.values() if n)
        assert len(limits) <= busy + 16
        assert all(limits.active(ip) == n for ip, n in open_by.items())
        assert all(n <= 2 for n in open_by.values())


def test_flood_of_sources_stays_bounded() -> None:
    """One connection from each of 200,000 sources leaves at most max_idle entries behind."""
    limits = ClientLimits(rate=1, max_idle=1000)
    for n in range(200_000):
        ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        assert limits.admit(ip, 0.0) is None
        limits.release(ip, 0.0)
    assert len(limits) == 1000


def test_full_buckets_are_forgotten() -> None:
    limits = ClientLimits(max_connections=5, rate=10)
    assert limits.admit("192.0.2.1", 0.0) is None
    limits.release("192.0.2.1", 5.0)  # refilled by the time it closed: nothing to remember
    assert len(limits) == 0
    without_rate = ClientLimits(max_connections=5)
    assert without_rate.admit("192.0.2.1", 0.0) is None
    without_rate.release("192.0.2.1", 0.0)
    assert len(without_rate) == 0


def test_extra_release_is_ignored() -> None:
    limits = ClientLimits(max_connections=1)
    limits.release("192.0.2.1")
    assert limits.admit("192.0.2.1", 0.0) is None
    assert limits.admit("192.0.2.1", 0.0) == CONNECTION_LIMIT


def test_limits_bad_values() -> None:
    with pytest.raises(ValueError, match="max_connections must be >= 1"):
        ClientLimits(max_connections=0)
    with pytest.raises(ValueError, match="rate must be > 0"):
        ClientLimits(rate=-1)
    with pytest.raises(ValueError, match="ipv6_prefix"):
        ClientLimits(ipv6_prefix=0)
