"""The test Docker engine works: containers run, serve on loopback, and resolve to targets."""

# Fixtures imported from tests.docker_engine look like redefinitions to ruff when used as arguments.
# ruff: noqa: F811

from __future__ import annotations

import socket
from typing import Any

import docker
import pytest

from portway.providers.docker_labels import Skip, Target, routes_from_labels, target_for_container
from tests.docker_engine import docker_client, docker_engine, run_container, wait_until_listening  # noqa: F401
from tests.ports import free_port

pytestmark = pytest.mark.docker


def http_get(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def resolve(container: Any, port: int) -> Target | Skip:
    return target_for_container(container.attrs, port, "tcp", network=None, host_address="127.0.0.1")


def test_host_network_container_is_reached_over_loopback(docker_client: docker.DockerClient) -> None:
    port = free_port()
    serve = f"echo hello-portway > /www/index.html && exec httpd -f -p 127.0.0.1:{port} -h /www"
    labels = {"proxy.aliases": "web", "proxy.web.port": f"18080:{port}"}
    with run_container(docker_client, "portway-smoke-httpd", labels, ["sh", "-c", serve]) as container:
        result = routes_from_labels(container.name, container.labels, explicit_only=True)
        assert result.problems == []
        assert result.routes == {"web": {"port": f"18080:{port}"}}

        target = resolve(container, port)
        assert target == Target("127.0.0.1", port, "host-network")
        wait_until_listening(target.host, target.port)
        reply = http_get(target.host, target.port)
    status_line = reply.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.")
    assert b" 200 " in status_line
    assert reply.endswith(b"hello-portway\n")


def test_container_without_network_is_skipped(docker_client: docker.DockerClient) -> None:
    with run_container(docker_client, "portway-smoke-none", {}, ["sleep", "30"], network="none") as container:
        assert container.attrs["HostConfig"]["NetworkMode"] == "none"
        assert resolve(container, 22) == Skip(
            "container 'portway-smoke-none' has no network (network mode 'none')"
        )


def test_excluded_container_has_no_routes(docker_client: docker.DockerClient) -> None:
    labels = {"proxy.exclude": "true", "proxy.aliases": "x"}
    with run_container(docker_client, "portway-smoke-excluded", labels, ["sleep", "30"], network="none") as c:
        assert routes_from_labels(c.name, c.labels, explicit_only=False).excluded
