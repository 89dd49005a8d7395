"""Worker processes: N copies of the proxy sharing each listener through SO_REUSEPORT.

The main process never runs an event loop: it forks the control plane (`portway.control`) and
then the workers, waits for each to report that it is serving, then only reaps, restarts and
forwards signals (SIGHUP to the control plane, which alone reads the config; SIGUSR1 to the
workers, which alone write access logs). The control plane is forked first and from this
loop-free, thread-free process, like every worker; its listening socket is made here, before any
fork, so a worker can connect to it the moment it starts and a restarted control plane takes
over the same socket. Each worker binds its own sockets with SO_REUSEPORT, so the kernel spreads
new TCP connections across workers and hashes each UDP client's 4-tuple to one worker, which
keeps a UDP session in one process.

Why fork and not multiprocessing: the children need nothing but the modules already imported,
the inherited readiness pipe and the control socket (the workers get their routes over it), and
fork-before-any-event-loop is the one way to start a Python process that costs no re-import.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from portway import sdnotify
from portway.observability import OBSERVE_DIR_ENV, STARTED_ENV, WORKER_ENV, WORKERS_ENV

log = logging.getLogger("portway.supervisor")

#: A worker that dies sooner than this after starting is "crashing": restarts back off.
_HEALTHY_AFTER = 5.0
_RESTART_BACKOFF_MAX = 10.0
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)

#: What a worker runs: given its index and a callback to call once it is serving; returns an exit status.
WorkerMain = Callable[[int, Callable[[], None]], int]
#: What the control plane runs: given its listening unix socket and the "serving" callback.
ControlMain = Callable[[socket.socket, Callable[[], None]], int]
#: The control plane's index among the children (workers are 0..N-1).
CONTROL = -1
#: Names the control plane's socket in the children's environment.
CONTROL_SOCKET_ENV = "PORTWAY_CONTROL_SOCKET"


@dataclass
class _Worker:
    index: int
    pid: int
    started: float
    ready_fd: int
    ready: bool = False
    failures: list[float] = field(default_factory=list)


class StartupFailed(Exception):
    """A worker exited before it was serving; carries its exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"a worker exited with status {status} before serving")
        self.status = status


class Supervisor:
    """Forks `count` workers running `main`, keeps them alive, and stops them on SIGTERM/SIGINT."""

    def __init__(
        self,
        count: int,
        main: WorkerMain,
        *,
        grace: float,
        startup_timeout: float = 30.0,
        control: ControlMain | None = None,
    ) -> None:
        if count < 1:
            raise ValueError("need at least one worker")
        self.count = count
        self.main = main
        self.control = control
        self._control_sock: socket.socket | None = None
        self.grace = grace
        self.startup_timeout = startup_timeout
        self.workers: dict[int, _Worker] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._signals: list[int] = []

    # -- parent side

    def run(self) -> int:
        """Serve until told to stop; returns the exit status for the main process."""
        os.set_blocking(self._wake_w, False)
        previous = {s: signal.signal(s, self._on_signal) for s in (*_FORWARDED, signal.SIGCHLD)}
        observe_dir = _observe_dir(self.count)
        try:
            try:
                if self.control is not None:
                    self._control_sock = _control_socket(observe_dir)
                    self._spawn(CONTROL)
                    self._wait_ready()  # workers ask it for their routes as they start
                for index in range(self.count):
                    self._spawn(index)
                self._wait_ready()
            except StartupFailed as exc:
                self._stop_all(signal.SIGTERM)
                return exc.status
            log.info(
                "workers serving",
                extra={"action": "ready", "workers": self.count, "pids": sorted(self._worker_pids())},
            )
            sdnotify.ready()
            return self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._control_sock is not None:
                self._control_sock.close()
                os.environ.pop(CONTROL_SOCKET_ENV, None)
            shutil.rmtree(observe_dir, ignore_errors=True)
            for name in (OBSERVE_DIR_ENV, STARTED_ENV, WORKERS_ENV):
                os.environ.pop(name, None)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)
        try:
            os.write(self._wake_w, b"!")
        except OSError as exc:  # pragma: no cover - pipe full means a wake-up is pending anyway
            if exc.errno != errno.EAGAIN:
                raise

    def _spawn(self, index: int, failures: list[float] | None = None) -> None:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            status = 1
            try:
                # A process group of its own: a Ctrl-C (or `kill -TERM -PGID`, or `timeout`) reaches
                # only the supervisor, which passes it on once. Reaching a worker twice, the same
                # signal would count as the second one, "stop now", and skip the grace period.
                os.setpgid(0, 0)
                for sig in (*_FORWARDED, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                if index != CONTROL:
                    os.environ[WORKER_ENV] = str(index)  # observability: which worker publishes
                os.environ.pop("NOTIFY_SOCKET", None)  # only the main process talks to systemd
                os.close(self._wake_r)
                os.close(self._wake_w)
                for other in self.workers.values():
                    os.close(other.ready_fd)

                def ready() -> None:
                    os.write(ready_w, b"R")
                    os.close(ready_w)

                if index == CONTROL:
                    assert self.control is not None and self._control_sock is not None
                    status = self.control(self._control_sock, ready)
                else:
                    if self._control_sock is not None:
                        self._control_sock.close()  # only the control plane accepts on it
                    status = self.main(index, ready)
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker failed", extra={"worker": index})
            finally:
                logging.shutdown()
                os._exit(status)
        os.close(ready_w)
        self.workers[pid] = _Worker(index, pid, time.monotonic(), ready_r, failures=failures or [])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not all(w.ready for w in self.workers.values()):
            self._reap(starting=True)
            pending = [w.ready_fd for w in self.workers.values() if not w.ready]
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                log.error("workers did not start in time", extra={"action": "start"})
                raise StartupFailed(1)
            readable = _select([*pending, self._wake_r], timeout)
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
                if any(s in (signal.SIGTERM, signal.SIGINT) for s in self._signals):
                    raise StartupFailed(0)
            for worker in self.workers.values():
                if worker.ready_fd in readable and os.read(worker.ready_fd, 1) == b"R":
                    worker.ready = True

    def _supervise(self) -> int:
        while True:
            _select([self._wake_r], None)
            os.read(self._wake_r, 4096)
            signals, self._signals = self._signals, []
            for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    sdnotify.stopping()
                    log.info("stopping workers", extra={"action": "shutdown", "grace_s": self.grace})
                    self._stop_all(signal.SIGTERM)
                    return 0
                if signum == signal.SIGHUP:
                    sdnotify.reloading()  # the control plane (else each worker) reloads; we pass it on
                    self._signal_all(signal.SIGHUP, control=True)
                    sdnotify.ready()
                if signum == signal.SIGUSR1:
                    self._signal_all(signal.SIGUSR1, control=False)  # reopen the access log (logrotate)
            self._reap(starting=False)

    def _reap(self, *, starting: bool) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            os.close(worker.ready_fd)
            code = os.waitstatus_to_exitcode(status)
            if starting and not worker.ready:
                raise StartupFailed(code if code > 0 else 1)
            self._restart(worker, code)

    def _restart(self, worker: _Worker, code: int) -> None:
        now = time.monotonic()
        recent = [t for t in worker.failures if now - t < 60] + [now]
        crashing = now - worker.started < _HEALTHY_AFTER
        delay = min(_RESTART_BACKOFF_MAX, 0.1 * 2 ** len(recent)) if crashing else 0.0
        log.error(
            "control plane exited; restarting" if worker.index == CONTROL else "worker exited; restarting",
            extra={
                "action": "restart",
                "worker": worker.index,
                "pid": worker.pid,
                "status": code,
                "restart_in_s": round(delay, 2),
            },
        )
        if delay:
            time.sleep(delay)  # the parent has no other work: blocking here delays only this restart
        self._spawn(worker.index, recent)

    def _worker_pids(self) -> list[int]:
        return [pid for pid, w in self.workers.items() if w.index != CONTROL]

    def _signal_all(self, signum: int, *, control: bool | None = None) -> None:
        """Signal every child; `control` True: the control plane alone (when there is one),
        False: the workers alone, None: all of them."""
        has_control = any(w.index == CONTROL for w in self.workers.values())
        for pid, worker in list(self.workers.items()):
            is_control = worker.index == CONTROL
            if control is None or (control and not has_control) or is_control == control:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    def _stop_all(self, signum: int) -> None:
        """Signal every worker and reap them; a second SIGTERM/SIGINT is passed on at once.

        Each worker treats the second signal as "stop now" (it closes its live connections
        instead of waiting out the grace period), so the whole group stops promptly. The control
        plane stops last: until then the workers' links stay up, and none mistakes the
        shutdown for a crash of the control plane.
        """
        self._signal_all(signum, control=False)
        control_told = False
        self._signals.clear()
        deadline = time.monotonic() + self.grace + 5.0
        while self.workers and time.monotonic() < deadline:
            if not control_told and not self._worker_pids():
                control_told = True
                self._signal_all(signum)  # only the control plane is left
            if any(s in (signal.SIGTERM, signal.SIGINT) for s in self._signals):
                self._signals.clear()
                log.warning("second signal: workers stop now", extra={"action": "shutdown"})
                self._signal_all(signal.SIGTERM)
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                if _select([self._wake_r], 0.05):
                    os.read(self._wake_r, 4096)  # a signal or SIGCHLD: look again at once
                continue
            worker = self.workers.pop(pid, None)
            if worker is not None:
                os.close(worker.ready_fd)
        for pid in list(self.workers):
            log.error("worker did not stop in time; killing it", extra={"pid": pid})
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.workers.pop(pid, None)


def _select(fds: list[int], timeout: float | None) -> list[int]:
    try:
        readable, _, _ = select.select(fds, [], [], timeout)
    except InterruptedError:  # pragma: no cover - PEP 475 retries, but be explicit
        return []
    return readable


def cpu_count() -> int:
    """CPUs this process may run on (respects taskset/cgroup pinning, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover
        return os.cpu_count() or 1


def _control_socket(directory: str) -> socket.socket:
    """The control plane's listening socket, in the private (0700) directory, named in the
    environment the workers inherit."""
    path = os.path.join(directory, "control.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(256)
    os.environ[CONTROL_SOCKET_ENV] = path
    return sock


def _observe_dir(workers: int) -> str:
    """A private directory where workers publish their metrics (see `portway.metrics`).

    On tmpfs where there is one (the files are rewritten twice a second), mode 0700, removed on
    exit; named in the environment the workers inherit.
    """
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = tempfile.mkdtemp(prefix="portway-observe-", dir=base)
    os.environ[OBSERVE_DIR_ENV] = path
    os.environ[WORKERS_ENV] = str(workers)
    os.environ[STARTED_ENV] = repr(time.time())  # the service's uptime survives a worker restart
    return path
