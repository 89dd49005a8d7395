"""The CLI as a user runs it: a subprocess, real sockets, signals, exit statuses."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from portway import __version__
from tests.conftest import current_loop_kind
from tests.ports import free_port
from tests.portway_process import PORTWAY, PortwayProcess, route_yaml, run_cli
from tests.targets import TCPEchoTarget, UDPClient, UDPEchoTarget


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "portway.yml"
    path.write_text(text)
    return path


async def test_serve_forwards_and_stops_on_sigterm(
    tmp_path: Path, tcp_echo: TCPEchoTarget, udp_echo: UDPEchoTarget
) -> None:
    config = write(
        tmp_path,
        "routes:\n"
        + route_yaml("t", scheme="tcp4", port=f"0:{tcp_echo.port}")
        + route_yaml("u", scheme="udp4", port=f"0:{udp_echo.port}"),
    )
    pw = await PortwayProcess.serve(config, current_loop_kind())
    try:
        ready = await pw.wait_for("portway serving")
        assert ready["loop"] == current_loop_kind()
        assert (ready["version"], ready["config"]) == (__version__, str(config))
        # One INFO line per route, with the actual (OS-picked) listen address and the log fields.
        assert set(pw.started) == {"t", "u"}
        for name, proto in (("t", "tcp4->tcp4"), ("u", "udp4->udp4")):
            rec = pw.started[name]
            assert rec["level"] == "info" and rec["protocol"] == proto and rec["action"] == "start"
            assert pw.port_of(name) != 0
        assert pw.started["t"]["dst"] == f"127.0.0.1:{tcp_echo.port}"

        reader, writer = await asyncio.open_connection("127.0.0.1", pw.port_of("t"))
        writer.write(b"through the cli")
        assert await reader.readexactly(15) == b"through the cli"
        client = await UDPClient.connect("127.0.0.1", pw.port_of("u"))
        client.send(b"datagram")
        assert await client.recv() == b"datagram"

        loop = asyncio.get_running_loop()
        start = loop.time()
        status = await pw.stop()
        assert status == 0
        assert loop.time() - start < 5  # "within a few seconds", live connection and all
        assert await asyncio.wait_for(reader.read(-1), 5) == b""
        writer.close()
        client.close()
        events = [r["event"] for r in pw.records]
        assert "accepted" in events and "shutting down" in events
        assert events.count("route stopped") == 2
    finally:
        await pw.stop()


async def test_bind_failure_names_route_and_address_and_serves_nothing(
    tmp_path: Path, tcp_echo: TCPEchoTarget
) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    busy = blocker.getsockname()[1]
    free = free_port()
    config = write(
        tmp_path,
        "routes:\n"
        + route_yaml("first", scheme="tcp4", port=f"{free}:{tcp_echo.port}")
        + route_yaml("clash", scheme="tcp4", port=f"{busy}:{tcp_echo.port}"),
    )
    try:
        status, _out, err = await run_cli("serve", "-c", str(config), "--loop", current_loop_kind())
        assert status == 1
        assert f"route 'clash': cannot listen on 127.0.0.1:{busy}/tcp: address already in use" in err
        assert "Traceback" not in err
        # Nothing half-started: the route that could bind is not left listening.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", free), timeout=1).close()
    finally:
        blocker.close()


async def test_unresolvable_target_is_a_clear_error(tmp_path: Path) -> None:
    config = write(tmp_path, "routes:\n  r:\n    host: no-such-host.invalid\n    port: 0:22\n")
    status, _out, err = await run_cli("serve", "-c", str(config), "--loop", current_loop_kind())
    assert status == 2  # found before listening, like every config error (see test_check.py)
    assert (
        f"{config}:3:11, route 'r', field 'host': target host 'no-such-host.invalid' does not resolve" in err
    )
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("routes:\n  a:\n    prot: 22\n", "unknown key 'prot' (did you mean 'port'?)"),
        ("routes:\n  a:\n    port: 1:2:3\n", "malformed port '1:2:3'"),
        ("routes: [\n", "not valid YAML"),
    ],
)
async def test_bad_config_exits_2_with_one_line(tmp_path: Path, text: str, expected: str) -> None:
    config = write(tmp_path, text)
    for command in ("serve", "check"):
        status, out, err = await run_cli(command, "-c", str(config))
        assert status == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"portway: error: {config}:")
        assert expected in lines[0]
        assert out == ""


async def test_missing_file_exits_2(tmp_path: Path) -> None:
    status, _out, err = await run_cli("serve", "-c", str(tmp_path / "absent.yml"))
    assert status == 2
    assert err.strip() == f"portway: error: {tmp_path / 'absent.yml'}: no such file"


async def test_check_prints_routes(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "routes:\n  ssh-proxy:\n    scheme: tcp4\n    host: 10.0.0.3\n    bind: 0.0.0.0\n    port: 2222:22\n"
        "  dns-proxy:\n    scheme: udp4\n    port: 5353:53\n",
    )
    status, out, _err = await run_cli("check", "-c", str(config))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ROUTE", "SCHEME", "LISTEN", "TARGET", "OPTIONS"]
    assert lines[1].split()[:4] == ["ssh-proxy", "tcp4", "0.0.0.0:2222", "10.0.0.3:22"]
    assert lines[2].split()[:4] == ["dns-proxy", "udp4", "0.0.0.0:5353", "localhost:53"]
    assert "2 route(s), OK" in out


async def test_version() -> None:
    status, out, _ = await run_cli("--version")
    assert status == 0 and out.strip() == f"portway, version {__version__}"


async def test_console_logs_are_human_readable(tmp_path: Path, tcp_echo: TCPEchoTarget) -> None:
    config = write(tmp_path, "routes:\n" + route_yaml("t", scheme="tcp4", port=f"0:{tcp_echo.port}"))
    proc = await asyncio.create_subprocess_exec(
        *PORTWAY,
        "serve",
        "-c",
        str(config),
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
    proc.terminate()
    await proc.wait()
    assert " INFO  route started  route=t action=start protocol=tcp4->tcp4 listen=127.0.0.1:" in line


async def test_fatal_errors_are_json_under_json_logs(tmp_path: Path) -> None:
    config = write(tmp_path, "routes:\n  r:\n    host: no-such-host.invalid\n    port: 0:22\n")
    status, _out, err = await run_cli("serve", "-c", str(config), "--log-format", "json")
    assert status == 2
    [line] = err.splitlines()
    record = json.loads(line)
    assert record["level"] == "error" and record["action"] == "fatal" and record["status"] == 2
    assert (record["file"], record["line"], record["column"]) == (str(config), 3, 11)
    assert (record["route"], record["field"]) == ("r", "host")
    assert record["error"].startswith("target host 'no-such-host.invalid' does not resolve: ")
    assert record["event"] == f"{config}:3:11, route 'r', field 'host': {record['error']}"


async def test_runtime_failures_are_json_under_json_logs(tmp_path: Path, tcp_echo: TCPEchoTarget) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    busy = blocker.getsockname()[1]
    config = write(tmp_path, "routes:\n" + route_yaml("clash", scheme="tcp4", port=f"{busy}:{tcp_echo.port}"))
    try:
        status, _out, err = await run_cli("serve", "-c", str(config), "--log-format", "json")
    finally:
        blocker.close()
    assert status == 1
    records = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    fatal = records[-1]
    assert (fatal["level"], fatal["action"], fatal["status"]) == ("error", "fatal", 1)
    assert fatal["event"] == f"route 'clash': cannot listen on 127.0.0.1:{busy}/tcp: address already in use"


@pytest.mark.parametrize(
    ("kind", "option"), [(socket.SOCK_STREAM, "--tcp-port"), (socket.SOCK_DGRAM, "--udp-port")]
)
async def test_demo_port_taken_says_which_option_picks_another(kind: int, option: str) -> None:
    blocker = socket.socket(socket.AF_INET, kind)
    blocker.bind(("127.0.0.1", 0))
    busy = blocker.getsockname()[1]
    ports = {"--tcp-port": "0", "--udp-port": "0", option: str(busy)}
    try:
        status, _out, err = await run_cli("demo", *(x for kv in ports.items() for x in kv))
    finally:
        blocker.close()
    assert status == 1
    proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
    assert err.splitlines()[-1].endswith(
        f"cannot listen on 127.0.0.1:{busy}/{proto}: address already in use "
        f"(pick another port with `portway demo {option} PORT`)"
    )


async def test_serve_help_mentions_reloading_on_sighup() -> None:
    status, out, _ = await run_cli("serve", "--help")
    assert status == 0
    assert "SIGHUP" in out and "kill -HUP <pid>" in out
    assert "a second signal stops at once" in out
