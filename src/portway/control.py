"""The control plane of an instance with ``workers: N``: one place that decides what runs.

One control process per instance (forked by the supervisor before any worker, so it is forked
from a process with no thread and no loop) watches the config files, runs the Docker, etcd and
Redis providers, validates and merges their routes, picks the port of every route written with
listening port 0 (once, so every worker binds the same one), and sends each worker the same
complete route set over `portway.worker_link`. Workers only serve: they apply what they receive
with `Server.apply` and report what failed.

The pools' active health checks run here too, once per instance rather than once per worker:
each probe's result goes to every worker, whose balancer applies the same deterministic
rise/fall hysteresis, and after every route set a snapshot of the check state, so a new or
restarted worker starts with the instance's view. Only this process logs the transitions.

Why a process of its own and not a thread of the supervisor: the supervisor forks workers at any
time, and forking a process that runs threads (the Docker provider's) or an event loop is how
children inherit held locks and deadlock. The supervisor stays single-threaded and loop-free.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from portway import sdnotify
from portway.addr import is_udp
from portway.app import LiveServer, with_override
from portway.config.load import Sources, load_config
from portway.config.schema import Config, RouteConfig
from portway.errors import ConfigError, PortwayError
from portway.reload import pool_settings
from portway.server import build_pool, fold
from portway.stream.listen import bind_listener
from portway.stream.pool import TargetPool
from portway.worker_link import VERSION, LinkClosed, Message, read_message, send

__all__ = ["ControlPlane", "HealthPlane", "reserve_port"]

log = logging.getLogger("portway.control")

#: How long a restarted control plane waits for its providers before sending a route set.
_RESTART_SYNC_WAIT = 10.0
#: Bytes queued to one worker past which probe results are dropped for it (about 10,000 results).
_PROBE_BACKLOG = 1 << 20


def reserve_port(name: str, route: RouteConfig) -> int:
    """A free port for a route written with listening port 0, checked with SO_REUSEPORT as the
    workers will bind it. The probe socket is closed again (a bound UDP socket in the group
    would receive datagrams); BindError names the route when the address cannot be used."""
    host = route.listen_host()
    kind = socket.SOCK_DGRAM if is_udp(route.scheme) else socket.SOCK_STREAM
    sock = bind_listener(route.scheme, host, 0, kind, reuse_port=True, name=name)
    try:
        port: int = sock.getsockname()[1]
        return port
    finally:
        sock.close()


class HealthPlane:
    """The instance's active health checks: one pool per route with ``healthcheck:``."""

    def __init__(self, on_probe: Callable[[str, str, bool, str], None]) -> None:
        self.on_probe = on_probe
        self.pools: dict[str, tuple[RouteConfig, TargetPool]] = {}

    async def apply(self, config: Config) -> None:
        """Probe the targets of `config`'s checked routes; a pool whose settings did not change
        keeps its state, one whose targets changed is updated in place (kept targets keep it)."""
        wanted = {n: r for n, r in fold(config).routes.items() if r.healthcheck is not None}
        for name in set(self.pools) - set(wanted):
            self.pools.pop(name)[1].stop()
        for name, route in wanted.items():
            old = self.pools.get(name)
            try:
                if old is not None and pool_settings(old[0]) == pool_settings(route):
                    continue
                if old is not None:
                    fresh = build_pool(name, route)
                    await old[1].update(
                        fresh.members,
                        mode=route.load_balance.mode,
                        health=fresh.balancer.health,
                        check=fresh.check,
                    )
                    fresh.stop()
                    self.pools[name] = (route, old[1])
                    continue
                pool = build_pool(name, route)
                pool.on_probe = self.on_probe
                await pool.start()
                self.pools[name] = (route, pool)
            except (PortwayError, OSError) as exc:
                log.error("cannot probe the route's targets", extra={"route": name, "error": str(exc)})

    def snapshot(self) -> Iterator[Message]:
        for name, (_route, pool) in self.pools.items():
            for key, up, successes, failures in pool.check_state():
                yield {
                    "type": "health",
                    "route": name,
                    "target": key,
                    "up": up,
                    "successes": successes,
                    "failures": failures,
                }

    def stop(self) -> None:
        for _route, pool in self.pools.values():
            pool.stop()
        self.pools.clear()


class ControlPlane(LiveServer):
    """`LiveServer`'s file watching and providers, feeding workers instead of a `Server`."""

    def __init__(
        self,
        path: str | Path,
        listener: socket.socket,
        *,
        port_overrides: dict[str, int],
        sources: Sources | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(path, port_overrides=port_overrides, sources=sources, on_ready=on_ready)
        self.listener = listener
        #: Where the ports picked for port-0 routes are kept, so a restarted control plane gives
        #: each route the port its workers already serve (the supervisor's private directory).
        self.ports_file = os.path.join(os.path.dirname(listener.getsockname()), "ports.json")
        self.port_overrides.update(_read_ports(self.ports_file))
        #: None until the first plan writes the file (its presence marks a restarted control plane).
        self._saved_ports: dict[str, int] | None = None
        self._restarted = False
        self.version = 0
        self.config: Config | None = None
        self.files_reloaded = False
        self.links: dict[asyncio.StreamWriter, int] = {}
        self.health = HealthPlane(self._forward_probe)
        #: Set once the first route set is decided: a worker that connects earlier (reconnecting
        #: to a restarted control plane) waits for it.
        self.planned = asyncio.Event()

    async def run(self, stop: asyncio.Event, *, shutdown_grace: float | None = None) -> None:
        self.sources = self._starting_sources()
        server = await asyncio.start_unix_server(self._serve_worker, sock=self.listener)
        try:
            self._sync_providers()
            await self._restart_watcher()
            if self._restarted:
                await self._providers_synced(_RESTART_SYNC_WAIT)
            await self._publish(files=False)
            self.planned.set()
            log.info(
                "control plane serving",
                extra={"action": "ready", "routes": len(self.config.routes) if self.config else 0},
            )
            self.ready.set()
            if self.on_ready is not None:
                self.on_ready()
            await self.reload_until(stop)
        finally:
            self._stop_watching.set()
            if self._watcher is not None:
                self._watcher.cancel()
                await asyncio.gather(self._watcher, return_exceptions=True)
            await asyncio.gather(*(p.stop() for p in self.providers.values()), return_exceptions=True)
            await self.stores.stop()
            self.health.stop()
            server.close()
            for writer in list(self.links):
                writer.close()

    def _starting_sources(self) -> Sources:
        """What the CLI read at boot, for the first control plane; a restarted one re-reads the
        files (the workers serve what they said at the crash, not at boot), and only if they
        no longer validate falls back to the boot version, saying so."""
        self._restarted = os.path.exists(self.ports_file)
        if self._initial is not None and not self._restarted:
            return self._initial
        try:
            return load_config(self.path)
        except ConfigError as exc:
            if self._initial is None:
                raise
            log.error(
                f"restarted, but the config no longer validates; serving it as it was at startup: {exc}",
                extra={"action": "start", "file": exc.file, "line": exc.line, "route": exc.route},
            )
            return self._initial

    async def _providers_synced(self, within: float) -> None:
        """Wait (at most `within` s) for every provider's first snapshot. A restarted control
        plane does, so its first route set does not drop the Docker and store routes the
        workers serve (draining their connections) only to add them back a moment later."""
        events = [p.synced for p in self.providers.values()]
        for _settings, store in self.stores.running.values():
            synced = getattr(store, "synced", None)
            if isinstance(synced, asyncio.Event):
                events.append(synced)
        if events:
            waits = [asyncio.ensure_future(e.wait()) for e in events]
            _done, pending = await asyncio.wait(waits, timeout=within)
            for task in pending:
                task.cancel()

    async def _reload(self) -> None:
        files = await self._reread_files()
        if files == "refused":
            for writer in list(self.links):
                send(writer, {"type": "refused"})  # counted in the reload metrics
            await self._notify()
            return
        await self._publish(files=files == "reread")
        await self._notify()

    def _plan(self) -> Config:
        """The merged routes, each port-0 route given the port every worker will bind."""
        config = self._wanted()
        routes = dict(config.routes)
        for name in set(self.port_overrides) - set(routes):
            del self.port_overrides[name]  # gone: a route of that name added later gets a new port
        for name, route in config.routes.items():
            if route.port.listening != 0:
                continue
            try:
                self.port_overrides[name] = reserve_port(name, route)
            except PortwayError as exc:
                log.error(f"route skipped: {exc}", extra={"route": name, "action": "reload"})
                del routes[name]
                continue
            routes[name] = with_override(name, route, self.port_overrides)
        if self.port_overrides != self._saved_ports:
            _write_ports(self.ports_file, self.port_overrides)
            self._saved_ports = dict(self.port_overrides)
        return config.model_copy(update={"routes": routes})

    async def _publish(self, *, files: bool) -> None:
        """Send the current plan to every worker (unless nothing changed and no file was re-read)."""
        config = self._plan()
        if config == self.config and not files:
            return
        self.version += 1
        self.config = config
        self.files_reloaded = files
        await self.health.apply(config)
        log.info(
            "routes sent to the workers",
            extra={
                "action": "reload",
                "version": self.version,
                "routes": len(config.routes),
                "workers": len(self.links),
            },
        )
        for writer in list(self.links):
            self._send_plan(writer)

    def _send_plan(self, writer: asyncio.StreamWriter) -> None:
        send(
            writer,
            {"type": "routes", "version": self.version, "config": self.config, "files": self.files_reloaded},
        )
        for message in self.health.snapshot():
            send(writer, message)

    def _forward_probe(self, route: str, target: str, ok: bool, reason: str) -> None:
        message = {"type": "probe", "route": route, "target": target, "ok": ok, "reason": reason}
        for writer in list(self.links):
            # A worker that stopped reading (stuck, or being killed) must not grow our memory
            # without bound: it misses results, and the next route set's snapshot resyncs it.
            if writer.transport.get_write_buffer_size() < _PROBE_BACKLOG:
                send(writer, message)

    async def _serve_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index: int | None = None
        try:
            hello = await read_message(reader)
            if hello.get("type") != "hello" or hello.get("v") != VERSION:
                log.error(
                    "a worker speaks another link protocol; closing", extra={"hello": repr(hello)[:200]}
                )
                return
            index = int(hello["worker"])
            await self.planned.wait()
            self.links[writer] = index
            self._send_plan(writer)
            while True:
                message = await read_message(reader)
                if message["type"] == "applied":
                    self._applied(index, message)
        except LinkClosed:
            pass
        finally:
            self.links.pop(writer, None)
            writer.close()

    def _applied(self, worker: int, message: Message) -> None:
        failed: dict[str, str] = message.get("failed") or {}
        for route, error in sorted(failed.items()):
            log.error(
                "a worker could not apply the routes",
                extra={
                    "action": "reload",
                    "from_worker": worker,
                    "version": message.get("version"),
                    "route": route,
                    "error": error,
                },
            )


def _read_ports(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}  # the first control plane of this instance: nothing picked yet
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_ports(path: str, ports: dict[str, int]) -> None:
    """Written whole and renamed over the old file: a crash never leaves half a file."""
    partial = path + ".new"
    try:
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(ports, f)
        os.replace(partial, path)
    except OSError as exc:
        log.warning("cannot keep the picked ports for a restart", extra={"error": str(exc)})


async def run_control(
    path: str | Path,
    listener: socket.socket,
    *,
    port_overrides: dict[str, int],
    sources: Sources,
    on_ready: Callable[[], None],
) -> None:
    """The control process's main: serve the workers until SIGTERM/SIGINT; SIGHUP re-reads."""
    import signal

    from portway.logs import LoopErrorLog

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(LoopErrorLog())
    stop = asyncio.Event()
    control = ControlPlane(path, listener, port_overrides=port_overrides, sources=sources, on_ready=on_ready)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, control.request_reload)
    try:
        await control.run(stop)
    finally:
        sdnotify.stopping()
        for handler in logging.getLogger("portway").handlers:
            handler.flush()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
