"""The raw engine's connect deadlines (`DialWatch`) on a real event loop, under both loops."""

from __future__ import annotations

import asyncio

from portway.stream.tcp_splice import DialWatch


class _Dialing:
    """Stands in for a SpliceConn whose dial is being timed."""

    def __init__(self, name: str, fired: list[tuple[str, float]], done: asyncio.Future[None] | None = None):
        self.name, self.fired, self.done = name, fired, done

    def _dial_expired(self) -> None:
        self.fired.append((self.name, asyncio.get_running_loop().time()))
        if self.done is not None:
            self.done.set_result(None)


async def test_dial_watch_expires_each_pending_dial_at_its_deadline() -> None:
    """One timer for all of a route's connect deadlines: a dial that finished (discarded) never
    expires, the others expire in order and not before their own deadline."""
    loop = asyncio.get_running_loop()
    fired: list[tuple[str, float]] = []
    last_done: asyncio.Future[None] = loop.create_future()
    watch = DialWatch(loop, 0.05)
    finished, slow, slower = (
        _Dialing("finished", fired),
        _Dialing("slow", fired),
        _Dialing("slower", fired, last_done),
    )
    start = loop.time()
    watch.add(finished)  # type: ignore[arg-type]
    watch.add(slow)  # type: ignore[arg-type]
    watch.discard(finished)  # type: ignore[arg-type]
    second: asyncio.Future[None] = loop.create_future()
    loop.call_later(0.02, second.set_result, None)
    await second
    watch.add(slower)  # type: ignore[arg-type]
    added_slower = loop.time()
    await asyncio.wait_for(last_done, 5)
    assert [name for name, _ in fired] == ["slow", "slower"]
    assert fired[0][1] >= start + 0.05 - 0.005  # the loop's clock resolution
    assert fired[1][1] >= added_slower + 0.05 - 0.005
    assert len(watch) == 0
