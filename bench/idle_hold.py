"""Open N connections to 127.0.0.1:PORT, check each with a one-byte echo, then hold them.

``idle_hold.py PORT N``: prints ``held K`` (and why it stopped early, if it did) once all are
open, then waits for a line on stdin (or EOF) and exits, closing everything. Several
connections are opened concurrently to keep the setup time short at 10k connections.
"""

from __future__ import annotations

import asyncio
import sys

CONCURRENCY = 64


async def hold(port: int, n: int) -> None:
    writers: list[asyncio.StreamWriter] = []
    failure = ""
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one() -> None:
        nonlocal failure
        async with sem:
            if failure:
                return
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
                w.write(b"x")
                await w.drain()
                await asyncio.wait_for(r.readexactly(1), 10)
                writers.append(w)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                failure = f" failed: {type(exc).__name__}: {exc}"

    await asyncio.gather(*(one() for _ in range(n)))
    print(f"held {len(writers)}{failure}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    for w in writers:
        w.close()


if __name__ == "__main__":
    asyncio.run(hold(int(sys.argv[1]), int(sys.argv[2])))
