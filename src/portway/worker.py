"""A worker of an instance with ``workers: N``: it serves what the control plane sends, nothing else.

The worker reads no file and runs no provider and no health probe (see `portway.control`). At
start it connects to the control socket, receives the current route set (a restarted worker thus
gets what runs now, not what the file said at boot), binds it all-or-nothing and tells the
supervisor it serves. Afterwards every route set goes through `Server.apply`, and the routes that
failed (a port taken by another program) are reported back, for the control plane to log.

If the control process dies, the worker keeps serving what it has and reconnects; the
supervisor restarts the control plane, which sends the current route set again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

from portway import __version__
from portway.app import shut_down
from portway.config.schema import Config
from portway.errors import PortwayError
from portway.logs import LoopErrorLog
from portway.loops import loop_name
from portway.observability import Observability
from portway.server import Server
from portway.stream.pool import TargetPool
from portway.supervisor import CONTROL_SOCKET_ENV
from portway.worker_link import VERSION, LinkClosed, Message, read_message, send

__all__ = ["CONTROL_SOCKET_ENV", "LinkedWorker", "WorkerStartFailed", "serve_worker"]

log = logging.getLogger("portway")

_RECONNECT_MAX = 2.0


class WorkerStartFailed(PortwayError):
    """The first route set could not be bound (reported to the control plane, then raised)."""


class LinkedWorker:
    def __init__(self, path: str, index: int, *, config_path: str, on_ready: Callable[[], None]) -> None:
        self.path = path
        self.index = index
        self.config_path = config_path
        self.on_ready = on_ready
        self.server: Server | None = None
        self.observability: Observability | None = None
        self.hurry = asyncio.Event()
        self.stopping = False

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_unix_connection(self.path)
        send(writer, {"type": "hello", "v": VERSION, "worker": self.index, "pid": os.getpid()})
        return reader, writer

    async def run(self, stop: asyncio.Event, shutdown_grace: float | None) -> None:
        TargetPool.probes_here = False  # the control plane probes, once for the instance
        try:
            reader, writer = await self._connect()
            first = await read_message(reader)
        except (OSError, LinkClosed) as exc:
            raise WorkerStartFailed(
                f"worker {self.index}: no route set from the control plane: {exc}"
            ) from None
        if first["type"] != "routes":
            raise WorkerStartFailed(f"worker {self.index}: expected a route set first, got {first['type']!r}")
        config: Config = first["config"]
        self.observability = Observability(config, config_path=self.config_path)
        self.server = Server(config, reuse_port=True, observer=self.observability.observer)
        try:
            await self.server.start()
        except (PortwayError, OSError) as exc:
            send(writer, {"type": "applied", "version": first["version"], "failed": {"*": str(exc)}})
            with contextlib.suppress(OSError):
                await writer.drain()
            raise
        send(writer, {"type": "applied", "version": first["version"], "failed": {}})
        follow = asyncio.get_running_loop().create_task(self._follow(reader, writer))
        try:
            await self.observability.start(self.server.status)
            log.info(
                "portway serving",
                extra={
                    "routes": len(self.server.streams),
                    "loop": loop_name(asyncio.get_running_loop()),
                    "action": "ready",
                    "version": __version__,
                    "config": self.config_path,
                },
            )
            self.on_ready()
            await stop.wait()
        finally:
            self.stopping = True
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
            grace = shutdown_grace if shutdown_grace is not None else self.server.config.grace_period
            await shut_down(
                self.server, grace, "--grace" if shutdown_grace is not None else "grace_period", self.hurry
            )
            await self.observability.stop()

    async def _follow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Apply what the control plane sends; reconnect (keeping the routes) if it goes away."""
        delay = 0.05
        while True:
            try:
                while True:
                    await self._handle(await read_message(reader), writer)
                    delay = 0.05
            except LinkClosed as exc:
                writer.close()
                if self.stopping:
                    return
                log.warning(
                    "lost the control plane; serving the current routes and reconnecting",
                    extra={"action": "link", "error": str(exc)},
                )
            while True:
                await asyncio.sleep(delay)
                delay = min(_RECONNECT_MAX, delay * 2)
                try:
                    reader, writer = await self._connect()
                    break
                except OSError:
                    continue

    async def _handle(self, message: Message, writer: asyncio.StreamWriter) -> None:
        assert self.server is not None and self.observability is not None
        kind = message["type"]
        if kind == "routes":
            failed = await self.server.apply(message["config"])
            log.info(
                "reload applied",
                extra={
                    "action": "reload",
                    "routes": len(self.server.streams),
                    "failed": sorted(failed),
                    "plan": message["version"],
                },
            )
            if message.get("files"):
                self.observability.reloaded(not failed)
            errors = {name: str(exc) for name, exc in failed.items()}
            send(writer, {"type": "applied", "version": message["version"], "failed": errors})
        elif kind == "refused":
            self.observability.reloaded(False)
        elif kind == "probe":
            pool = self.server.pools.get(message["route"])
            if pool is not None:
                pool.apply_probe(message["target"], message["ok"], message["reason"])
        elif kind == "health":
            pool = self.server.pools.get(message["route"])
            if pool is not None:
                pool.set_check_state(
                    message["target"], message["up"], message["successes"], message["failures"]
                )


async def serve_worker(
    path: str, index: int, *, config_path: str, grace: float | None, on_ready: Callable[[], None]
) -> None:
    """Serve until SIGINT/SIGTERM (a second one closes live connections at once)."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(LoopErrorLog())
    stop = asyncio.Event()
    worker = LinkedWorker(path, index, config_path=config_path, on_ready=on_ready)

    def stop_signal() -> None:
        if stop.is_set():
            worker.hurry.set()
        stop.set()

    def reopen() -> None:
        if worker.observability is not None:
            worker.observability.reopen_access_log()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_signal)
    loop.add_signal_handler(signal.SIGUSR1, reopen)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # reloads are the control plane's
    try:
        await worker.run(stop, grace)
    finally:
        for handler in logging.getLogger("portway").handlers:
            handler.flush()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
