"""Everything issue 10 adds to a process, built from the config and started and stopped with it.

One `Observability` per serving process: the observer the streams report to (metrics, access log,
both through `events.Fanout`, or None when neither is configured, so a plain config pays nothing),
the admin listener, and with ``workers: N`` the publishing of this worker's tables.

Workers: the supervisor makes a private directory and names it in ``$PORTWAY_OBSERVE_DIR`` and
each worker's index in ``$PORTWAY_WORKER`` before forking. Every worker publishes its tables
there; worker 0 also runs the admin listener and answers from all the files (see `metrics`), and
is the one that counts config reloads (every worker applies each reload; counting all would
multiply them). Why not a thread in the supervisor: the supervisor forks workers at any time, and
forking a process with a running thread (its locks, its loop) is how children deadlock; worker 0
already has a loop, and a scrape costs it a few file reads every 15 s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from portway import __version__
from portway.accesslog import AccessLog
from portway.admin import AdminApp, AdminServer, read_token_file
from portway.config.schema import Config
from portway.events import Fanout, Observer
from portway.metrics import (
    MetricsObserver,
    Tables,
    WorkerFiles,
    WorkerPublisher,
    local_registry,
    render,
    workers_registry,
)
from portway.status import (
    ProcessStatus,
    RouteStatus,
    build_status,
    merge_routes,
    render_status,
    route_from_json,
    route_to_json,
)

__all__ = ["OBSERVE_DIR_ENV", "STARTED_ENV", "WORKERS_ENV", "WORKER_ENV", "Observability", "WorkerEnv"]

OBSERVE_DIR_ENV = "PORTWAY_OBSERVE_DIR"
WORKER_ENV = "PORTWAY_WORKER"
WORKERS_ENV = "PORTWAY_WORKERS"
STARTED_ENV = "PORTWAY_STARTED"

StatusFn = Callable[[], list[RouteStatus]]


@dataclass(frozen=True, slots=True)
class WorkerEnv:
    """Which worker this process is, from the supervisor's environment (None: a single process)."""

    directory: str | None = None
    index: int | None = None
    count: int = 1
    #: When the service started (the supervisor's start with workers), for the status uptime.
    started: float | None = None

    @classmethod
    def from_environ(cls) -> WorkerEnv:
        directory = os.environ.get(OBSERVE_DIR_ENV)
        index = os.environ.get(WORKER_ENV)
        if not directory or index is None:
            return cls()
        started = os.environ.get(STARTED_ENV)
        return cls(
            directory,
            int(index),
            int(os.environ.get(WORKERS_ENV, "1")),
            float(started) if started else None,
        )


class _ThreadlessTargets:
    """A `metrics.TargetSource` over a status function."""

    def __init__(self, status: StatusFn) -> None:
        self.status = status

    def targets(self) -> list[tuple[str, str, bool, int]]:
        return [(r.name, t.target, t.up, t.active) for r in self.status() for t in r.targets]


class Observability:
    """Metrics, access log and admin listener of one process (see the module docstring)."""

    def __init__(self, config: Config, *, config_path: str, env: WorkerEnv | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.env = env if env is not None else WorkerEnv.from_environ()
        self.started = self.env.started or time.time()
        self.metrics = MetricsObserver() if config.admin is not None else None
        self.access_log = (
            AccessLog(config.access_log.path, config.access_log.format) if config.access_log else None
        )
        observers: list[Observer] = [o for o in (self.metrics, self.access_log) if o is not None]
        #: What the server hands its streams: None, one observer, or a Fanout of both.
        self.observer: Observer | None = (
            None if not observers else observers[0] if len(observers) == 1 else Fanout(observers)
        )
        self.admin: AdminServer | None = None
        self.publisher: WorkerPublisher | None = None
        self._status: StatusFn = list
        self._files: WorkerFiles | None = None
        self.last_reload: float | None = None
        self.last_reload_result: str | None = None

    @property
    def hosts_admin(self) -> bool:
        return self.config.admin is not None and self.env.index in (None, 0)

    async def start(self, status: StatusFn | None = None) -> None:
        """Open the access log, start publishing and the admin listener; `status` is the server's."""
        if status is not None:
            self._status = status
        if self.access_log is not None:
            self.access_log.start()
        if self.metrics is not None:
            self.metrics.tables.last_reload_success = self.started
            self.metrics.target_source = _ThreadlessTargets(self._status)
            if self.access_log is not None:
                self.metrics.access_log_dropped = lambda: self.access_log.dropped if self.access_log else 0
            self.metrics.start_lag_probe()
            if self.env.directory is not None and self.env.index is not None:
                self.publisher = WorkerPublisher(
                    self.env.directory,
                    self.env.index,
                    self.metrics.snapshot,
                    status=lambda: [route_to_json(r) for r in self._status()],
                )
                self.publisher.start()
        if self.hosts_admin:
            assert self.config.admin is not None
            await self._start_admin()

    async def _start_admin(self) -> None:
        admin = self.config.admin
        assert admin is not None and self.metrics is not None
        token = read_token_file(admin.token_file) if admin.token_file else None
        if self.env.directory is not None:
            self._files = WorkerFiles(self.env.directory)
            registry = workers_registry(self._files)
        else:
            registry = local_registry(self.metrics.snapshot)
        app = AdminApp(
            metrics=lambda: render(registry),
            status=self.render_status,
            token=token,
            metrics_public=admin.metrics_public,
        )
        self.admin = AdminServer(app, admin.listen)
        await self.admin.start()

    def current(self) -> tuple[list[RouteStatus], Tables]:
        """The routes (merged over workers) and the metric tables (summed over workers)."""
        if self._files is not None:
            tables, live = self._files.read()
            per_worker = [[route_from_json(r) for r in wf.status or []] for wf in live]
            return merge_routes(per_worker), tables
        assert self.metrics is not None
        return self._status(), self.metrics.snapshot()

    def render_status(self) -> bytes:
        routes, tables = self.current()
        process = ProcessStatus(
            version=__version__,
            uptime=time.time() - self.started,
            workers=self.env.count,
            config=self.config_path,
            last_reload=self.last_reload,
            last_reload_result=self.last_reload_result,
        )
        return render_status(build_status(routes, tables, process))

    def reloaded(self, ok: bool) -> None:
        """A reload was applied or refused (counted once: by the only or the first worker)."""
        if self.env.index not in (None, 0):
            return
        self.last_reload = time.time()
        self.last_reload_result = "success" if ok else "failure"
        if self.metrics is not None:
            self.metrics.reloaded(ok, self.last_reload)

    def reopen_access_log(self) -> None:
        """SIGUSR1 (logrotate): reopen the access log's file."""
        if self.access_log is not None:
            self.access_log.reopen()

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self.publisher is not None:
            self.publisher.stop()
            self.publisher = None
        if self.metrics is not None:
            self.metrics.stop()
        if self.access_log is not None:
            self.access_log.stop()
