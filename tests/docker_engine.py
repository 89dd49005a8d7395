"""A real Docker engine for tests, and helpers to run labelled busybox containers on it.

Use it from a test module (or list ``"tests.docker_engine"`` in ``pytest_plugins`` of the root
conftest, which also spares the imports)::

    from tests.docker_engine import docker_client, docker_engine, run_container  # noqa: F401

    def test_something(docker_client: docker.DockerClient) -> None:
        with run_container(docker_client, "web", {"proxy.web.port": "80"}, ["sleep", "30"]) as c:
            ...

The engine comes from ``PORTWAY_TEST_DOCKER_HOST`` (e.g. ``unix:///run/docker.sock``) when set;
that engine must have the ``portway-busybox:latest`` image (``.ci/docker-engine.sh`` builds it).
Otherwise ``.ci/docker-engine.sh`` starts a private dockerd in a temporary directory for this
session and stops it at the end. If none can start, the tests are skipped with a loud reason,
or fail when ``PORTWAY_REQUIRE_DOCKER=1`` (CI sets it, so a broken engine cannot hide as a skip).

The private engine runs with ``--bridge=none --iptables=false`` so it never touches the host's
firewall or interfaces: containers must use ``network="host"`` or ``network="none"``. On the
default network they start but get no IP address (NetworkMode "default", an empty "bridge"
endpoint), which is itself a case ``target_for_container`` has to skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors
import pytest

__all__ = [
    "IMAGE",
    "docker_client",
    "docker_engine",
    "run_container",
    "wait_until_listening",
]

IMAGE = "portway-busybox:latest"
ENV_HOST = "PORTWAY_TEST_DOCKER_HOST"
ENV_REQUIRE = "PORTWAY_REQUIRE_DOCKER"
SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "docker-engine.sh"
# Generous because a fresh machine installs docker.io and busybox-static first.
_START_TIMEOUT_S = 600


@dataclass
class _Engine:
    url: str
    directory: Path | None  # set when we started it, so we know to stop it


# One engine per process even if several test modules import the fixture: pytest would make
# each imported copy its own session fixture, and two private daemons would double the start cost.
_engine: _Engine | None = None
_failure: str | None = None


def _unavailable(reason: str) -> None:
    banner = f"{'!' * 20} NO DOCKER ENGINE: {reason} {'!' * 20}"
    if os.environ.get(ENV_REQUIRE) == "1":
        pytest.fail(banner, pytrace=False)
    pytest.skip(banner)


def _start_private_engine() -> _Engine:
    if os.geteuid() != 0:
        raise RuntimeError(f"starting dockerd needs root; set {ENV_HOST} to use an existing engine")
    # Short path under /tmp: unix socket paths (ours and containerd's inside exec-root) are
    # limited to 108 bytes, and pytest's tmp_path can be long.
    directory = Path(tempfile.mkdtemp(prefix="portway-dockerd-", dir="/tmp"))
    try:
        done = subprocess.run(
            ["bash", str(SCRIPT), "start", str(directory)],
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        _stop_private_engine(directory)
        raise RuntimeError(f"{SCRIPT.name} start did not finish in {_START_TIMEOUT_S}s") from None
    if done.returncode != 0:
        _stop_private_engine(directory)
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{SCRIPT.name} start failed (exit {done.returncode}):\n{tail}")
    return _Engine(done.stdout.strip().splitlines()[-1], directory)


def _stop_private_engine(directory: Path) -> None:
    subprocess.run(
        ["bash", str(SCRIPT), "stop", str(directory)], capture_output=True, timeout=120, check=False
    )
    shutil.rmtree(directory, ignore_errors=True)


def _stop_engine() -> None:
    global _engine
    if _engine is not None and _engine.directory is not None:
        _stop_private_engine(_engine.directory)
    _engine = None


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[str]:
    """The engine's URL (``unix:///...``); the private engine is stopped when the session ends."""
    global _engine, _failure
    if _engine is None and _failure is None:
        url = os.environ.get(ENV_HOST)
        try:
            _engine = _Engine(url, None) if url else _start_private_engine()
        except (RuntimeError, OSError) as exc:
            _failure = str(exc)
    if _engine is None:
        _unavailable(_failure or "unknown reason")
    assert _engine is not None
    yield _engine.url
    _stop_engine()  # idempotent: a second imported copy of the fixture finds it stopped


@pytest.fixture(scope="session")
def docker_client(docker_engine: str) -> Iterator[docker.DockerClient]:
    """A docker SDK client for the engine; the API version is negotiated (dockerd may be old)."""
    try:
        client = docker.DockerClient(base_url=docker_engine, version="auto", timeout=30)
    except docker.errors.DockerException as exc:
        _unavailable(f"cannot talk to the engine at {docker_engine}: {exc}")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        client.close()
        _unavailable(f"the engine at {docker_engine} has no {IMAGE}; build it with {SCRIPT}")
    yield client
    client.close()


@contextmanager
def run_container(
    client: docker.DockerClient,
    name: str,
    labels: Mapping[str, str],
    cmd: Sequence[str],
    *,
    network: Literal["host", "none"] = "host",
    **options: Any,
) -> Iterator[Any]:
    """Run a detached busybox container with `labels` and remove it (forcefully) afterwards.

    A container left over under the same name by an interrupted run is removed first, so tests
    can use fixed names against a long-lived engine. Extra `options` go to ``containers.run``.
    """
    _maybe_remove(client, name)
    container = client.containers.run(
        IMAGE,
        list(cmd),
        name=name,
        labels=dict(labels),
        network_mode=network,
        detach=True,
        **options,
    )
    try:
        container.reload()  # attrs from run() predate the start; inspect now has State/Network
        yield container
    finally:
        _maybe_remove(client, name)


def _maybe_remove(client: docker.DockerClient, name: str) -> None:
    with suppress(docker.errors.NotFound):
        client.containers.get(name).remove(force=True)


def wait_until_listening(host: str, port: int, timeout: float = 10.0) -> None:
    """Return once a TCP connect to host:port succeeds; a container's process starts async."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)
