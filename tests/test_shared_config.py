"""The shared-port and TLS configuration contract: what is accepted, what is refused and how the
refusal names the routes and the field, what `portway check` shows, and how a reload regroups."""

from __future__ import annotations

from pathlib import Path

import pytest

from portway.config.describe import describe
from portway.config.load import load_config_text
from portway.errors import ConfigError
from portway.reload import plan_reload, shared_groups_changed
from tests.test_check import refused_alike, write
from tests.tls_material import Authority

BASE = """routes:
  a:
    port: 8443:1
    host: 127.0.0.1
    match: {sni: [a.example.com]}
  web:
    port: 8443:2
    host: 127.0.0.1
"""


def load(text: str) -> object:
    return load_config_text(text, "s.yml")


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "s.yml")
    return str(info.value)


def test_routes_told_apart_by_match_share_a_listener() -> None:
    config = load_config_text(BASE + "  ssh:\n    port: 8443:22\n    match: {protocol: ssh}\n", "s.yml")
    assert set(config.routes) == {"a", "web", "ssh"}


def test_identical_matches_and_two_fallbacks_name_both_routes() -> None:
    same = BASE + "  b:\n    port: 8443:3\n    match: {sni: [A.EXAMPLE.COM]}\n"
    assert "route 'b', field 'match.sni': routes 'a' and 'b' match the same connections" in refused(same)
    two = BASE + "  other:\n    port: 8443:3\n"
    assert "routes 'web' and 'other' are both the fallback" in refused(two)


def test_same_name_with_and_without_alpn_is_allowed() -> None:
    load(BASE + "  pg:\n    port: 8443:3\n    match: {sni: [a.example.com], alpn: [postgresql]}\n")


def test_listener_settings_must_agree() -> None:
    text = BASE.replace("    host: 127.0.0.1\n\n", "") + "    peek_timeout: 1s\n"
    message = refused(text)
    assert "route 'web', field 'peek_timeout'" in message and "route 'a'" in message
    pp = BASE + "    proxy_protocol: {mode: required, trusted_proxies: [127.0.0.1]}\n"
    assert "route 'web', field 'proxy_protocol'" in refused(pp)


def test_no_match_on_either_route_is_still_a_port_conflict() -> None:
    text = "routes:\n  x:\n    port: 9000:1\n  y:\n    port: 9000:2\n"
    assert "listens on the same address and protocol as route 'x'" in refused(text)


def test_different_bind_addresses_do_not_share() -> None:
    """0.0.0.0 and 127.0.0.1 on one port overlap but are two sockets: not a shared listener."""
    text = BASE.replace(
        "    host: 127.0.0.1\n    match", "    bind: 127.0.0.1\n    host: 127.0.0.1\n    match"
    )
    text = text.replace("port: 8443:1", "port: 8443:1\n    scheme: tcp4").replace(
        "port: 8443:2", "port: 8443:2\n    scheme: tcp4"
    )
    assert "listens on the same address" in refused(text)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("    scheme: udp\n    port: 53:53\n    tls: {cert: c, key: k}\n", "a UDP route cannot have it"),
        ("    port: 0:1\n    match: {protocol: ssh}\n", "needs a fixed listening port"),
        ("    port: 1:1\n    tls: {cert: c}\n", "cert and key go together"),
        ("    port: 1:1\n    tls: {cert: c, key: k, verify: false}\n", "need relay: true"),
        ("    port: 1:1\n    match: {sni: [a.example.com], protocol: ssh}\n", "can never match"),
        ("    port: 1:1\n    match: {protocol: smtp}\n", "match.protocol"),
    ],
)
def test_refused_blocks(extra: str, expected: str) -> None:
    assert expected in refused("routes:\n  r:\n" + extra)


def test_check_shows_each_routes_match() -> None:
    text = describe(
        load_config_text(BASE + "  ssh:\n    port: 8443:22\n    match: {protocol: ssh}\n", "s.yml")
    )
    assert "match=sni=a.example.com peek_timeout=3s" in text
    assert "match=fallback" in text
    assert "match=protocol=ssh" in text


async def test_check_and_serve_refuse_a_mismatched_key_alike(tmp_path: Path) -> None:
    ca = Authority(tmp_path, "ca")
    a, b = ca.issue("a.example.com"), ca.issue("b.example.com")
    config = write(tmp_path, f"routes:\n  t:\n    port: 1:1\n    host: 127.0.0.1\n    tls:\n"
                             f"      cert: {a.cert}\n      key: {b.key}\n")  # fmt: skip
    await refused_alike(
        config,
        f"6:7, route 't', field 'tls': certificate {a.cert} with key {b.key}: "
        "the key does not belong to the certificate",
    )


def test_a_changed_route_rebuilds_its_whole_shared_listener() -> None:
    old = load_config_text(BASE + "  x:\n    port: 9000:1\n", "s.yml").routes
    slower = BASE.replace("a.example.com]}\n", "a.example.com]}\n    connect_timeout: 2s\n")
    new = load_config_text(slower + "  x:\n    port: 9000:1\n", "s.yml").routes
    plan = plan_reload(old, new)
    regroup = shared_groups_changed(old, new, plan)
    assert regroup == {"a", "web"}
    assert plan_reload(old, new, replace=regroup).changed == ("a", "web")
    # a pool-only change keeps the listener and the stream
    moved = load_config_text(BASE.replace("host: 127.0.0.1\n    match", "host: 127.0.0.2\n    match") +
                             "  x:\n    port: 9000:1\n", "s.yml").routes  # fmt: skip
    plan = plan_reload(old, moved)
    assert plan.retargeted == ("a",) and shared_groups_changed(old, moved, plan) == set()
