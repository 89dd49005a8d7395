"""Shared fixtures: every async test runs under stock asyncio and under uvloop, on real sockets.

Set PORTWAY_TEST_LOOPS=uvloop (or asyncio) to run just one of them.
"""

from __future__ import annotations

import asyncio
import inspect
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


_FACTORIES: dict[str, Callable[[], Any]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_configure(config: pytest.Config) -> None:
    """CI sets PORTWAY_REQUIRE_FASTPATH=1: a compiled core that failed to build is an error there,
    not a quiet fallback to the Python classes."""
    from portway.stream.epollset import COMPILED

    if os.environ.get("PORTWAY_REQUIRE_FASTPATH") == "1" and not COMPILED:
        raise pytest.UsageError("PORTWAY_REQUIRE_FASTPATH=1 but portway.stream._fastpath was not built")


def pytest_report_header(config: pytest.Config) -> str:
    from portway.stream.epollset import COMPILED, compiled_enabled

    if not COMPILED:
        return "raw TCP engine, UDP sessions: Python (the compiled core was not built; its tests skip)"
    used = "compiled core" if compiled_enabled() else "Python (PORTWAY_FASTPATH=0)"
    return f"raw TCP engine, UDP sessions: {used}"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    return {name: _FACTORIES[name] for name in _LOOPS}


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect: judge whole functions, not what was kept
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fail the run if an async test would not run under every loop (pytest-asyncio < 1.4 ignores
    the hook above and silently runs each test once). Node ids naming one variant are exempt."""
    if any("[" in arg for arg in config.args):
        return
    missing = async_tests_missing_loops(items, [_FACTORIES[name] for name in _LOOPS])
    if missing:
        raise pytest.UsageError(
            f"{len(missing)} async test(s) do not run under every loop in {_LOOPS}, e.g. {missing[0]}: "
            "is pytest-asyncio >= 1.4 (the pytest_asyncio_loop_factories hook) installed?"
        )


def async_tests_missing_loops(items: list[Any], factories: list[Callable[[], Any]]) -> list[str]:
    """The async test functions (one per other-parameter set) lacking a variant for some factory."""
    seen: dict[tuple[str, str], set[Any]] = {}
    for item in items:
        if not inspect.iscoroutinefunction(getattr(item, "obj", None)):
            continue
        callspec = getattr(item, "callspec", None)
        params = dict(callspec.params) if callspec is not None else {}
        factory = params.pop("_asyncio_loop_factory", None)
        key = (item.nodeid.split("[")[0], repr(sorted(params.items(), key=repr)))
        seen.setdefault(key, set()).add(factory)
    return sorted({test for (test, _), found in seen.items() if not set(factories) <= found})


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
