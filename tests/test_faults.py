"""Faults the proxy must survive without spinning, leaking or crashing: fd exhaustion, churn."""

from __future__ import annotations

import asyncio
import os
import random
import resource
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import current_loop_kind
from tests.portway_process import PortwayProcess, route_yaml
from tests.targets import TCPEchoTarget


@dataclass(frozen=True)
class Activity:
    """Counters that say whether a process spins, whatever else the machine is doing.

    CPU time over a short window is not such a counter: on a loaded machine a well-behaved
    process is charged more for the same work, and a spinning one gets less CPU. Instead:
    `runnable_ns` (time running plus time waiting for a CPU, /proc/PID/task/*/schedstat) is
    close to the whole window for a process that never sleeps, loaded machine or not, and
    `wakeups` (voluntary context switches: each time a thread blocked and was woken) counts the
    event loop's turns, which depend on what the loop is asked to do, not on the load.
    """

    runnable_ns: int
    wakeups: int

    @classmethod
    def of(cls, pid: int) -> Activity:
        runnable = wakeups = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    run_ns, wait_ns, _slices = (int(x) for x in f.read().split())
                with open(f"/proc/{pid}/task/{task}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
            except FileNotFoundError:
                continue  # a thread that just ended
            runnable += run_ns + wait_ns
            wakeups += int(status["voluntary_ctxt_switches"])
        return cls(runnable, wakeups)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _limit_fds(n: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


async def echo_once(port: int, payload: bytes = b"ping", timeout: float = 3.0) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), timeout) == payload
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def test_fd_exhaustion_backs_off_and_recovers(tmp_path: Path, tcp_echo: TCPEchoTarget) -> None:
    config = tmp_path / "p.yml"
    config.write_text("routes:\n" + route_yaml("t", scheme="tcp4", port=f"0:{tcp_echo.port}"))
    pw = await PortwayProcess.serve(config, current_loop_kind(), preexec_fn=lambda: _limit_fds(48))
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await pw.wait_for("portway serving")
        port = pw.port_of("t")
        pid = pw.proc.pid
        # Hold proxied connections until the proxy runs out of descriptors.
        for _ in range(40):
            if not await echo_once(port, timeout=1.0):
                break
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x")
            try:
                await asyncio.wait_for(reader.readexactly(1), 1.0)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionResetError):
                writer.close()
                break
            held.append((reader, writer))
        assert len(held) < 40, "the descriptor limit was never reached"
        # Clients keep knocking while the proxy has no descriptors: it must not spin.
        knockers = [socket.socket() for _ in range(5)]
        for k in knockers:
            k.setblocking(False)
            k.connect_ex(("127.0.0.1", port))
        loop = asyncio.get_running_loop()
        before, started = Activity.of(pid), loop.time()
        await asyncio.sleep(1.5)  # the measurement window itself, not synchronisation
        after, window = Activity.of(pid), loop.time() - started
        runnable = (after.runnable_ns - before.runnable_ns) / 1e9 / window
        wakeups = (after.wakeups - before.wakeups) / window
        # A spinning loop is runnable the whole window (1.0), however loaded the machine; one
        # that backs off sleeps nearly all of it and wakes a few times a second.
        assert runnable < 0.5, f"proxy was runnable {runnable:.0%} of the time while out of descriptors"
        assert wakeups < 100, f"proxy woke {wakeups:.0f} times a second while out of descriptors"
        for k in knockers:
            k.close()
        for _, w in held:
            w.close()
        held.clear()
        # Descriptors free up: service resumes (the accept back-off is about a second).
        deadline = loop.time() + 10
        while not await echo_once(port):
            assert loop.time() < deadline, "proxy did not recover after descriptors were freed"
        assert pw.proc.returncode is None
        exhausted_logs = [
            r
            for r in pw.records
            if "out of file descriptors" in str(r.get("error", "")) or "resource" in r.get("event", "")
        ]
        assert len(exhausted_logs) <= 5, f"logged {len(exhausted_logs)} times for one burst"
    finally:
        for _, w in held:
            w.close()
        assert await pw.stop() == 0


async def test_churn_with_random_resets_never_crashes(tmp_path: Path) -> None:
    """Thousands of connections opened and torn down at random points, RSTs included.

    uvloop 0.23 was seen to abort with "double free or corruption" when a closing transport was
    written to or closed again under this kind of churn; the proxy must stay up and not leak.
    """
    target = TCPEchoTarget()
    await target.start()
    config = tmp_path / "p.yml"
    config.write_text("routes:\n" + route_yaml("t", scheme="tcp4", port=f"0:{target.port}"))
    pw = await PortwayProcess.serve(config, current_loop_kind())
    rng = random.Random(1234)
    try:
        await pw.wait_for("portway serving")
        port = pw.port_of("t")
        baseline_fds = open_fds(pw.proc.pid)

        async def one() -> None:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return
            sock = writer.get_extra_info("socket")
            try:
                action = rng.random()
                if action < 0.3:
                    writer.write(os.urandom(rng.randrange(1, 200_000)))
                if action < 0.5:
                    await asyncio.sleep(0)
                if rng.random() < 0.5:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()  # RST at a random point
                else:
                    writer.close()
            except OSError:
                pass

        for _round in range(10):
            await asyncio.gather(*(one() for _ in range(200)))
        assert pw.proc.returncode is None, "proxy died under churn"
        assert await echo_once(port), "proxy stopped serving after churn"
        # Everything torn down on the client side: the proxy's descriptors return to baseline.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while open_fds(pw.proc.pid) > baseline_fds + 2:
            assert loop.time() < deadline, f"fds leaked: {open_fds(pw.proc.pid)} vs {baseline_fds}"
            await asyncio.sleep(0.05)
    finally:
        assert await pw.stop() == 0
        await target.stop()
