"""One control plane per instance (`workers: N`): it reads the config, picks ports and probes
targets once; the workers serve what it sends. Real `portway serve` processes on loopback."""

# Fixtures imported from tests.docker_engine look like redefinitions to ruff when used as arguments.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import docker
import pytest

from tests.conftest import current_loop_kind
from tests.docker_engine import docker_client, docker_engine, run_container  # noqa: F401
from tests.polling import eventually
from tests.pool_targets import NamedTarget
from tests.ports import free_port
from tests.portway_process import PortwayProcess, route_yaml
from tests.targets import TCPEchoTarget, UDPClient, UDPEchoTarget
from tests.test_workers import tcp_sockets


def write(config: Path, text: str) -> None:
    config.write_text(text)


async def start(config: Path, text: str) -> tuple[PortwayProcess, list[int]]:
    write(config, text)
    pw = await PortwayProcess.serve(config, current_loop_kind())
    ready = await pw.wait_for("workers serving", timeout=20)
    return pw, ready["pids"]


async def reload(pw: PortwayProcess, config: Path, text: str, workers: int = 2) -> int:
    """Write `text`, SIGHUP, and wait until every worker applied the new route set; returns the
    index of the first record after the reload."""
    mark = len(pw.records)
    write(config, text)
    pw.proc.send_signal(signal.SIGHUP)  # the file watcher may also fire: either way one plan at a time
    sent = await pw.wait_for("routes sent to the workers", after=mark)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10

    def applied() -> set[int]:
        return {
            r["worker"]
            for r in pw.records[mark:]
            if r.get("event") == "reload applied" and r.get("plan", 0) >= sent["version"]
        }

    while len(applied()) < workers:
        assert loop.time() < deadline, "not every worker applied the new routes"
        await pw.wait_for("reload applied", after=len(pw.records), timeout=max(0.1, deadline - loop.time()))
    return mark


async def spread(port: int, pids: list[int], count: int = 40, greeting: bytes | None = None) -> list[bytes]:
    """Open `count` connections to `port` and hold them; assert that every worker in `pids` took
    some (each proxied connection holds two sockets in its worker); returns what each read."""
    baseline = {pid: tcp_sockets(pid) for pid in pids}
    held = []
    replies = []
    try:
        for i in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            held.append(writer)
            if greeting is not None:
                replies.append(await asyncio.wait_for(reader.readline(), 5))
            data = b"c%d" % i
            writer.write(data)
            assert await asyncio.wait_for(reader.readexactly(len(data)), 5) == data
        for pid in pids:
            assert tcp_sockets(pid) - baseline[pid] >= 4, f"worker {pid} served (almost) nothing"
    finally:
        for writer in held:
            writer.close()
    return replies


async def test_port_zero_route_added_on_reload_gets_one_port_for_every_worker(
    tmp_path: Path, tcp_echo: TCPEchoTarget, udp_echo: UDPEchoTarget
) -> None:
    config = tmp_path / "w.yml"
    base = "workers: 2\nroutes:\n" + route_yaml("t", scheme="tcp4", port=f"0:{tcp_echo.port}")
    pw, pids = await start(config, base)
    try:
        added = route_yaml("added", scheme="tcp4", port=f"0:{tcp_echo.port}") + route_yaml(
            "added_udp", scheme="udp4", port=f"0:{udp_echo.port}"
        )
        mark = await reload(pw, config, base + added)
        for route in ("added", "added_udp"):
            starts = [
                r for r in pw.records[mark:] if r.get("event") == "route started" and r["route"] == route
            ]
            assert {r["worker"] for r in starts} == {0, 1}
            assert len({r["listen"] for r in starts}) == 1, f"the workers bound different ports for {route}"
        await spread(pw.port_of("added"), pids)
        client = await UDPClient.connect("127.0.0.1", pw.port_of("added_udp"))
        client.send(b"dgram")
        assert await client.recv() == b"dgram"
        client.close()
    finally:
        assert await pw.stop() == 0
    # The control plane stops after the workers: none took the shutdown for its crash.
    assert not [r for r in pw.records if str(r.get("event", "")).startswith("lost the control plane")]


async def test_restarted_worker_gets_the_current_routes_not_the_files_at_boot(
    tmp_path: Path, tcp_echo: TCPEchoTarget
) -> None:
    config = tmp_path / "w.yml"
    base = "workers: 2\nroutes:\n" + route_yaml("t", scheme="tcp4", port=f"0:{tcp_echo.port}")
    pw, pids = await start(config, base)
    try:
        await reload(pw, config, base + route_yaml("added", scheme="tcp4", port=f"0:{tcp_echo.port}"))
        port = pw.port_of("added")
        control = set(pw.children()) - set(pids)
        mark = len(pw.records)
        os.kill(pids[0], signal.SIGKILL)
        await pw.wait_for("worker exited; restarting", after=mark)
        serving = await pw.wait_for("portway serving", after=mark)
        restarted = [r for r in pw.records[mark:] if r.get("event") == "route started"]
        assert {r["route"] for r in restarted} == {"t", "added"}
        assert {r["listen"] for r in restarted if r["route"] == "added"} == {f"127.0.0.1:{port}"}
        (new_pid,) = set(pw.children()) - control - {pids[1]}
        assert serving["worker"] == 0
        await spread(port, [new_pid, pids[1]])
    finally:
        assert await pw.stop() == 0


async def test_a_bind_failure_on_reload_is_reported_by_the_control_plane(
    tmp_path: Path, tcp_echo: TCPEchoTarget
) -> None:
    blocker = socket.socket()  # no SO_REUSEPORT: no worker can join it
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    busy = blocker.getsockname()[1]
    config = tmp_path / "w.yml"
    base = "workers: 2\nroutes:\n" + route_yaml("t", scheme="tcp4", port=f"0:{tcp_echo.port}")
    pw, _pids = await start(config, base)
    try:
        mark = await reload(
            pw, config, base + route_yaml("taken", scheme="tcp4", port=f"{busy}:{tcp_echo.port}")
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10

        def reports() -> list[dict[str, object]]:
            return [r for r in pw.records[mark:] if r.get("event") == "a worker could not apply the routes"]

        while len(reports()) < 2:
            assert loop.time() < deadline, "the control plane did not report both workers' failure"
            await pw.wait_for("a worker could not apply the routes", after=len(pw.records), timeout=5)
        assert {r["from_worker"] for r in reports()} == {0, 1}
        assert all(r["route"] == "taken" and "address already in use" in str(r["error"]) for r in reports())
        # The route that did start keeps serving.
        reader, writer = await asyncio.open_connection("127.0.0.1", pw.port_of("t"))
        writer.write(b"still")
        assert await reader.readexactly(5) == b"still"
        writer.close()
    finally:
        blocker.close()
        assert await pw.stop() == 0


async def test_health_probes_run_once_per_instance_and_every_worker_acts_on_them(tmp_path: Path) -> None:
    a, b = await NamedTarget("a").start(), await NamedTarget("b").start()
    config = tmp_path / "w.yml"
    text = (
        "workers: 2\nroutes:\n  pool:\n    scheme: tcp4\n    bind: 127.0.0.1\n    port: 0:1\n"
        f"    targets: [127.0.0.1:{a.port}, 127.0.0.1:{b.port}]\n"
        "    healthcheck: {interval: 100ms, timeout: 100ms, rise: 1, fall: 2, expect: hello}\n"
    )
    pw, pids = await start(config, text)
    try:
        # With no client traffic every connection a target accepts is a probe.
        before = a.accepted
        window = 1.5
        await asyncio.sleep(window)  # a rate needs a span of time: nothing to await instead
        probes = a.accepted - before
        one_prober = window / 0.1
        assert 0.4 * one_prober <= probes <= 1.35 * one_prober, f"{probes} probes in {window}s"
        mark = len(pw.records)
        a.hung = True  # accepts, never greets: only the active check can tell
        down = await pw.wait_for("target up -> down", after=mark, timeout=5)
        assert down["worker"] == "control" and down["target"] == f"127.0.0.1:{a.port}"
        # (fall: 2 and the longest timeout allowed: a loaded machine must not flap b.)
        # The verdict travels to the workers over their links; two more probes later, they have it.
        seen = a.accepted

        async def probed_twice_more() -> bool:
            return a.accepted >= seen + 2

        await eventually(probed_twice_more, timeout=5)
        replies = await spread(pw.port_of("pool"), pids, greeting=b"hello")
        assert set(replies) == {b"hello b\n"}, "a worker still sent clients to the hung target"
        transitions = [r for r in pw.records if r.get("event", "").startswith("target up")]
        assert len(transitions) == 1, "only the control plane logs a transition, once"
    finally:
        assert await pw.stop() == 0
        await a.stop()
        await b.stop()


@pytest.mark.docker
async def test_one_docker_event_stream_per_instance(
    tmp_path: Path, docker_engine: str, docker_client: docker.DockerClient, tcp_echo: TCPEchoTarget
) -> None:
    config = tmp_path / "w.yml"
    text = f"workers: 2\nproviders:\n  docker:\n    fleet!: {docker_engine}\nroutes:\n" + route_yaml(
        "t", scheme="tcp4", port=f"0:{tcp_echo.port}"
    )
    pw, _pids = await start(config, text)
    try:
        assert len(pw.children()) == 3  # the control plane and two workers
        # Python does not name OS threads, so the provider's own start line is the count. The
        # control plane's line may be written after the workers report ready (logs are batched):
        # wait for it, then count every such line (a worker's would come before its ready).
        await pw.wait_for("docker provider started")
        started = [r for r in pw.records if r.get("event") == "docker provider started"]
        assert [r["worker"] for r in started] == ["control"], "a worker watches Docker itself"
        listen, target = free_port(), free_port()
        labels = {
            "proxy.aliases": "box",
            "proxy.box.scheme": "tcp4",
            "proxy.box.bind": "127.0.0.1",
            "proxy.box.host": "127.0.0.1",
            "proxy.box.port": f"{listen}:{target}",
        }
        mark = len(pw.records)
        with run_container(docker_client, "portway-fleet-box", labels, ["sleep", "30"]):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while {r.get("worker") for r in pw.records[mark:] if r.get("route") == "box"} < {0, 1}:
                assert loop.time() < deadline, "the container's route did not reach both workers"
                await pw.wait_for("route started", after=len(pw.records), timeout=5)
    finally:
        assert await pw.stop() == 0


async def test_a_killed_control_plane_comes_back_and_the_workers_keep_serving(
    tmp_path: Path, tcp_echo: TCPEchoTarget
) -> None:
    config = tmp_path / "w.yml"
    base = "workers: 2\nroutes:\n" + route_yaml("t", scheme="tcp4", port=f"0:{tcp_echo.port}")
    pw, pids = await start(config, base)
    try:
        with_added = base + route_yaml("added", scheme="tcp4", port=f"0:{tcp_echo.port}")
        await reload(pw, config, with_added)
        port = pw.port_of("added")
        (control,) = set(pw.children()) - set(pids)
        mark = len(pw.records)
        os.kill(control, signal.SIGKILL)
        await pw.wait_for("control plane exited; restarting", after=mark)
        await pw.wait_for("control plane serving", after=mark)
        await spread(port, pids)  # served all along, by the same workers
        # The new control plane kept the port it had picked: nothing was rebound.
        more = with_added + route_yaml("more", scheme="tcp4", port=f"0:{tcp_echo.port}")
        after = await reload(pw, config, more)
        started = {r["route"] for r in pw.records[mark:] if r.get("event") == "route started"}
        assert started == {"more"}
        assert pw.records[after:] and pw.port_of("added") == port
        await spread(pw.port_of("more"), pids)
    finally:
        assert await pw.stop() == 0
