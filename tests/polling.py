"""Waiting for state another process (or a timer) publishes, where there is no event to await."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0, step: float = 0.05) -> None:
    """Return once `check()` holds; fail the test after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the state lives in another process
            await asyncio.sleep(step)
