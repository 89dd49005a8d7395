"""Shared fixtures: every async test runs under stock asyncio and under uvloop, on real sockets.

Set PORTWAY_TEST_LOOPS=uvloop (or asyncio) to run just one of them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvloop

from portway.loops import loop_name
from tests.targets import TCPEchoTarget, UDPEchoTarget

# The private Docker engine fixtures (docker_engine, docker_client) for provider tests.
pytest_plugins = ["tests.docker_engine"]

_LOOPS = [x for x in os.environ.get("PORTWAY_TEST_LOOPS", "asyncio,uvloop").split(",") if x]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    factories = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {name: factories[name] for name in _LOOPS}


def current_loop_kind() -> str:
    """The loop this test runs on, for tests that start portway as a subprocess on the same kind."""
    return loop_name(asyncio.get_running_loop())


@pytest.fixture(params=["splice", "transport"])
def both_tcp_engines(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per TCP engine (raw sockets + splice, asyncio transports)."""
    from portway.stream.tcp import ENGINE_ENV

    monkeypatch.setenv(ENGINE_ENV, request.param)
    return str(request.param)


@pytest.fixture
async def tcp_echo() -> AsyncIterator[TCPEchoTarget]:
    target = TCPEchoTarget()
    await target.start()
    yield target
    await target.stop()


@pytest.fixture
async def udp_echo() -> AsyncIterator[UDPEchoTarget]:
    target = UDPEchoTarget()
    await target.start()
    yield target
    await target.stop()
