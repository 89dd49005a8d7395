"""Choosing the event loop: uvloop where it is installed, stock asyncio otherwise (or on request).

uvloop runs the transports' reads, writes and buffering in C; stock asyncio does them in Python
and is several times slower on the datagram path (see bench/README.md). Both must work: the test
suite runs every async test under each (PORTWAY_TEST_LOOPS=asyncio,uvloop picks them; see
tests/conftest.py). PORTWAY_LOOP, read below, is the CLI's default when --loop is not given.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Literal

LoopKind = Literal["auto", "uvloop", "asyncio"]


def loop_factory(kind: LoopKind | str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory for `asyncio.Runner(loop_factory=...)`; `kind` defaults to $PORTWAY_LOOP or auto."""
    kind = kind or os.environ.get("PORTWAY_LOOP", "auto")
    if kind not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"unknown event loop {kind!r} (expected auto, uvloop or asyncio)")
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise ValueError("uvloop is not installed") from None
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
