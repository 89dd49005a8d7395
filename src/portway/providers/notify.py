"""What every route provider (Docker, etcd, Redis) does once it has read its source.

A provider's routes are always a whole snapshot of "what the source says now", never a log of
deltas; after each one it sets `synced` (the first snapshot arrived: startup and tests wait for
it), wakes whoever waits in `next_snapshot`, logs each problem (one bad label or key skips that
route only) and calls `on_change` only when the routes actually changed, so a re-read that finds
nothing new costs no reload.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

__all__ = ["SnapshotNotifier"]


class SnapshotNotifier:
    """The snapshot bookkeeping a provider shares with every other provider."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        #: Set once the first snapshot has been applied.
        self.synced = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []

    async def next_snapshot(self) -> None:
        """Return after the next snapshot (a change or a re-read) has been applied."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def published(self, changed: bool, problems: list[str], *, provider: str, logger: logging.Logger) -> None:
        """A snapshot was applied: report its problems, wake the waiters, reload if it changed."""
        for problem in problems:
            logger.warning(problem, extra={"provider": provider, "action": "skip"})
        self.synced.set()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if changed:
            self.on_change()
