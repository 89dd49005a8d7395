"""The Docker provider: snapshot-to-routes rules (pure), then end to end against a real engine."""

# Fixtures imported from tests.docker_engine look like redefinitions to ruff when used as arguments.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import pytest

from portway.app import LiveServer
from portway.config.schema import RouteConfig
from portway.providers.docker import (
    DEFAULT_URL,
    ContainerInfo,
    docker_url,
    host_address_for,
    parse_provider_name,
    routes_from_containers,
)
from portway.providers.merge import merge_routes
from tests.docker_engine import docker_client, docker_engine, run_container, wait_until_listening  # noqa: F401
from tests.ports import free_port


def host_net(name: str, labels: dict[str, str]) -> ContainerInfo:
    attrs = {"Name": f"/{name}", "State": {"Running": True}, "HostConfig": {"NetworkMode": "host"}}
    return ContainerInfo(f"/{name}", labels, attrs)


def bridged(
    name: str, labels: dict[str, str], ip: str, published: dict[str, Any] | None = None
) -> ContainerInfo:
    attrs = {
        "Name": f"/{name}",
        "State": {"Running": True},
        "HostConfig": {"NetworkMode": "backend"},
        "NetworkSettings": {"Ports": published or {}, "Networks": {"backend": {"IPAddress": ip}}},
    }
    return ContainerInfo(f"/{name}", labels, attrs)


# --- pure rules ----------------------------------------------------------------------------------


def test_host_network_container_is_reached_on_the_host_address() -> None:
    labels = {"proxy.aliases": "ssh", "proxy.ssh.port": "2222:22", "proxy.ssh.scheme": "tcp4"}
    out = routes_from_containers(
        "local", [host_net("box", labels)], explicit_only=True, host_address="127.0.0.1"
    )
    assert out.problems == []
    assert out.routes["ssh"].host == "127.0.0.1"
    assert (out.routes["ssh"].port.listening, out.routes["ssh"].port.target) == (2222, 22)
    assert out.origins == {"ssh": "docker 'local' container 'box'"}


def test_published_port_is_preferred_over_the_container_address() -> None:
    published = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}]}
    box = bridged("box", {"proxy.box.port": "2222:22"}, "172.18.0.5", published)
    out = routes_from_containers("remote", [box], explicit_only=False, host_address="10.0.2.1")
    assert (out.routes["box"].host, out.routes["box"].port.target) == ("10.0.2.1", 32768)


def test_container_address_is_used_when_nothing_is_published() -> None:
    out = routes_from_containers(
        "local",
        [bridged("db", {"proxy.db.port": "5432:5432"}, "172.18.0.9")],
        explicit_only=False,
        host_address="127.0.0.1",
    )
    assert (out.routes["db"].host, out.routes["db"].port.target) == ("172.18.0.9", 5432)


def test_an_explicit_host_label_is_honoured() -> None:
    labels = {"proxy.aliases": "web", "proxy.web.port": "8080:80", "proxy.web.host": "10.1.2.3"}
    out = routes_from_containers(
        "local", [bridged("w", labels, "172.18.0.2")], explicit_only=True, host_address="127.0.0.1"
    )
    assert out.routes["web"].host == "10.1.2.3"


def test_bad_label_values_are_reported_and_only_that_route_skipped() -> None:
    labels = {"proxy.aliases": "good,bad", "proxy.good.port": "1000:1", "proxy.bad.port": "70000:1"}
    out = routes_from_containers(
        "local", [host_net("box", labels)], explicit_only=True, host_address="127.0.0.1"
    )
    assert list(out.routes) == ["good"]
    [problem] = out.problems
    assert problem.startswith("docker 'local' container 'box', route 'bad', field 'port': ")
    assert problem.endswith("; skipped")


def test_container_without_network_is_reported_and_skipped() -> None:
    attrs = {"Name": "/iso", "State": {"Running": True}, "HostConfig": {"NetworkMode": "none"}}
    iso = ContainerInfo("/iso", {"proxy.iso.port": "1000:1"}, attrs)
    out = routes_from_containers("local", [iso], explicit_only=False, host_address="127.0.0.1")
    assert out.routes == {}
    assert out.problems == [
        "docker 'local' container 'iso', route 'iso': "
        "container 'iso' has no network (network mode 'none'); skipped"
    ]


def test_two_containers_claiming_one_alias_keep_the_first_by_name() -> None:
    a = host_net("a", {"proxy.aliases": "web", "proxy.web.port": "8080:80"})
    b = host_net("b", {"proxy.aliases": "web", "proxy.web.port": "8081:80"})
    out = routes_from_containers("local", [b, a], explicit_only=True, host_address="127.0.0.1")
    assert out.origins["web"] == "docker 'local' container 'a'"
    assert out.problems == [
        "route 'web' is defined by docker 'local' container 'a' and docker 'local' container 'b'; "
        "kept the first"
    ]


def test_explicit_only_ignores_containers_without_aliases() -> None:
    out = routes_from_containers(
        "local", [host_net("box", {"proxy.box.port": "1:1"})], explicit_only=True, host_address="127.0.0.1"
    )
    assert out.routes == {}


def test_provider_names_urls_and_host_addresses() -> None:
    assert parse_provider_name("remote-1!") == ("remote-1", True)
    assert parse_provider_name("local") == ("local", False)
    assert docker_url("$DOCKER_HOST", {}) == DEFAULT_URL == "unix:///var/run/docker.sock"
    assert docker_url("${DOCKER_HOST}", {"DOCKER_HOST": "tcp://10.0.2.1:2375"}) == "tcp://10.0.2.1:2375"
    assert host_address_for("tcp://10.0.2.1:2375") == "10.0.2.1"
    assert host_address_for("unix:///run/docker.sock") == "127.0.0.1"


def test_merge_names_both_sources_and_files_win() -> None:
    ssh = RouteConfig.model_validate({"port": "2222:22"})
    clash_port = RouteConfig.model_validate({"port": "2222:23"})
    merged = merge_routes(
        [
            ({"ssh": ssh}, {"ssh": "main.yml"}),
            (
                {"ssh": ssh, "other": clash_port},
                {"ssh": "docker 'local' container 'a'", "other": "docker 'local' container 'b'"},
            ),
        ]
    )
    assert list(merged.routes) == ["ssh"]
    assert (
        merged.problems[0]
        == "route 'ssh' is defined in main.yml and docker 'local' container 'a'; kept the first"
    )
    assert (
        "route 'other' (docker 'local' container 'b') listens on :: port 2222/tcp like route 'ssh'"
        in merged.problems[1]
    )


# --- against the real engine ---------------------------------------------------------------------


@pytest.fixture
async def live(tmp_path: Path, docker_engine: str) -> AsyncIterator[LiveServer]:
    main = tmp_path / "portway.yml"
    main.write_text(f"grace_period: 1s\nproviders:\n  docker:\n    test!: {docker_engine}\n")
    app = LiveServer(main)
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(app.run(stop, shutdown_grace=0.5))
    async with asyncio.timeout(10):
        await app.ready.wait()
        await next(iter(app.providers.values())).synced.wait()
    yield app
    stop.set()
    await asyncio.wait_for(task, 10)


async def http_get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return reply


@pytest.mark.docker
async def test_labelled_container_route_follows_the_container(
    live: LiveServer, docker_client: docker.DockerClient
) -> None:
    target, listen = free_port(), free_port()
    serve = f"echo hello-from-docker > /www/index.html && exec httpd -f -p 127.0.0.1:{target} -h /www"
    listen2 = free_port()
    labels = {
        "proxy.aliases": "web,web2",
        "proxy.*.scheme": "tcp4",
        "proxy.*.bind": "127.0.0.1",
        "proxy.web.port": f"{listen}:{target}",
        "proxy.web.host": "127.0.0.1",  # explicit target
        "proxy.web2.port": f"{listen2}:{target}",  # found by inspecting the container (host network)
    }
    server = live.server
    assert server is not None
    with run_container(docker_client, "portway-provider-web", labels, ["sh", "-c", serve]) as container:
        await live.wait_for(lambda: {"web", "web2"} <= set(server.streams))
        await asyncio.to_thread(wait_until_listening, "127.0.0.1", target)
        for port in (listen, listen2):
            reply = await http_get(port)
            assert reply.split(b"\r\n", 1)[0].startswith(b"HTTP/1.")
            assert reply.endswith(b"hello-from-docker\n")

        await asyncio.to_thread(container.kill)
        await live.wait_for(lambda: not {"web", "web2"} & set(server.streams))
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", listen)


@pytest.mark.docker
async def test_container_without_network_is_reported_not_fatal(
    live: LiveServer, docker_client: docker.DockerClient, caplog: pytest.LogCaptureFixture
) -> None:
    labels = {"proxy.aliases": "iso", "proxy.iso.port": f"{free_port()}:80"}
    provider = next(iter(live.providers.values()))

    def reported() -> bool:
        return any("portway-provider-none" in r.getMessage() for r in caplog.records)

    with (
        caplog.at_level(logging.WARNING, logger="portway.docker"),
        run_container(docker_client, "portway-provider-none", labels, ["sleep", "30"], network="none"),
    ):
        async with asyncio.timeout(10):
            while not reported():
                await provider.next_snapshot()
    [problem] = [r.getMessage() for r in caplog.records if "portway-provider-none" in r.getMessage()]
    assert "has no network (network mode 'none'); skipped" in problem
    assert live.server is not None
    assert "iso" not in live.server.streams


class _UnixRelay:
    """A TCP listener on loopback relaying to the engine's unix socket; stopping it is an outage."""

    def __init__(self, unix_path: str) -> None:
        self.unix_path = unix_path
        self.port = free_port()
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        engine_r, engine_w = await asyncio.open_unix_connection(self.unix_path)
        self.writers |= {client_w, engine_w}

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        await asyncio.gather(pump(client_r, engine_w), pump(engine_r, client_w), return_exceptions=True)


class _LogEvent(logging.Handler):
    """Sets an asyncio event when a log message containing `text` is emitted (from any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.loop.call_soon_threadsafe(self.seen.set)


@pytest.mark.docker
async def test_daemon_outage_keeps_routes_and_reconnects(
    tmp_path: Path, docker_engine: str, docker_client: docker.DockerClient
) -> None:
    relay = _UnixRelay(docker_engine.removeprefix("unix://"))
    await relay.start()
    main = tmp_path / "portway.yml"
    main.write_text(f"providers:\n  docker:\n    relayed!: tcp://127.0.0.1:{relay.port}\n")
    app = LiveServer(main)
    stop = asyncio.Event()
    running = asyncio.get_running_loop().create_task(app.run(stop, shutdown_grace=0.5))
    down, up = _LogEvent("docker daemon unreachable"), _LogEvent("docker daemon reachable again")
    docker_log = logging.getLogger("portway.docker")
    docker_log.addHandler(down)
    docker_log.addHandler(up)
    labels = {"proxy.aliases": "kept", "proxy.kept.port": f"{free_port()}:80", "proxy.kept.bind": "127.0.0.1"}
    try:
        async with asyncio.timeout(10):
            await app.ready.wait()
        server = app.server
        assert server is not None
        with run_container(docker_client, "portway-provider-outage", labels, ["sleep", "30"]) as container:
            await app.wait_for(lambda: "kept" in server.streams)
            await relay.stop()
            async with asyncio.timeout(10):
                await down.seen.wait()
            assert "kept" in server.streams  # the last known routes keep serving
            await relay.start()
            async with asyncio.timeout(10):
                await up.seen.wait()
            await asyncio.to_thread(container.kill)
            await app.wait_for(lambda: "kept" not in server.streams)
    finally:
        docker_log.removeHandler(down)
        docker_log.removeHandler(up)
        stop.set()
        await asyncio.wait_for(running, 10)
        await relay.stop()
