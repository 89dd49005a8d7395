"""End to end: real routes (`Server`) report to the observers; a real Prometheus and the access log
see exactly the traffic the clients made, with the right close reasons.

These tests need the data plane to report events (`Server(config, observer=...)` and
`Server.status()`); until that is wired they skip themselves, and run for real as soon as `Server`
takes an `observer`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from portway.config.load import load_config_text
from portway.observability import Observability, WorkerEnv
from portway.server import Server
from tests.conftest import current_loop_kind
from tests.polling import eventually
from tests.ports import free_port
from tests.portway_process import PortwayProcess, route_yaml
from tests.prometheus_server import Prometheus
from tests.targets import TCPEchoTarget, UDPClient, UDPEchoTarget
from tests.test_observe_serve import metric
from tests.test_tcp import closed_by_proxy


def _server_takes_an_observer() -> bool:
    # An attribute on the class or a constructor parameter: either way the streams can report.
    return hasattr(Server, "observer") or "observer" in inspect.signature(Server.__init__).parameters


pytestmark = pytest.mark.skipif(
    not _server_takes_an_observer(), reason="observer not wired yet (Server has no `observer`)"
)

N, M = 6, 6 * 4096  # N clients, M bytes each way in all


def closed_port() -> int:
    """A loopback port nothing listens on (a dial there is refused)."""
    return free_port()


def yaml(tmp_path: Path, echo: TCPEchoTarget, udp: UDPEchoTarget, admin_port: int) -> str:
    return (
        f"admin:\n  listen: 127.0.0.1:{admin_port}\n"
        f"access_log:\n  path: {tmp_path / 'access.log'}\n  format: json\n"
        "routes:\n"
        + route_yaml("echo", scheme="tcp4", port=f"0:{echo.port}")
        + route_yaml("denied", scheme="tcp4", port=f"0:{echo.port}")
        + "    acl: {default: deny, allow_local: false, deny: [cidr:127.0.0.0/8]}\n"
        + route_yaml("refused", scheme="tcp4", port=f"0:{closed_port()}")
        + route_yaml("idle", scheme="tcp4", port=f"0:{echo.port}")
        + "    idle_timeout: 300ms\n"
        + route_yaml("dns", scheme="udp4", port=f"0:{udp.port}")
        + "    udp_idle_timeout: 300ms\n"
    )


class Running:
    def __init__(self, server: Any, obs: Observability, admin_port: int, log: Path) -> None:
        self.server = server
        self.obs = obs
        self.admin_port = admin_port
        self.log = log

    def addr(self, route: str) -> tuple[str, int]:
        local = self.server.streams[route].local_addr
        assert local is not None
        return local[0], local[1]

    def lines(self) -> list[dict[str, Any]]:
        assert self.obs.access_log is not None
        self.obs.access_log.flush()
        return [json.loads(x) for x in self.log.read_text().splitlines()] if self.log.exists() else []

    def target(self, route: str) -> str:
        """The route's (only) target, as the `target` label names it."""
        return str(self.server.streams[route].pool.members[0].key)

    async def metric(self, name: str, **labels: str) -> float | None:
        """One sample of the admin listener's exposition (parsed with prometheus_client's parser)."""
        return await metric(f"http://127.0.0.1:{self.admin_port}", name, **labels)


@pytest.fixture
async def running(
    tmp_path: Path, tcp_echo: TCPEchoTarget, udp_echo: UDPEchoTarget, both_tcp_engines: str
) -> AsyncIterator[Running]:
    admin_port = free_port()
    config = load_config_text(yaml(tmp_path, tcp_echo, udp_echo, admin_port), "e2e.yml")
    obs = Observability(config, config_path="e2e.yml", env=WorkerEnv())
    make_server: Any = Server  # the `observer` parameter arrives with the data-plane wiring
    server = make_server(config, observer=obs.observer)
    await server.start()
    await obs.start(server.status)
    try:
        yield Running(server, obs, admin_port, tmp_path / "access.log")
    finally:
        await server.stop()
        await obs.stop()


async def echo_once(addr: tuple[str, int], payload: bytes) -> None:
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(payload)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(-1), 10)
    assert got == payload
    writer.close()
    await writer.wait_closed()


async def test_exact_tcp_counts_in_prometheus_and_the_access_log(
    running: Running, tmp_path: Path, both_tcp_engines: str
) -> None:
    """N clients each send M/N bytes: exactly N connections and M bytes each way, on each engine
    and loop. A real Prometheus scrapes them once (uvloop, splice: starting it costs seconds);
    the other combinations read the same exposition with prometheus_client's parser."""
    await asyncio.gather(*(echo_once(running.addr("echo"), b"x" * (M // N)) for _ in range(N)))
    labels = {"route": "echo", "protocol": "tcp"}
    expected = [
        ("portway_connections_total", labels, N),
        ("portway_bytes_total", {**labels, "direction": "client_to_target"}, M),
        ("portway_bytes_total", {**labels, "direction": "target_to_client"}, M),
        ("portway_connections_active", labels, 0),
        ("portway_connection_closes_total", {**labels, "reason": "normal"}, N),
        ("portway_dial_duration_seconds_count", {"route": "echo", "target": running.target("echo")}, N),
    ]
    if both_tcp_engines == "splice" and current_loop_kind() == "uvloop":
        prom = Prometheus(tmp_path, f"127.0.0.1:{running.admin_port}")
        prom.start()
        try:
            for name, where, want in expected:
                selector = ",".join(f'{k}="{v}"' for k, v in where.items())
                expr = f"{name}{{{selector}}}"
                assert await asyncio.to_thread(prom.wait_value, expr, want) == want, expr
        finally:
            prom.stop()
    else:
        for name, where, want in expected:
            assert await running.metric(name, **where) == want, (name, where)
    lines = [x for x in running.lines() if x["route"] == "echo"]
    assert len(lines) == N
    assert all(x["bytes_client_to_target"] == x["bytes_target_to_client"] == M // N for x in lines)
    assert all(x["reason"] == "normal" and x["client"].startswith("127.0.0.1:") for x in lines)


async def test_close_reasons_acl_denied_dial_refused_idle_timeout(running: Running) -> None:
    for route in ("denied", "refused"):
        reader, writer = await asyncio.open_connection(*running.addr(route))
        await closed_by_proxy(reader)
        writer.close()
    reader, writer = await asyncio.open_connection(*running.addr("idle"))
    assert await asyncio.wait_for(reader.read(-1), 10) == b""  # closed by the proxy after 300 ms
    writer.close()

    async def all_logged() -> bool:
        return {x["route"] for x in running.lines()} >= {"denied", "refused", "idle"}

    await eventually(all_logged)
    reasons = {x["route"]: x["reason"] for x in running.lines()}
    assert reasons == {"denied": "acl_denied", "refused": "dial_refused", "idle": "idle_timeout"}
    assert await running.metric("portway_acl_denied_total", route="denied") == 1
    labels = {"route": "refused", "protocol": "tcp", "reason": "dial_refused"}
    assert await running.metric("portway_connection_closes_total", **labels) == 1


async def test_udp_session_counts_and_expiry(running: Running) -> None:
    client = await UDPClient.connect(*running.addr("dns"))
    try:
        for i in range(3):
            client.send(b"q%d" % i)
            assert await client.recv() == b"q%d" % i
    finally:
        client.close()

    async def expired() -> bool:
        return any(x["route"] == "dns" for x in running.lines())

    await eventually(expired)
    (line,) = [x for x in running.lines() if x["route"] == "dns"]
    assert line["reason"] == "idle_timeout" and line["protocol"] == "udp"
    assert (line["datagrams_client_to_target"], line["datagrams_target_to_client"]) == (3, 3)
    assert (line["bytes_client_to_target"], line["bytes_target_to_client"]) == (6, 6)
    assert await running.metric("portway_udp_datagrams_total", route="dns", direction="client_to_target") == 3
    assert await running.metric("portway_connections_total", route="dns", protocol="udp") == 1
    assert await running.metric("portway_connections_active", route="dns", protocol="udp") == 0


async def test_status_lists_the_routes_with_totals(running: Running) -> None:
    await echo_once(running.addr("echo"), b"hello")
    doc = json.loads(running.obs.render_status())
    routes = {r["name"]: r for r in doc["routes"]}
    assert set(routes) == {"echo", "denied", "refused", "idle", "dns"}
    assert routes["echo"]["listen"].endswith(f":{running.addr('echo')[1]}")
    assert routes["echo"]["totals"]["connections"] == 1
    assert routes["dns"]["protocol"] == "udp"


async def test_two_workers_through_portway_serve(tmp_path: Path, tcp_echo: TCPEchoTarget) -> None:
    """`workers: 2`: one scrape of worker 0's listener returns the sum over both workers."""
    admin_port = free_port()
    config = tmp_path / "portway.yml"
    listen = free_port()
    config.write_text(
        f"workers: 2\nadmin:\n  listen: 127.0.0.1:{admin_port}\n"
        "routes:\n" + route_yaml("echo", scheme="tcp4", port=f"{listen}:{tcp_echo.port}")
    )
    pw = await PortwayProcess.serve(config, current_loop_kind())
    prom = Prometheus(tmp_path, f"127.0.0.1:{admin_port}")
    try:
        await pw.wait_for("workers serving")
        prom.start()
        clients = 4 * N  # SO_REUSEPORT spreads them over both workers
        await asyncio.gather(*(echo_once(("127.0.0.1", listen), b"y" * 1000) for _ in range(clients)))
        labels = 'route="echo",protocol="tcp"'
        got = await asyncio.to_thread(prom.wait_value, f"portway_connections_total{{{labels}}}", clients)
        assert got == clients
        q = f'portway_bytes_total{{{labels},direction="target_to_client"}}'
        assert await asyncio.to_thread(prom.wait_value, q, clients * 1000) == clients * 1000
    finally:
        prom.stop()
        assert await pw.stop() == 0
