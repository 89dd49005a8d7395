"""Worker processes sharing listeners with SO_REUSEPORT, supervised by the main process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from pathlib import Path

from tests.conftest import current_loop_kind
from tests.ports import free_port
from tests.portway_process import PortwayProcess, route_yaml, run_cli
from tests.targets import TCPEchoTarget, UDPClient, UDPEchoTarget


def tcp_sockets(pid: int) -> int:
    """How many sockets a process holds (each proxied connection holds two)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def start(tmp_path: Path, tcp: TCPEchoTarget, udp: UDPEchoTarget, workers: int = 2) -> PortwayProcess:
    config = tmp_path / "w.yml"
    config.write_text(
        f"workers: {workers}\nroutes:\n"
        + route_yaml("t", scheme="tcp4", port=f"0:{tcp.port}")
        + route_yaml("u", scheme="udp4", port=f"0:{udp.port}")
    )
    pw = await PortwayProcess.serve(config, current_loop_kind())
    await pw.wait_for("workers serving", timeout=20)
    return pw


async def test_workers_share_each_listener(
    tmp_path: Path, tcp_echo: TCPEchoTarget, udp_echo: UDPEchoTarget
) -> None:
    pw = await start(tmp_path, tcp_echo, udp_echo)
    try:
        ready = await pw.wait_for("workers serving")
        pids = ready["pids"]
        assert len(pids) == 2
        starts = [r for r in pw.records if r.get("event") == "route started" and r["route"] == "t"]
        assert {r["worker"] for r in starts} == {0, 1}
        assert len({r["listen"] for r in starts}) == 1  # port 0 was picked once, for both workers
        port = pw.port_of("t")
        baseline = {pid: tcp_sockets(pid) for pid in pids}
        held = []
        for i in range(40):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"%d" % i)
            assert await reader.readexactly(len(b"%d" % i)) == b"%d" % i
            held.append(writer)
        # The kernel spread the connections over both workers.
        for pid in pids:
            assert tcp_sockets(pid) - baseline[pid] >= 4, "one worker got (almost) nothing"
        for writer in held:
            writer.close()
        # A UDP client stays with one worker: the target sees one session, one source port.
        client = await UDPClient.connect("127.0.0.1", pw.port_of("u"))
        for i in range(20):
            client.send(b"q%d" % i)
            assert await client.recv() == b"q%d" % i
        assert len(udp_echo.sources) == 1
        client.close()
    finally:
        assert await pw.stop() == 0
    for pid in pids:
        assert gone(pid), "a worker outlived SIGTERM"


async def test_crashed_worker_is_restarted(
    tmp_path: Path, tcp_echo: TCPEchoTarget, udp_echo: UDPEchoTarget
) -> None:
    pw = await start(tmp_path, tcp_echo, udp_echo)
    try:
        ready = await pw.wait_for("workers serving")
        victim = ready["pids"][0]
        mark = len(pw.records)
        os.kill(victim, signal.SIGKILL)
        restart = await pw.wait_for("worker exited; restarting", after=mark)
        assert restart["pid"] == victim and restart["status"] == -signal.SIGKILL
        await pw.wait_for("portway serving", after=mark)  # the replacement is up
        for _ in range(10):  # every connection is served, whichever worker the kernel picks
            reader, writer = await asyncio.open_connection("127.0.0.1", pw.port_of("t"))
            writer.write(b"alive")
            assert await reader.readexactly(5) == b"alive"
            writer.close()
    finally:
        assert await pw.stop() == 0


async def test_port_in_use_fails_before_forking(tmp_path: Path, tcp_echo: TCPEchoTarget) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    busy = blocker.getsockname()[1]
    config = tmp_path / "w.yml"
    config.write_text(
        "workers: 2\nroutes:\n" + route_yaml("t", scheme="tcp4", port=f"{busy}:{tcp_echo.port}")
    )
    try:
        status, _out, err = await run_cli("serve", "-c", str(config))
        assert status == 1
        assert f"route 't': cannot listen on 127.0.0.1:{busy}/tcp: address already in use" in err
    finally:
        blocker.close()


async def test_sighup_reloads_every_worker(
    tmp_path: Path, tcp_echo: TCPEchoTarget, udp_echo: UDPEchoTarget
) -> None:
    pw = await start(tmp_path, tcp_echo, udp_echo)
    try:
        await pw.wait_for("workers serving")
        new_port = free_port()
        config = tmp_path / "w.yml"
        config.write_text(
            config.read_text() + route_yaml("added", scheme="tcp4", port=f"{new_port}:{tcp_echo.port}")
        )
        mark = len(pw.records)
        pw.proc.send_signal(signal.SIGHUP)  # the file watcher may also fire; either way each worker reloads
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (
            len(
                {
                    r.get("worker")
                    for r in pw.records[mark:]
                    if r.get("route") == "added" and r.get("event") == "route started"
                }
            )
            < 2
        ):
            assert loop.time() < deadline, "not every worker started the added route"
            await pw.wait_for(
                "route started", after=len(pw.records), timeout=max(0.1, deadline - loop.time())
            )
        reader, writer = await asyncio.open_connection("127.0.0.1", new_port)
        writer.write(b"new")
        assert await reader.readexactly(3) == b"new"
        writer.close()
    finally:
        assert await pw.stop() == 0
