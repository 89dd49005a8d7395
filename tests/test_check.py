"""`portway check` is as strict as `serve`: whatever serve refuses before listening, check refuses too.

Each case runs both commands on the same file and expects the same located one-line message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
