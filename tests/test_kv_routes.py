"""The pure rules of the key-value providers: keys and values in, routes and problems out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway.config.load import load_config_text
from portway.errors import ConfigError
from portway.providers.etcd import prefix_range_end
from portway.providers.kv import BACKOFF_MAX_S, MAX_VALUE_BYTES, KVRouteTable, Outage, routes_from_kv
from portway.providers.redis import glob_escape, notify_flags_to_set


def test_one_key_per_route_read_like_a_file() -> None:
    out = routes_from_kv(
        "etcd",
        "/portway/",
        {
            "/portway/routes/ssh": b"port: 2222:22\nhost: 10.0.0.5\n",
            "/portway/routes/dns": b"scheme: udp\nport: '5353:53'\n",
            "/portway/pools/x": b"anything",  # not a route key: ignored, not reported
            "/portway/routesX": b"port: 1:1",
        },
    )
    assert set(out.routes) == {"ssh", "dns"}
    assert out.routes["ssh"].port.listening == 2222 and out.routes["ssh"].host == "10.0.0.5"
    assert out.routes["dns"].scheme == "udp"
    assert out.origins["ssh"] == "etcd key /portway/routes/ssh"
    assert out.problems == []


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("/p/routes/db", b"port: nope\n", "etcd key /p/routes/db: field 'port' at line 1: unknown service"),
        ("/p/routes/db", b"prot: 1:2\n", "field 'prot' at line 1: unknown key 'prot' (did you mean 'port'?)"),
        ("/p/routes/db", b"host: x\n", "etcd key /p/routes/db: field 'port' at line 1: is required"),
        ("/p/routes/db", b"- a\n", "the value must be a YAML mapping"),
        ("/p/routes/db", b"port: [\n", "not valid YAML"),
        ("/p/routes/db", b"\xff\xfe", "not UTF-8"),
        ("/p/routes/db", b"a: " + b"x" * MAX_VALUE_BYTES, f"over {MAX_VALUE_BYTES}"),
        ("/p/routes/", b"port: 1:2", "names no route"),
        ("/p/routes/a/b", b"port: 1:2", "contains '/'"),
        ("/p/routes/-x", b"port: 1:2", "is not usable"),
        ("/p/routes/sp ace", b"port: 1:2", "is not usable"),
    ],
)
def test_a_bad_key_names_store_key_field_and_reason(key: str, value: bytes, expected: str) -> None:
    out = routes_from_kv("etcd", "/p/", {key: value, "/p/routes/good": b"port: 7000:22\n"})
    assert list(out.routes) == ["good"], "one bad key never takes the others down"
    [problem] = out.problems
    assert expected in problem and problem.startswith(f"etcd key {key}") and problem.endswith("; skipped")
    assert "\n" not in problem


def test_problems_are_reported_once_per_key_and_value() -> None:
    table = KVRouteTable("redis", "p/")
    changed, fresh = table.replace({"p/routes/a": b"port: 7001:1", "p/routes/bad": b"port: x"})
    assert changed and len(fresh) == 1 and "redis key p/routes/bad" in fresh[0]
    assert table.replace(dict(table.items)) == (False, []), "a re-read of the same snapshot says nothing"
    changed, fresh = table.apply({"p/routes/b": b"port: 7002:1"}, set())
    assert changed and fresh == [], "another key's change does not repeat the old complaint"
    _, fresh = table.apply({"p/routes/bad": b"port: y"}, set())
    assert len(fresh) == 1 and "'y'" in fresh[0], "a new bad value is a new problem"
    table.apply({"p/routes/bad": b"port: 7003:1"}, set())
    _, fresh = table.apply({"p/routes/bad": b"port: y"}, set())
    assert len(fresh) == 1, "broken again after a fix: reported again"
    changed, _ = table.apply({}, {"p/routes/a"})
    assert changed and "a" not in table.current.routes, "a deleted key removes its route"


def test_outage_is_said_once_and_backs_off_to_a_ceiling() -> None:
    outage = Outage()
    waits = []
    firsts = []
    for _ in range(10):
        first, wait = outage.failed()
        firsts.append(first)
        waits.append(wait)
    assert firsts == [True] + [False] * 9
    assert waits[:4] == [0.5, 1.0, 2.0, 4.0] and waits[-1] == BACKOFF_MAX_S
    assert outage.succeeded() is True and outage.succeeded() is False
    assert outage.failed() == (True, 0.5)


@given(st.binary(min_size=1, max_size=8), st.binary(max_size=8))
def test_prefix_range_end_selects_exactly_the_keys_with_the_prefix(prefix: bytes, rest: bytes) -> None:
    end = prefix_range_end(prefix)
    key = prefix + rest
    assert prefix <= key and (end == b"\0" or key < end)


@given(st.binary(min_size=1, max_size=4), st.binary(min_size=1, max_size=8))
def test_prefix_range_end_excludes_keys_without_the_prefix(prefix: bytes, other: bytes) -> None:
    end = prefix_range_end(prefix)
    if not other.startswith(prefix) and end != b"\0":
        assert not (prefix <= other < end)


@given(st.dictionaries(st.text(max_size=30), st.binary(max_size=60), max_size=8))
def test_any_snapshot_gives_routes_or_problems_never_an_exception(items: dict[str, bytes]) -> None:
    out = routes_from_kv("redis", "", items)
    assert len(out.routes) + len(out.problems) == sum(1 for k in items if k.startswith("routes/"))


def test_redis_patterns_and_notification_flags() -> None:
    assert glob_escape("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"
    assert notify_flags_to_set("") == "K$gxe"
    assert notify_flags_to_set("Ex") == "ExK$ge", "existing flags are kept, ours added"
    assert notify_flags_to_set("KA") is None and notify_flags_to_set("K$gxe") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("etcd: {endpoints: []}", "field 'providers.etcd.endpoints': List should have at least 1 item"),
        ("etcd: {endpoints: [tcp://x:1]}", "must be http://host:port or https://host:port"),
        ("etcd: {endpoints: ['http://a:1'], prefix: /x}", "prefix '/x' must end with '/'"),
        ("etcd: {endpoints: ['http://a:1'], cert: c.pem}", "cert and key go together"),
        ("etcd: {endpoints: ['http://a:1'], username: u}", "username and password_file go together"),
        (
            "etcd: {endpoints: ['http://a:1'], username: u, password_file: p, cert: c, key: k}",
            "use either username/password_file or a client certificate",
        ),
        ("etcd: {endpoint: ['http://a:1']}", "unknown key 'endpoint' (did you mean 'endpoints'?)"),
        ("redis: {url: http://x}", "field 'providers.redis.url': url must be redis://"),
        ("redis: {url: 'redis://x', poll_interval: 0s}", "field 'providers.redis.poll_interval'"),
    ],
)
def test_store_settings_errors_name_the_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(f"providers:\n  {text}\n", "portway.yml")
    assert expected in str(caught.value) and str(caught.value).startswith("portway.yml:")


def test_store_settings_defaults() -> None:
    config = load_config_text(
        "providers:\n  etcd: {endpoints: ['http://127.0.0.1:2379/']}\n  redis: {url: 'redis://h/1'}\n", "t"
    )
    assert config.providers.etcd is not None and config.providers.redis is not None
    assert config.providers.etcd.endpoints == ["http://127.0.0.1:2379"]
    assert config.providers.etcd.prefix == "/portway/" and config.providers.redis.prefix == "portway/"
    assert config.providers.redis.poll_interval == 5.0


_keys = st.sampled_from(["p/routes/a", "p/routes/b", "p/routes/c", "p/other"])
_values = st.sampled_from([b"port: 7001:1", b"port: 7002:1", b"port: bad", b"scheme: udp\nport: 7003:1"])


@given(st.lists(st.tuples(_keys, st.one_of(st.none(), _values)), max_size=12))
def test_changes_applied_one_by_one_equal_reading_the_result(changes: list[tuple[str, bytes | None]]) -> None:
    """A watch (deltas) and a re-read (whole snapshots) must agree, or an instance could drift."""
    followed = KVRouteTable("etcd", "p/")
    truth: dict[str, bytes] = {}
    for key, value in changes:
        if value is None:
            truth.pop(key, None)
            followed.apply({}, {key})
        else:
            truth[key] = value
            followed.apply({key: value}, set())
    reread = KVRouteTable("etcd", "p/")
    reread.replace(truth)
    assert followed.current.routes == reread.current.routes
    assert followed.current.problems == reread.current.problems
    assert followed.replace(truth)[0] is False, "re-reading what the deltas built changes nothing"
