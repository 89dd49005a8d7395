"""`portway serve` with `admin:` and `access_log:` as a user runs it: systemd readiness through a
fake NOTIFY_SOCKET, reload counting, SIGUSR1, `portway status`, and with `workers: 2` the admin
listener answering for every worker."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import current_loop_kind
from tests.polling import eventually
from tests.ports import free_port
from tests.portway_process import PortwayProcess, route_yaml, run_cli
from tests.targets import TCPEchoTarget

TOKEN = "serve-token"


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket named in $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def next(self, timeout: float = 15.0) -> str:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), timeout)
        return data.decode()

    def pending(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


@pytest.fixture
def notify(tmp_path: Path) -> AsyncIterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n  # type: ignore[misc]
    n.sock.close()


def http_get(url: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


async def metric(base: str, name: str, **labels: str) -> float | None:
    status, body = await asyncio.to_thread(http_get, base + "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def write_config(tmp_path: Path, echo: TCPEchoTarget, admin_port: int, *, workers: int = 1) -> Path:
    token = tmp_path / "admin.token"
    token.write_text(TOKEN + "\n")
    config = tmp_path / "portway.yml"
    config.write_text(
        f"workers: {workers}\n"
        f"admin:\n  listen: 127.0.0.1:{admin_port}\n  token_file: {token}\n"
        f"access_log:\n  path: {tmp_path / 'access.log'}\n  format: json\n"
        "routes:\n" + route_yaml("t", scheme="tcp4", port=f"0:{echo.port}")
    )
    return config


async def test_one_process(tmp_path: Path, tcp_echo: TCPEchoTarget, notify: NotifySocket) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path, tcp_echo, port)
    pw = await PortwayProcess.serve(config, current_loop_kind(), env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        assert await notify.next() == "READY=1"
        await pw.wait_for("portway serving")
        assert await metric(base, "portway_config_reloads_total", result="success") == 0
        assert (await metric(base, "portway_config_last_reload_success_timestamp_seconds") or 0) > 0
        assert (await metric(base, "process_open_fds") or 0) > 0

        # A reload: RELOADING=1 then READY=1 to systemd, and counted.
        seen = len(pw.records)
        pw.proc.send_signal(signal.SIGHUP)
        assert (await notify.next()).startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert await notify.next() == "READY=1"
        await pw.wait_for("reload applied", after=seen)
        assert await metric(base, "portway_config_reloads_total", result="success") == 1

        # A refused reload is counted as a failure; the routes keep serving.
        good = config.read_text()
        config.write_text(good + "  broken: {port: nope}\n")
        pw.proc.send_signal(signal.SIGHUP)
        assert (await notify.next()).startswith("RELOADING=1")
        assert await notify.next() == "READY=1"  # sent once the refusal is decided and counted
        assert await metric(base, "portway_config_reloads_total", result="failure") == 1
        assert any(str(r.get("event", "")).startswith("reload refused") for r in pw.records)
        config.write_text(good)

        # SIGUSR1 reopens the access log; the process lives on.
        (tmp_path / "access.log").rename(tmp_path / "access.log.1")
        pw.proc.send_signal(signal.SIGUSR1)
        status, body = await asyncio.to_thread(http_get, base + "/api/status")
        assert status == 200 and json.loads(body)["process"]["last_reload_result"] in ("failure", "success")
        assert pw.proc.returncode is None

        # `portway status` reads the same document.
        token_file = str(tmp_path / "admin.token")
        code, out, err = await run_cli("status", "--admin", f"127.0.0.1:{port}", "--token-file", token_file)
        assert code == 0, err
        assert out.startswith("portway 0.1.0") and "ROUTE" in out
        code, out, _ = await run_cli(
            "status", "--admin", f"127.0.0.1:{port}", "--json", "--token-file", token_file
        )
        assert code == 0 and json.loads(out)["process"]["workers"] == 1
        code, _, err = await run_cli("status", "--admin", f"127.0.0.1:{port}")
        assert (
            code == 1 and err.strip() == f"portway: error: {base}: HTTP 401 Unauthorized (give --token-file)"
        )
    finally:
        assert await pw.stop() == 0
    assert "STOPPING=1" in notify.pending()


async def test_status_cli_without_a_listener(tmp_path: Path) -> None:
    port = free_port()
    code, out, err = await run_cli("status", "--admin", f"127.0.0.1:{port}")
    assert code == 1 and out == ""
    assert err.startswith(f"portway: error: http://127.0.0.1:{port}: cannot reach the admin listener:")
    assert "Traceback" not in err
    missing = tmp_path / "no-token"
    code, out, err = await run_cli("status", "--admin", f"127.0.0.1:{port}", "--token-file", str(missing))
    assert code == 2
    assert err == f"portway: error: --token-file: cannot read {missing}: No such file or directory\n"


async def test_admin_port_in_use_fails_the_start(tmp_path: Path, tcp_echo: TCPEchoTarget) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        config = write_config(tmp_path, tcp_echo, taken)
        code, _, err = await run_cli("serve", "-c", str(config), "--loop", current_loop_kind())
    assert code == 1
    assert f"admin: cannot listen on 127.0.0.1:{taken}" in err and "Traceback" not in err


async def test_two_workers_one_admin(tmp_path: Path, tcp_echo: TCPEchoTarget, notify: NotifySocket) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path, tcp_echo, port, workers=2)
    pw = await PortwayProcess.serve(config, current_loop_kind(), env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        assert await notify.next() == "READY=1"  # from the supervisor, once all workers serve
        await pw.wait_for("workers serving")

        # Both workers publish; worker 0 answers for both.
        async def both_published() -> bool:
            return await metric(base, "portway_worker_open_fds", worker="1") is not None

        await eventually(both_published)
        assert await metric(base, "portway_worker_open_fds", worker="0") is not None
        status, body = await asyncio.to_thread(http_get, base + "/api/status")
        assert status == 200 and json.loads(body)["process"]["workers"] == 2
        pw.proc.send_signal(signal.SIGUSR1)  # forwarded; the workers reopen, nobody dies
        seen = len(pw.records)
        pw.proc.send_signal(signal.SIGHUP)
        assert (await notify.next()).startswith("RELOADING=1")
        assert await notify.next() == "READY=1"
        await pw.wait_for("reload applied", after=seen)

        # Every worker reloads; the reload is counted once.
        async def counted_once() -> bool:
            return await metric(base, "portway_config_reloads_total", result="success") == 1

        await eventually(counted_once)
        assert not [r for r in pw.records if r.get("action") == "restart"]
        assert notify.pending() == []  # workers never talk to systemd
    finally:
        assert await pw.stop() == 0
