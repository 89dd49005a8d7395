"""Prometheus metrics: plain integer tables on the hot path, exported only when scraped.

Why tables and not ``prometheus_client`` objects per connection: a labelled ``Counter.inc`` takes a
lock and walks a label dict (a few microseconds); a connection reports three or four events, which
at 8,000 connections/s would cost several percent of a core. `MetricsObserver` instead bumps plain
``dict[tuple, int]`` entries (tens of nanoseconds each, one event loop thread, no lock) and
`PortwayCollector` turns the tables into metric families when Prometheus asks. Byte and datagram
counts arrive once per connection in `ConnectionRecord`, never per chunk.

Workers (``workers: N``): one scrape must return the sum over every worker, and neither lose nor
double a dead worker's counters. prometheus_client's multiprocess mode would need each table delta
replayed through the metric objects (histograms have no public "add N to bucket" call), so instead
each worker publishes its whole table as one small JSON file every `PUBLISH_INTERVAL` seconds
(`WorkerPublisher`, a loop timer, off the data path: write a temporary file and rename it over the
old one, so a reader never sees half a file). The supervisor's admin listener reads them
(`WorkerFiles`): counters are summed over every file ever written, live or dead, so a restarted
worker's predecessor keeps counting exactly once (its file is folded into a retired total and
removed); gauges (active connections, target health, loop lag) come only from live workers whose
file is fresh. A crashing worker loses at most its last `PUBLISH_INTERVAL` of counts.

Cardinality is bounded by construction: keys are routes, targets, protocols and fixed reason and
direction words, never a client address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from portway.events import CLOSE_REASONS, ConnectionRecord, Protocol_

__all__ = [
    "DIAL_BUCKETS",
    "PUBLISH_INTERVAL",
    "LoopLagProbe",
    "MetricsObserver",
    "PortwayCollector",
    "Tables",
    "TargetSource",
    "TargetState",
    "WorkerFiles",
    "WorkerPublisher",
    "local_registry",
    "render",
]

#: Dial latency buckets (seconds): loopback dials take ~0.1 ms, a remote data centre tens of ms,
#: and anything past the connect timeout's usual 5 s is a failure rather than a dial.
DIAL_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: How often a worker publishes its tables; also the most a crashing worker's counters can lose.
PUBLISH_INTERVAL = 0.5
#: A worker file older than this is not a live worker's (its gauges no longer count).
STALE_AFTER = 5.0

#: (route, target, up, active connections)
TargetState = tuple[str, str, bool, int]


class TargetSource(Protocol):
    """Where per-target health and load come from (the server's pools); pulled at scrape time."""

    def targets(self) -> Iterable[TargetState]: ...


@dataclass
class Tables:
    """Every counter and gauge as plain numbers, keyed by bounded label tuples."""

    connections: dict[tuple[str, str], int] = field(default_factory=dict)
    active: dict[tuple[str, str], int] = field(default_factory=dict)
    closes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    bytes_c2t: dict[tuple[str, str], int] = field(default_factory=dict)
    bytes_t2c: dict[tuple[str, str], int] = field(default_factory=dict)
    datagrams_c2t: dict[str, int] = field(default_factory=dict)
    datagrams_t2c: dict[str, int] = field(default_factory=dict)
    dropped: dict[tuple[str, str], int] = field(default_factory=dict)
    acl_denied: dict[str, int] = field(default_factory=dict)
    #: (route, target) -> per-bucket counts (not cumulative; the last is +Inf), and the sums.
    dial_buckets: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    dial_sum: dict[tuple[str, str], float] = field(default_factory=dict)
    reloads: dict[str, int] = field(default_factory=dict)
    last_reload_success: float = 0.0
    access_log_dropped: int = 0
    # Gauges (summed over live workers only when merged):
    loop_lag: float = 0.0
    targets: list[TargetState] = field(default_factory=list)

    _COUNTERS = (
        "connections",
        "closes",
        "bytes_c2t",
        "bytes_t2c",
        "datagrams_c2t",
        "datagrams_t2c",
        "dropped",
        "acl_denied",
        "reloads",
    )

    def add_counters(self, other: Tables) -> None:
        """Add `other`'s counters (not its gauges) into this table."""
        for name in self._COUNTERS:
            mine: dict[Any, int] = getattr(self, name)
            for key, value in getattr(other, name).items():
                mine[key] = mine.get(key, 0) + value
        for key, counts in other.dial_buckets.items():
            have = self.dial_buckets.setdefault(key, [0] * len(counts))
            for i, n in enumerate(counts):
                have[i] += n
            self.dial_sum[key] = self.dial_sum.get(key, 0.0) + other.dial_sum.get(key, 0.0)
        self.last_reload_success = max(self.last_reload_success, other.last_reload_success)
        self.access_log_dropped += other.access_log_dropped

    def add_gauges(self, other: Tables) -> None:
        for key, value in other.active.items():
            self.active[key] = self.active.get(key, 0) + value
        self.loop_lag = max(self.loop_lag, other.loop_lag)
        self.targets.extend(other.targets)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in (*self._COUNTERS, "active", "dial_buckets", "dial_sum"):
            table: dict[Any, Any] = getattr(self, name)
            out[name] = [[*(k if isinstance(k, tuple) else (k,)), v] for k, v in table.items()]
        out["last_reload_success"] = self.last_reload_success
        out["access_log_dropped"] = self.access_log_dropped
        out["loop_lag"] = self.loop_lag
        out["targets"] = [list(t) for t in self.targets]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tables:
        t = cls()
        for name in (*cls._COUNTERS, "active", "dial_buckets", "dial_sum"):
            table: dict[Any, Any] = getattr(t, name)
            for row in data.get(name, []):
                *key, value = row
                table[tuple(key) if len(key) > 1 else key[0]] = value
        t.last_reload_success = float(data.get("last_reload_success", 0.0))
        t.access_log_dropped = int(data.get("access_log_dropped", 0))
        t.loop_lag = float(data.get("loop_lag", 0.0))
        t.targets = [(str(r), str(tg), bool(up), int(n)) for r, tg, up, n in data.get("targets", [])]
        return t


class MetricsObserver:
    """An `events.Observer` that only bumps integers; see the module docstring for why."""

    __slots__ = ("_lag", "access_log_dropped", "tables", "target_source")

    def __init__(self, target_source: TargetSource | None = None) -> None:
        self.tables = Tables()
        self.target_source = target_source
        #: Read when a snapshot is taken: the access log's drop count lives with the access log.
        self.access_log_dropped: Callable[[], int] | None = None
        self._lag: LoopLagProbe | None = None

    # -- the Observer protocol (hot path)

    def accepted(self, route: str, protocol: Protocol_) -> None:
        key = (route, protocol)
        t = self.tables
        t.connections[key] = t.connections.get(key, 0) + 1
        t.active[key] = t.active.get(key, 0) + 1

    def dialed(self, route: str, target: str, seconds: float) -> None:
        key = (route, target)
        t = self.tables
        counts = t.dial_buckets.get(key)
        if counts is None:
            counts = t.dial_buckets[key] = [0] * (len(DIAL_BUCKETS) + 1)
        counts[bisect_left(DIAL_BUCKETS, seconds)] += 1
        t.dial_sum[key] = t.dial_sum.get(key, 0.0) + seconds

    def closed(self, record: ConnectionRecord) -> None:
        t = self.tables
        route = record.route
        key = (route, record.protocol)
        t.active[key] = t.active.get(key, 0) - 1
        rkey = (route, record.protocol, record.reason)
        t.closes[rkey] = t.closes.get(rkey, 0) + 1
        if record.bytes_client_to_target:
            t.bytes_c2t[key] = t.bytes_c2t.get(key, 0) + record.bytes_client_to_target
        if record.bytes_target_to_client:
            t.bytes_t2c[key] = t.bytes_t2c.get(key, 0) + record.bytes_target_to_client
        if record.protocol == "udp":
            t.datagrams_c2t[route] = t.datagrams_c2t.get(route, 0) + record.datagrams_client_to_target
            t.datagrams_t2c[route] = t.datagrams_t2c.get(route, 0) + record.datagrams_target_to_client
        if record.reason == "acl_denied":
            t.acl_denied[route] = t.acl_denied.get(route, 0) + 1

    def datagram_dropped(self, route: str, reason: str) -> None:
        t = self.tables
        key = (route, reason)
        t.dropped[key] = t.dropped.get(key, 0) + 1
        if reason == "acl_denied":
            t.acl_denied[route] = t.acl_denied.get(route, 0) + 1

    # -- cold path

    def reloaded(self, ok: bool, when: float | None = None) -> None:
        """A config reload was applied (`ok`) or refused."""
        result = "success" if ok else "failure"
        t = self.tables
        t.reloads[result] = t.reloads.get(result, 0) + 1
        if ok:
            t.last_reload_success = time.time() if when is None else when

    def start_lag_probe(self, interval: float = 0.5) -> LoopLagProbe:
        """Measure this loop's lag from now on (call on the loop that serves the routes)."""
        self._lag = LoopLagProbe(interval)
        self._lag.start()
        return self._lag

    def stop(self) -> None:
        if self._lag is not None:
            self._lag.stop()

    def snapshot(self) -> Tables:
        """A copy of the tables with the pulled figures filled in (the scrape or publish moment)."""
        t = self.tables
        out = Tables.from_json(t.to_json())
        out.loop_lag = self._lag.lag if self._lag is not None else 0.0
        if self.access_log_dropped is not None:
            out.access_log_dropped = self.access_log_dropped()
        if self.target_source is not None:
            out.targets = list(self.target_source.targets())
        return out


class LoopLagProbe:
    """How late a timer fires: the time every ready callback waited behind the others.

    One `call_at` every `interval` costs nothing measurable; the figure is the last lateness seen.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.lag = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self.interval
        self._handle = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        self.lag = max(0.0, now - self._due)
        self._due = now + self.interval
        self._handle = loop.call_at(self._due, self._tick, loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


# -- export


class PortwayCollector:
    """A prometheus_client collector over `snapshot()` (a local observer or the workers' files)."""

    def __init__(self, snapshot: Callable[[], Tables]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families are only known at collect time

    def collect(self) -> Iterator[Metric]:
        yield from families(self.snapshot())


def families(t: Tables) -> Iterator[Metric]:
    """The metric families of a table, with exactly the names and labels of the contract (issue 10)."""
    c = CounterMetricFamily(
        "portway_connections",
        "TCP connections accepted and UDP sessions created.",
        labels=("route", "protocol"),
    )
    for (route, proto), n in sorted(t.connections.items()):
        c.add_metric((route, proto), n)
    yield c
    g = GaugeMetricFamily(
        "portway_connections_active",
        "Open TCP connections and live UDP sessions.",
        labels=("route", "protocol"),
    )
    for key in sorted(t.connections.keys() | t.active.keys()):
        g.add_metric(key, max(0, t.active.get(key, 0)))
    yield g
    c = CounterMetricFamily(
        "portway_connection_closes",
        "Connections and sessions ended, by why.",
        labels=("route", "protocol", "reason"),
    )
    for (route, proto), _n in sorted(t.connections.items()):
        # Every reason is present from the first connection on, so rate() and alerts see zeros.
        for reason in CLOSE_REASONS:
            c.add_metric((route, proto, reason), t.closes.get((route, proto, reason), 0))
    for (route, proto, why), n in sorted(t.closes.items()):
        if (route, proto) not in t.connections:
            c.add_metric((route, proto, why), n)
    yield c
    c = CounterMetricFamily(
        "portway_bytes",
        "Payload bytes relayed, counted when a connection or session ends.",
        labels=("route", "protocol", "direction"),
    )
    for key in sorted(t.connections.keys() | t.bytes_c2t.keys() | t.bytes_t2c.keys()):
        c.add_metric((*key, "client_to_target"), t.bytes_c2t.get(key, 0))
        c.add_metric((*key, "target_to_client"), t.bytes_t2c.get(key, 0))
    yield c
    c = CounterMetricFamily(
        "portway_udp_datagrams",
        "UDP datagrams relayed, counted when a session ends.",
        labels=("route", "direction"),
    )
    udp_routes = {r for r, p in t.connections if p == "udp"} | t.datagrams_c2t.keys() | t.datagrams_t2c.keys()
    for route in sorted(udp_routes):
        c.add_metric((route, "client_to_target"), t.datagrams_c2t.get(route, 0))
        c.add_metric((route, "target_to_client"), t.datagrams_t2c.get(route, 0))
    yield c
    c = CounterMetricFamily(
        "portway_udp_datagrams_dropped", "UDP datagrams dropped, by why.", labels=("route", "reason")
    )
    for key, n in sorted(t.dropped.items()):
        c.add_metric(key, n)
    yield c
    h = HistogramMetricFamily(
        "portway_dial_duration_seconds", "Time to connect to a target.", labels=("route", "target")
    )
    bounds = [*(repr(float(b)) for b in DIAL_BUCKETS), "+Inf"]
    for key, counts in sorted(t.dial_buckets.items()):
        cumulative, running = [], 0
        for bound, n in zip(bounds, counts, strict=True):
            running += n
            cumulative.append((bound, running))
        h.add_metric(key, cumulative, t.dial_sum.get(key, 0.0))
    yield h
    up = GaugeMetricFamily("portway_target_up", "1 if the target is healthy.", labels=("route", "target"))
    act = GaugeMetricFamily(
        "portway_target_connections_active", "Open connections to the target.", labels=("route", "target")
    )
    merged: dict[tuple[str, str], list[int]] = {}
    for route, target, is_up, active in t.targets:
        have = merged.setdefault((route, target), [0, 0])
        have[0] = max(have[0], int(is_up))  # workers: up if any live worker sees it up
        have[1] += active
    for key, (u, a) in sorted(merged.items()):
        up.add_metric(key, u)
        act.add_metric(key, a)
    yield up
    yield act
    c = CounterMetricFamily(
        "portway_acl_denied", "Connections and datagrams refused by the ACL.", labels=("route",)
    )
    for route, n in sorted(t.acl_denied.items()):
        c.add_metric((route,), n)
    yield c
    c = CounterMetricFamily("portway_config_reloads", "Config reloads, by result.", labels=("result",))
    for result in ("success", "failure"):
        c.add_metric((result,), t.reloads.get(result, 0))
    yield c
    yield GaugeMetricFamily(
        "portway_config_last_reload_success_timestamp_seconds",
        "When the config was last loaded or reloaded successfully (Unix time).",
        value=t.last_reload_success,
    )
    yield CounterMetricFamily(
        "portway_access_log_dropped",
        "Access log lines dropped because the writer could not keep up (slow or full disk).",
        value=t.access_log_dropped,
    )
    yield GaugeMetricFamily(
        "portway_event_loop_lag_seconds",
        "How late the event loop ran a timer, last measured (workers: the worst live worker).",
        value=t.loop_lag,
    )


def local_registry(snapshot: Callable[[], Tables]) -> CollectorRegistry:
    """A registry for one process: portway's families and the process figures (fds, RSS, CPU)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PortwayCollector(snapshot))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition (format 0.0.4)."""
    return generate_latest(registry)


# -- workers


class WorkerPublisher:
    """Publishes a worker's tables (and status) to its file every `interval` seconds.

    Runs as a loop timer: the JSON of a few hundred numbers takes microseconds, and the file lives
    in a private directory the supervisor made (tmpfs where there is one).
    """

    def __init__(
        self,
        directory: str | Path,
        index: int,
        snapshot: Callable[[], Tables],
        *,
        status: Callable[[], Any] | None = None,
        interval: float = PUBLISH_INTERVAL,
    ) -> None:
        self.index = index
        self.snapshot = snapshot
        self.status = status
        self.interval = interval
        self.pid = os.getpid()
        #: pid and a start stamp: a reused pid never overwrites a dead worker's file.
        self.path = Path(directory) / f"worker-{self.pid}-{time.time_ns()}.json"
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.publish()
        self._schedule()

    def _schedule(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self.publish()
        self._schedule()

    def publish(self) -> None:
        data = {
            "pid": self.pid,
            "worker": self.index,
            "tables": self.snapshot().to_json(),
            "open_fds": _open_fds(),
            "rss": _rss_bytes(),
            "status": self.status() if self.status is not None else None,
        }
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full tmpfs costs the metrics freshness, never the proxy

    def stop(self) -> None:
        """Publish once more (the final counts) and stop."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.publish()


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class WorkerFile:
    pid: int
    worker: int
    tables: Tables
    open_fds: int
    rss: int
    status: Any
    mtime: float


class WorkerFiles:
    """The supervisor's view of every worker's published tables (see the module docstring).

    Only one thread (the admin listener's) reads and folds; workers only replace their own file.
    """

    def __init__(self, directory: str | Path, *, alive: Callable[[int], bool] | None = None) -> None:
        self.directory = Path(directory)
        self.alive = alive if alive is not None else _pid_alive
        #: Counters of workers that have exited, their files folded in and removed. Kept on disk
        #: too (with the names folded but maybe not yet removed), so a restarted reader (worker 0
        #: hosts the admin listener) neither loses nor re-adds them.
        self.retired = Tables()
        self._folded: set[str] = set()
        self._retired_path = self.directory / "retired.json"
        try:
            data = json.loads(self._retired_path.read_text())
            self.retired = Tables.from_json(data["tables"])
            self._folded = set(data["folded"])
        except (OSError, ValueError, KeyError, TypeError):
            pass

    def read(self) -> tuple[Tables, list[WorkerFile]]:
        """(counters of every worker ever + gauges of live ones, the live workers' files)."""
        total = Tables()
        total.add_counters(self.retired)
        live: list[WorkerFile] = []
        now = time.time()
        for path in sorted(self.directory.glob("worker-*.json")):
            if path.name in self._folded:  # folded before a crash, not yet removed
                with contextlib.suppress(OSError):
                    path.unlink()
                self._folded.discard(path.name)
                continue
            wf = _read_worker_file(path)
            if wf is None:
                continue
            if not self.alive(wf.pid):
                self._fold(path, wf)
                total.add_counters(wf.tables)
                continue
            total.add_counters(wf.tables)
            if now - wf.mtime <= STALE_AFTER:
                total.add_gauges(wf.tables)
                live.append(wf)
        return total, live

    def snapshot(self) -> Tables:
        return self.read()[0]

    def _fold(self, path: Path, wf: WorkerFile) -> None:
        """Move a dead worker's counters into the retired total: saved first, then the file removed."""
        self.retired.add_counters(wf.tables)
        self._folded.add(path.name)
        tmp = self._retired_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"tables": self.retired.to_json(), "folded": sorted(self._folded)}))
            os.replace(tmp, self._retired_path)
        except OSError:
            return  # keep the file; folded in memory, so it is not counted twice by this reader
        with contextlib.suppress(OSError):
            path.unlink()
        self._folded.discard(path.name)


def _read_worker_file(path: Path) -> WorkerFile | None:
    try:
        mtime = path.stat().st_mtime
        data = json.loads(path.read_text())
        return WorkerFile(
            pid=int(data["pid"]),
            worker=int(data["worker"]),
            tables=Tables.from_json(data["tables"]),
            open_fds=int(data.get("open_fds", 0)),
            rss=int(data.get("rss", 0)),
            status=data.get("status"),
            mtime=mtime,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # vanished between glob and read, or being replaced: the next scrape sees it


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkersCollector:
    """Per-worker process figures, since the supervisor's own process collector sees only itself."""

    def __init__(self, files: WorkerFiles) -> None:
        self.files = files

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        _, live = self.files.read()
        fds = GaugeMetricFamily("portway_worker_open_fds", "Open file descriptors.", labels=("worker",))
        rss = GaugeMetricFamily(
            "portway_worker_resident_memory_bytes", "Resident memory.", labels=("worker",)
        )
        for wf in sorted(live, key=lambda w: w.worker):
            fds.add_metric((str(wf.worker),), wf.open_fds)
            rss.add_metric((str(wf.worker),), wf.rss)
        yield fds
        yield rss


def workers_registry(files: WorkerFiles) -> CollectorRegistry:
    """The supervisor's registry: the sum over workers, its own process figures, each worker's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PortwayCollector(files.snapshot))
    registry.register(WorkersCollector(files))
    ProcessCollector(registry=registry)
    return registry
