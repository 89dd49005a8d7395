"""`portway check` is as strict as `serve`: whatever serve refuses before listening, check refuses too.

Each case runs both commands on the same file and expects the same located one-line message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from portway.config.describe import route_options, summary_lines
from portway.config.load import load_config_text
from tests.portway_process import run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "portway.yml"
    path.write_text(text)
    return path


async def refused_alike(config: Path, expected: str) -> None:
    for command in ("check", "serve"):
        status, out, err = await run_cli(command, "-c", str(config))
        assert status == 2, (command, err)
        assert err.splitlines() == [f"portway: error: {config}:{expected}"], command
        assert out == ""


async def test_missing_geoip_database(tmp_path: Path) -> None:
    missing = tmp_path / "absent.mmdb"
    config = write(
        tmp_path,
        "routes:\n  r:\n    host: 127.0.0.1\n    port: 0:1\n"
        f"    acl:\n      allow: [country:GB]\n      geoip:\n        database: {missing}\n",
    )
    await refused_alike(
        config, f"8:19, route 'r', field 'acl.geoip.database': GeoIP database '{missing}' does not exist"
    )


async def test_global_acl_log_in_a_missing_directory(tmp_path: Path) -> None:
    log = tmp_path / "no-such-dir" / "acl.log"
    config = write(
        tmp_path,
        f"acl:\n  log:\n    path: {log}\nroutes:\n  a:\n    host: 127.0.0.1\n    port: 0:1\n"
        "  b:\n    host: 127.0.0.1\n    port: 0:2\n",
    )
    # Once, at the global ACL, not once per route using it.
    await refused_alike(
        config,
        f"3:11, field 'acl.log.path': ACL log file '{log}' cannot be opened: No such file or directory",
    )


async def test_route_acl_log_in_a_missing_directory(tmp_path: Path) -> None:
    log = tmp_path / "no-such-dir" / "acl.log"
    config = write(
        tmp_path, f"routes:\n  r:\n    host: 127.0.0.1\n    port: 0:1\n    acl:\n      log: {{path: {log}}}\n"
    )
    await refused_alike(
        config,
        f"6:19, route 'r', field 'acl.log.path': ACL log file '{log}' cannot be opened: "
        "No such file or directory",
    )


UNRESOLVABLE = "routes:\n  r:\n    host: no-such-host.invalid\n    port: 0:22\n"
RESOLVE_MESSAGE = "3:11, route 'r', field 'host': target host 'no-such-host.invalid' does not resolve: "


@pytest.mark.parametrize("command", ["check", "serve"])
async def test_unresolvable_target(tmp_path: Path, command: str) -> None:
    config = write(tmp_path, UNRESOLVABLE)
    status, out, err = await run_cli(command, "-c", str(config))
    assert status == 2
    [line] = err.splitlines()
    assert line.startswith(f"portway: error: {config}:{RESOLVE_MESSAGE}")
    assert out == ""


async def test_offline_check_warns_about_names_and_still_refuses_the_rest(tmp_path: Path) -> None:
    config = write(tmp_path, UNRESOLVABLE)
    status, out, err = await run_cli("check", "--offline", "-c", str(config))
    assert status == 0
    [line] = err.splitlines()
    assert line.startswith(f"portway: warning: {config}:{RESOLVE_MESSAGE}")
    assert "1 route(s), OK" in out
    log = tmp_path / "missing" / "acl.log"
    config.write_text(UNRESOLVABLE + f"    acl: {{log: {{path: {log}}}}}\n")
    status, _out, err = await run_cli("check", "--offline", "-c", str(config))
    assert status == 2
    assert err.splitlines()[-1] == (
        f"portway: error: {config}:5:23, route 'r', field 'acl.log.path': "
        f"ACL log file '{log}' cannot be opened: No such file or directory"
    )


async def test_errors_in_an_included_file_name_that_file(tmp_path: Path) -> None:
    (tmp_path / "more.yml").write_text("r:\n  host: no-such-host.invalid\n  port: 0:22\n")
    config = write(tmp_path, "providers:\n  include: [more.yml]\n")
    status, _out, err = await run_cli("check", "-c", str(config))
    assert status == 2
    assert err.startswith(
        f"portway: error: {tmp_path / 'more.yml'}:2:9, route 'r', field 'host': "
        "target host 'no-such-host.invalid'"
    )


SHOWN = """\
workers: auto
grace_period: 30s
acl:
  default: deny
  allow: [cidr:192.0.2.0/24]
  log: {path: /var/log/portway-acl.log}
entrypoint:
  proxy_protocol: {mode: required, trusted_proxies: [127.0.0.1, 2001:db8::/32]}
providers:
  docker: {local: unix:///var/run/docker.sock}
routes:
  ssh:
    host: 127.0.0.1
    port: 2222:22
    idle_timeout: 1h
    relay_proxy_protocol_header: true
    proxy_protocol_version: 1
  web:
    host: www.example.com
    port: 8443:443
    resolve_interval: 0
    proxy_protocol: {mode: mixed}
    half_close: false
  dns:
    scheme: udp
    host: localhost
    port: 5353:53
    acl: {default: allow, allow_local: false, deny: [cidr:192.0.2.7/32, cidr:198.51.100.0/24]}
"""


def test_check_shows_what_each_route_runs() -> None:
    config = load_config_text(SHOWN, "f.yml")
    assert route_options(config, config.routes["ssh"]) == (
        "acl=global pp_receive=required(entrypoint,trusted=127.0.0.1|2001:db8::/32) pp_relay=v1 "
        "connect_timeout=5s idle=1h"
    )
    assert route_options(config, config.routes["web"]) == (
        "acl=global pp_receive=mixed(route,trusted=none) connect_timeout=5s idle=off half_close=off "
        "resolve=on-failure"
    )
    assert route_options(config, config.routes["dns"]) == (
        "acl=route(default=allow,no_local,allow=0,deny=2) idle=5m max_sessions=10000 resolve=1m"
    )


def test_check_summarises_the_process_wide_settings() -> None:
    assert summary_lines(load_config_text(SHOWN, "f.yml")) == [
        "workers: auto (one per CPU)",
        "grace_period: 30s (reload drains and shutdown)",
        "acl (global): default=deny,allow_local,allow=1,deny=0, log /var/log/portway-acl.log",
        "proxy_protocol (entrypoint): required, trusted 127.0.0.1|2001:db8::/32, header_timeout 5s",
        "providers: include none; docker local=unix:///var/run/docker.sock",
    ]
    assert summary_lines(load_config_text("workers: 3\n", "f.yml")) == [
        "workers: 3",
        "grace_period: 10s (reload drains and shutdown)",
        "acl (global): none, every client admitted unless a route has its own",
        "proxy_protocol (entrypoint): disabled",
        "providers: include none; docker none",
    ]


async def test_check_prints_table_then_summary(tmp_path: Path) -> None:
    config = write(tmp_path, "workers: 2\nroutes:\n  a:\n    host: 127.0.0.1\n    port: 0:22\n")
    status, out, err = await run_cli("check", "-c", str(config))
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "ROUTE  SCHEME  LISTEN                  TARGET        OPTIONS",
        "a      tcp     [::]:0 (any free port)  127.0.0.1:22  connect_timeout=5s idle=off",
        "",
        "workers: 2",
        "grace_period: 10s (reload drains and shutdown)",
        "acl (global): none, every client admitted unless a route has its own",
        "proxy_protocol (entrypoint): disabled",
        "providers: include none; docker none",
        "",
        f"{config}: 1 route(s), OK",
    ]
