"""The suite's promise that every async test runs under both loops is checked, not assumed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from portway.loops import loop_factory
from tests.conftest import async_tests_missing_loops

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FakeCallSpec:
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakeItem:
    nodeid: str
    obj: Any
    callspec: FakeCallSpec | None = None


async def an_async_test() -> None:
    pass


def a_sync_test() -> None:
    pass


LOOPS = [asyncio.new_event_loop, uvloop.new_event_loop]


def variant(name: str, factory: Any, **params: Any) -> FakeItem:
    return FakeItem(
        f"t.py::{name}[...]", an_async_test, FakeCallSpec({"_asyncio_loop_factory": factory, **params})
    )


def test_both_loops_for_every_parameter_set_passes() -> None:
    items = [variant("a", f, engine=e) for f in LOOPS for e in ("splice", "transport")]
    items.append(FakeItem("t.py::sync", a_sync_test))
    assert async_tests_missing_loops(items, LOOPS) == []


def test_an_old_pytest_asyncio_that_ignores_the_hook_is_caught() -> None:
    # No loop-factory parameter at all: each async test would run once, on whatever loop.
    items = [
        FakeItem("t.py::a", an_async_test),
        FakeItem("t.py::b[x]", an_async_test, FakeCallSpec({"p": 1})),
    ]
    assert async_tests_missing_loops(items, LOOPS) == ["t.py::a", "t.py::b"]


def test_one_parameter_set_missing_a_loop_is_caught() -> None:
    items = [variant("a", f, engine="splice") for f in LOOPS] + [variant("a", LOOPS[0], engine="transport")]
    assert async_tests_missing_loops(items, LOOPS) == ["t.py::a"]


def test_a_single_configured_loop_needs_only_that_loop() -> None:
    assert async_tests_missing_loops([variant("a", LOOPS[1])], LOOPS[1:]) == []


def test_the_suite_really_collects_both_variants() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_shutdown.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PORTWAY_TEST_LOOPS": "asyncio,uvloop"},
        timeout=60,
    ).stdout
    ids = [line for line in out.splitlines() if "::" in line]
    assert ids and all(line.endswith(("[asyncio]", "[uvloop]")) for line in ids)
    assert sum(line.endswith("[asyncio]") for line in ids) == sum(line.endswith("[uvloop]") for line in ids)


def test_loop_factory_reads_portway_loop(monkeypatch: Any) -> None:
    """The CLI's default loop comes from PORTWAY_LOOP (the suite picks its loops with PORTWAY_TEST_LOOPS)."""
    monkeypatch.setenv("PORTWAY_LOOP", "asyncio")
    assert loop_factory() is asyncio.new_event_loop
    monkeypatch.setenv("PORTWAY_LOOP", "uvloop")
    assert loop_factory() is uvloop.new_event_loop
