"""`docker compose up --scale app=N` as one pool: containers joining a link follow their lifecycle.

Each busybox container (host network) serves its own name over HTTP on its own loopback port and
carries the same labels a compose service would: `proxy.*.load_balance.link: app` and one shared
listening port. The pool grows as containers start and shrinks as they die, on one listener.
"""

# Fixtures imported from tests.docker_engine look like redefinitions to ruff when used as arguments.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
from contextlib import ExitStack

import docker
import pytest

from portway.app import LiveServer
from tests.docker_engine import docker_client, docker_engine, run_container, wait_until_listening  # noqa: F401
from tests.ports import free_port
from tests.test_docker_provider import http_get, live  # noqa: F401


def _labels(name: str, listen: int, target: int) -> dict[str, str]:
    return {
        "proxy.aliases": name,
        "proxy.*.scheme": "tcp4",
        "proxy.*.bind": "127.0.0.1",
        "proxy.*.host": "127.0.0.1",
        "proxy.*.port": f"{listen}:{target}",
        "proxy.*.load_balance.link": "app",
    }


def _serve(name: str, port: int) -> list[str]:
    return ["sh", "-c", f"echo {name} > /www/index.html && exec httpd -f -p 127.0.0.1:{port} -h /www"]


def _members(live: LiveServer) -> list[str]:
    server = live.server
    assert server is not None
    stream = server.streams.get("app")
    return [] if stream is None else [m.key for m in stream.pool.members]


@pytest.mark.docker
async def test_scaled_containers_form_one_pool_that_follows_them(
    live: LiveServer, docker_client: docker.DockerClient
) -> None:
    listen = free_port()
    ports = [free_port() for _ in range(3)]
    names = [f"portway-link-app-{i}" for i in range(1, 4)]
    with ExitStack() as stack:
        containers = []
        for name, port in zip(names[:2], ports[:2], strict=True):
            containers.append(
                stack.enter_context(
                    run_container(docker_client, name, _labels(name, listen, port), _serve(name, port))
                )
            )
        await live.wait_for(lambda: len(_members(live)) == 2)
        server = live.server
        assert server is not None
        listener = server.streams["app"]
        for port in ports[:2]:
            await asyncio.to_thread(wait_until_listening, "127.0.0.1", port)
        replies = {(await http_get(listen)).rsplit(b"\r\n\r\n", 1)[-1].strip() for _ in range(4)}
        assert replies == {n.encode() for n in names[:2]}  # round robin over both containers

        # --scale app=3: the pool grows in place, the listener stays.
        name, port = names[2], ports[2]
        stack.enter_context(
            run_container(docker_client, name, _labels(name, listen, port), _serve(name, port))
        )
        await live.wait_for(lambda: len(_members(live)) == 3)
        assert server.streams["app"] is listener
        await asyncio.to_thread(wait_until_listening, "127.0.0.1", ports[2])
        replies = {(await http_get(listen)).rsplit(b"\r\n\r\n", 1)[-1].strip() for _ in range(6)}
        assert replies == {n.encode() for n in names}

        # A container dies: its member leaves, the others keep serving on the same listener.
        await asyncio.to_thread(containers[0].kill)  # type: ignore[attr-defined]
        await live.wait_for(lambda: len(_members(live)) == 2)
        assert server.streams["app"] is listener
        replies = {(await http_get(listen)).rsplit(b"\r\n\r\n", 1)[-1].strip() for _ in range(4)}
        assert replies == {n.encode() for n in names[1:]}
