"""``portway serve``: the running proxy, kept in step with its files and Docker providers.

One task does every reload, so two reloads never interleave; triggers (a watched file changed,
SIGHUP, a Docker provider's routes changed) only wake it. A file reload that fails validation
changes nothing and says where the error is; the routes already running keep serving.

Why watchfiles: it wraps the Rust ``notify`` crate (inotify here, FSEvents/kqueue elsewhere), so a
change is seen in milliseconds without polling, and it groups an editor's burst of writes into one
batch. We watch the *directories* of the config files and filter by name, because editors and
config-management tools replace a file by renaming a new one over it, which a watch on the old
inode would miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from watchfiles import awatch

from portway import __version__, sdnotify
from portway.addr import PortSpec
from portway.config.load import Sources, load_config
from portway.config.schema import Config, RouteConfig
from portway.errors import ConfigError
from portway.logs import LoopErrorLog
from portway.loops import loop_name
from portway.observability import Observability
from portway.providers.docker import DockerProvider, docker_url, parse_provider_name
from portway.providers.merge import merge_routes
from portway.providers.stores import StoreProviders
from portway.server import Server
from portway.stream.tcp import TCPStream

__all__ = ["LiveServer", "serve_live", "shut_down", "with_override"]

log = logging.getLogger("portway")

#: watchfiles yields this long after the last change of a burst (an editor's save is several writes).
WATCH_STEP_MS = 50


class LiveServer:
    """A `Server` whose routes follow the config file, its includes and the Docker providers."""

    def __init__(
        self,
        path: str | Path,
        *,
        reuse_port: bool = False,
        port_overrides: Mapping[str, int] | None = None,
        on_ready: Callable[[], None] | None = None,
        sources: Sources | None = None,
    ) -> None:
        self.path = Path(path)
        #: What the CLI already read and checked; read here otherwise. Reloads always re-read.
        self._initial = sources
        #: With ``workers: N`` the control plane (`portway.control`, a subclass) uses
        #: `port_overrides` for the ports it picked for port-0 routes; `reuse_port` is for
        #: embedding a LiveServer beside other processes that share its listeners.
        self.reuse_port = reuse_port
        self.port_overrides = dict(port_overrides or {})
        self.on_ready = on_ready
        self.server: Server | None = None
        #: Metrics, access log, admin listener (issue 10); built from the file at start.
        self.observability: Observability | None = None
        self.sources: Sources | None = None
        self.providers: dict[tuple[str, str, bool], DockerProvider] = {}
        self.stores = StoreProviders(on_change=lambda: self._wake.set())  # etcd, Redis: after Docker
        #: Notified after every reload (applied or refused), for whoever waits in `wait_for`.
        self.reloaded = asyncio.Condition()
        #: Set once the file's routes listen and the providers and file watcher have started.
        self.ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._files_dirty = False
        self._watched: frozenset[str] = frozenset()
        self._watcher: asyncio.Task[None] | None = None
        self._stop_watching = asyncio.Event()
        self._hurry = asyncio.Event()

    def reopen_access_log(self) -> None:
        """SIGUSR1 (logrotate's signal, nginx's convention); safe to call from a signal handler."""
        if self.observability is not None:
            self.observability.reopen_access_log()

    def request_reload(self) -> None:
        """Re-read the files (and re-merge providers) soon; safe to call from a signal handler."""
        self._files_dirty = True
        self._wake.set()

    async def run(self, stop: asyncio.Event, *, shutdown_grace: float | None = None) -> None:
        """Start everything, reload on demand until `stop` is set, then shut down gracefully.

        `shutdown_grace` is ``--grace``: None means the file's ``grace_period``.
        """
        self.sources = self._initial if self._initial is not None else load_config(self.path)
        self.observability = Observability(self.sources.config, config_path=str(self.path))
        self.server = Server(self._wanted(), reuse_port=self.reuse_port, observer=self.observability.observer)
        await self.server.start()  # the file's routes, all or nothing; Docker routes follow
        try:
            await self.observability.start(getattr(self.server, "status", None))
            self._sync_providers()
            await self._restart_watcher()
            loop = asyncio.get_running_loop()
            log.info(
                "portway serving",
                extra={
                    "routes": len(self.server.streams),
                    "loop": loop_name(loop),
                    "action": "ready",
                    "version": __version__,
                    "config": str(self.path),
                },
            )
            self.ready.set()
            sdnotify.ready()  # a no-op outside systemd and in workers (the supervisor notifies)
            if self.on_ready is not None:
                self.on_ready()
            await self.reload_until(stop)
        finally:
            sdnotify.stopping()
            self._stop_watching.set()
            if self._watcher is not None:
                self._watcher.cancel()
                await asyncio.gather(self._watcher, return_exceptions=True)
            await asyncio.gather(*(p.stop() for p in self.providers.values()), return_exceptions=True)
            await self.stores.stop()
            await self._shut_down(shutdown_grace)
            await self.observability.stop()

    def hurry(self) -> None:
        """A second SIGINT/SIGTERM: stop waiting for live connections and close them now."""
        self._hurry.set()

    async def _shut_down(self, override: float | None) -> None:
        """Stop accepting, give live connections the grace period, and close what is left.

        One rule for the grace period: the file's ``grace_period`` (as last loaded) unless
        ``--grace`` overrides it for shutdown. A second signal (`hurry`) ends the wait at once.
        """
        assert self.server is not None
        grace = override if override is not None else self._file_grace()
        await shut_down(
            self.server, grace, "--grace" if override is not None else "grace_period", self._hurry
        )

    def _file_grace(self) -> float:
        return self.sources.config.grace_period if self.sources is not None else 0.0

    async def reload_until(self, stop: asyncio.Event) -> None:
        """Reload each time something wakes us (a file changed, SIGHUP, a provider's routes
        changed), one reload at a time, until `stop` is set."""
        loop = asyncio.get_running_loop()
        stopping = loop.create_task(stop.wait())
        while not stop.is_set():
            waking = loop.create_task(self._wake.wait())
            await asyncio.wait({stopping, waking}, return_when=asyncio.FIRST_COMPLETED)
            waking.cancel()
            if stop.is_set():
                break
            self._wake.clear()
            await self._reload()
        stopping.cancel()

    async def wait_for(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Return once `predicate()` holds after some reload (or already does)."""
        async with asyncio.timeout(within), self.reloaded:
            await self.reloaded.wait_for(predicate)

    # -- reloading

    async def _reload(self) -> None:
        assert self.server is not None
        observe = self.observability
        if self._files_dirty:
            sdnotify.reloading()
        files = await self._reread_files()
        if files == "refused":
            if observe is not None:
                observe.reloaded(False)
            sdnotify.ready()
            await self._notify()
            return
        failed = await self.server.apply(self._wanted())
        log.info(
            "reload applied",
            extra={"action": "reload", "routes": len(self.server.streams), "failed": sorted(failed)},
        )
        if files == "reread":
            if observe is not None:
                observe.reloaded(not failed)
            sdnotify.ready()
        await self._notify()

    async def _reread_files(self) -> Literal["unchanged", "reread", "refused"]:
        """Re-read the config files if one changed (or SIGHUP asked), and follow what they now
        name: providers to start or stop, files to watch. A file that fails validation is
        "refused" (logged with file, line, route and field): the running routes stay as they are.
        """
        assert self.sources is not None
        if not self._files_dirty:
            return "unchanged"
        self._files_dirty = False
        try:
            sources = load_config(self.path)
        except ConfigError as exc:
            log.error(
                f"reload refused, the running routes are unchanged: {exc}",
                extra={
                    "action": "reload",
                    "file": exc.file,
                    "line": exc.line,
                    "route": exc.route,
                    "field": exc.field,
                    "error": exc.message,
                },
            )
            return "refused"
        files_changed = sources.files != self.sources.files
        self.sources = sources
        self._sync_providers()
        if files_changed:
            await self._restart_watcher()
        return "reread"

    async def _notify(self) -> None:
        async with self.reloaded:
            self.reloaded.notify_all()

    def _wanted(self) -> Config:
        """The file config with the providers' current routes merged in."""
        assert self.sources is not None
        merged = merge_routes(
            [
                (self.sources.config.routes, self.sources.origins),
                *((p.current.routes, p.current.origins) for p in self.providers.values()),
                *self.stores.sources(),
            ]
        )
        for problem in merged.problems:
            log.error(problem, extra={"action": "merge"})
        routes = merged.routes
        if self.port_overrides:
            routes = {name: with_override(name, r, self.port_overrides) for name, r in routes.items()}
        return self.sources.config.model_copy(update={"routes": routes})

    def _sync_providers(self) -> None:
        """Start providers the config now names and stop those it no longer does."""
        assert self.sources is not None
        wanted: set[tuple[str, str, bool]] = set()
        for written_name, written in self.sources.config.providers.docker.items():
            name, explicit = parse_provider_name(written_name)
            wanted.add((name, docker_url(written), explicit))
        for key in set(self.providers) - wanted:
            provider = self.providers.pop(key)
            asyncio.get_running_loop().create_task(provider.stop())
        for key in sorted(wanted - set(self.providers)):
            name, url, explicit = key
            provider = DockerProvider(name, url, explicit_only=explicit, on_change=self._wake.set)
            self.providers[key] = provider
            provider.start()
            log.info("docker provider started", extra={"provider": name, "url": url, "explicit": explicit})
        self.stores.sync(self.sources.config.providers, self.path.parent)

    # -- watching files

    async def _restart_watcher(self) -> None:
        assert self.sources is not None
        if self._watcher is not None:
            self._stop_watching.set()
            await asyncio.gather(self._watcher, return_exceptions=True)
        self._stop_watching = asyncio.Event()
        self._watched = _absolute(self.sources.files)
        directories = sorted({os.path.dirname(p) for p in self._watched})
        self._watcher = asyncio.get_running_loop().create_task(self._watch(directories, self._stop_watching))
        # awatch sets up its inotify watches in the task's first step, before its first await:
        # after one turn of the loop, a change made by whoever we tell "ready" is not missed.
        await asyncio.sleep(0)

    async def _watch(self, directories: list[str], stop: asyncio.Event) -> None:
        def ours(_change: object, path: str) -> bool:
            return os.path.abspath(path) in self._watched

        try:
            async for _changes in awatch(
                *directories, watch_filter=ours, stop_event=stop, step=WATCH_STEP_MS, recursive=False
            ):
                self.request_reload()
        except (OSError, RuntimeError) as exc:  # a directory vanished: SIGHUP still works
            log.error("cannot watch the config files; reload with SIGHUP", extra={"error": str(exc)})


async def shut_down(server: Server, grace: float, grace_from: str, hurry: asyncio.Event) -> None:
    """Stop accepting, give live connections `grace` seconds, and close what is left; `hurry`
    set (a second signal) ends the wait at once."""
    # Everything that may still hold connections: the routes, and those a reload is draining
    # (read before stop() takes them over, so a second signal can close them all).
    streams = [*server.streams.values(), *server._draining.values()]
    tcp = sum(len(s.conns) for s in streams if isinstance(s, TCPStream))
    udp = sum(len(s.sessions) for s in streams if not isinstance(s, TCPStream))
    log.info(
        "shutting down",
        extra={
            "action": "shutdown",
            "grace_s": grace,
            "grace_from": grace_from,
            "waiting_for": tcp,
            "udp_sessions_closed": udp,
        },
    )
    stopping = asyncio.get_running_loop().create_task(server.stop(grace))
    hurried = asyncio.get_running_loop().create_task(hurry.wait())
    await asyncio.wait({stopping, hurried}, return_when=asyncio.FIRST_COMPLETED)
    hurried.cancel()
    if not stopping.done():
        live = sum(len(s.conns) for s in streams if isinstance(s, TCPStream))
        log.warning("second signal: closing live connections now", extra={"action": "shutdown", "live": live})
        # Closing ends every connection, which ends each drain; stop() then finishes normally.
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
    await stopping


def with_override(name: str, route: RouteConfig, overrides: Mapping[str, int]) -> RouteConfig:
    port = overrides.get(name)
    if port is None or route.port.listening != 0:
        return route
    return route.model_copy(update={"port": PortSpec(port, route.port.target)})


def _absolute(paths: tuple[Path, ...]) -> frozenset[str]:
    return frozenset(os.path.abspath(p) for p in paths)


async def serve_live(
    path: str | Path,
    shutdown_grace: float | None = None,
    *,
    reuse_port: bool = False,
    port_overrides: Mapping[str, int] | None = None,
    on_ready: Callable[[], None] | None = None,
    sources: Sources | None = None,
) -> None:
    """Serve `path` until SIGINT/SIGTERM; reload on SIGHUP and whenever a config file changes.

    `sources` is `path` as already read (the CLI reads and checks it once, before forking workers).
    `shutdown_grace` (``--grace``) overrides the file's ``grace_period`` for shutdown; a second
    SIGINT/SIGTERM during the grace period closes the remaining connections at once.
    """
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(LoopErrorLog())  # e.g. accept() out of descriptors: once per burst
    stop = asyncio.Event()
    app = LiveServer(
        path, reuse_port=reuse_port, port_overrides=port_overrides, on_ready=on_ready, sources=sources
    )

    def stop_signal() -> None:
        if stop.is_set():
            app.hurry()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_signal)
    loop.add_signal_handler(signal.SIGHUP, app.request_reload)
    loop.add_signal_handler(signal.SIGUSR1, app.reopen_access_log)
    try:
        await app.run(stop, shutdown_grace=shutdown_grace)
    finally:
        # Out before the signal handlers go back to their defaults: a late SIGTERM from then on
        # ends the process at once, and batched lines ("route stopped") would be lost with it.
        for handler in logging.getLogger("portway").handlers:
            handler.flush()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
