"""Shutdown: one grace-period rule, a second signal that stops at once, and logs that say so.

The rule: the file's ``grace_period`` is the one setting for reload drains and shutdown;
``--grace`` overrides it for shutdown when given.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from tests.conftest import current_loop_kind
from tests.portway_process import PortwayProcess, route_yaml
from tests.targets import TCPEchoTarget


async def hold(port: int) -> asyncio.StreamWriter:
    """A proxied connection that stays open: the grace period has something to wait for."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hi")
    assert await reader.readexactly(2) == b"hi"
    return writer


def config(tmp_path: Path, target: int, head: str = "") -> Path:
    path = tmp_path / "p.yml"
    path.write_text(head + "routes:\n" + route_yaml("t", scheme="tcp4", port=f"0:{target}"))
    return path


async def test_file_grace_period_applies_and_a_second_signal_stops_at_once(
    tmp_path: Path, tcp_echo: TCPEchoTarget
) -> None:
    pw = await PortwayProcess.serve(
        config(tmp_path, tcp_echo.port, "grace_period: 60s\n"), current_loop_kind(), grace=None
    )
    writer = None
    try:
        await pw.wait_for("portway serving")
        writer = await hold(pw.port_of("t"))
        pw.proc.send_signal(signal.SIGTERM)
        down = await pw.wait_for("shutting down")
        assert (down["grace_s"], down["grace_from"], down["waiting_for"]) == (60.0, "grace_period", 1)
        assert pw.proc.returncode is None  # waiting for the held connection
        loop = asyncio.get_running_loop()
        start = loop.time()
        pw.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(pw.proc.wait(), 10) == 0
        assert loop.time() - start < 5  # not the 60 s grace period
        hurried = await pw.wait_for("second signal: closing live connections now")
        assert hurried["live"] == 1
        assert [r["event"] for r in pw.records].count("route stopped") == 1
    finally:
        if writer is not None:
            writer.close()
        await pw.stop()


async def test_grace_flag_overrides_the_file_for_shutdown(tmp_path: Path, tcp_echo: TCPEchoTarget) -> None:
    pw = await PortwayProcess.serve(
        config(tmp_path, tcp_echo.port, "grace_period: 60s\n"), current_loop_kind(), grace=0.2
    )
    writer = None
    try:
        await pw.wait_for("portway serving")
        writer = await hold(pw.port_of("t"))
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await pw.stop() == 0
        assert loop.time() - start < 5
        down = await pw.wait_for("shutting down")
        assert (down["grace_s"], down["grace_from"], down["waiting_for"]) == (0.2, "--grace", 1)
    finally:
        if writer is not None:
            writer.close()


async def test_workers_stop_at_once_on_a_second_signal(tmp_path: Path, tcp_echo: TCPEchoTarget) -> None:
    pw = await PortwayProcess.serve(
        config(tmp_path, tcp_echo.port, "workers: 2\ngrace_period: 60s\n"), current_loop_kind(), grace=None
    )
    writers = []
    try:
        await pw.wait_for("workers serving", timeout=20)
        port = pw.port_of("t")
        writers = [await hold(port) for _ in range(4)]
        pw.proc.send_signal(signal.SIGTERM)
        await pw.wait_for("stopping workers")
        # Both workers have taken the first signal (a second one sent sooner could merge with it).
        first = await pw.wait_for("shutting down")
        second = await pw.wait_for("shutting down", after=pw.records.index(first) + 1)
        assert {first["worker"], second["worker"]} == {0, 1}
        assert first["grace_s"] == second["grace_s"] == 60.0
        assert pw.proc.returncode is None
        loop = asyncio.get_running_loop()
        start = loop.time()
        pw.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(pw.proc.wait(), 15) == 0
        assert loop.time() - start < 8
        await pw.wait_for("second signal: workers stop now")
    finally:
        for w in writers:
            w.close()
        await pw.stop()


async def test_every_worker_logs_its_stop_even_when_the_whole_group_is_signalled(
    tmp_path: Path, tcp_echo: TCPEchoTarget
) -> None:
    """As a Ctrl-C in a terminal or `timeout` does: SIGTERM to the process group, not one pid.

    Each worker must log its own stop, once, without taking the group signal plus the
    supervisor's forwarded one as "a second signal".
    """
    pw = await PortwayProcess.serve(
        config(tmp_path, tcp_echo.port, "workers: 3\n"), current_loop_kind(), preexec_fn=os.setpgrp
    )
    try:
        await pw.wait_for("workers serving", timeout=20)
        os.killpg(pw.proc.pid, signal.SIGTERM)
        assert await asyncio.wait_for(pw.proc.wait(), 15) == 0
        await asyncio.wait_for(pw._reader, 5)
        for event in ("shutting down", "route stopped"):
            assert sorted(r.get("worker") for r in pw.records if r.get("event") == event) == [0, 1, 2], event
        assert not [r for r in pw.records if str(r.get("event", "")).startswith("second signal")]
    finally:
        await pw.stop()
