"""A real Prometheus scrapes the admin listener: the counters it stores are exactly the events fed
to the observers, in one process and summed over workers (a dead worker counted once).

The admin listener runs in its own thread (`AdminThread`), so these tests are plain functions and
run once, not once per event loop."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from portway.admin import AdminApp, AdminServer, AdminThread
from portway.metrics import (
    MetricsObserver,
    WorkerFiles,
    WorkerPublisher,
    local_registry,
    render,
    workers_registry,
)
from tests.prometheus_server import Prometheus
from tests.test_metrics import FakeTargets, record

TOKEN = "scrape-token"
N, M = 8, 8 * 1000  # N connections, M bytes each way in all


def admin_thread(metrics: Callable[[], bytes]) -> AdminThread:
    thread = AdminThread(
        lambda: AdminServer(
            AdminApp(metrics=metrics, status=lambda: b"{}", page=b"", token=TOKEN), "127.0.0.1:0"
        )
    )
    thread.start()
    return thread


@pytest.fixture
def scraped(tmp_path: Path) -> Iterator[Callable[[Callable[[], bytes]], Prometheus]]:
    """Serve a metrics producer on an admin listener and point a real Prometheus at it."""
    started: list[tuple[AdminThread, Prometheus]] = []

    def start(metrics: Callable[[], bytes]) -> Prometheus:
        thread = admin_thread(metrics)
        assert thread.server is not None and thread.server.local_addr is not None
        prom = Prometheus(tmp_path, f"127.0.0.1:{thread.server.local_addr[1]}", token=TOKEN)
        started.append((thread, prom))
        prom.start()
        return prom

    yield start
    for thread, prom in started:
        prom.stop()
        thread.stop()


def traffic(m: MetricsObserver, n: int, total_bytes: int, route: str = "web") -> None:
    """n clients each sent total_bytes/n bytes and got as many back."""
    for _ in range(n):
        m.accepted(route, "tcp")
        m.dialed(route, "127.0.0.1:80", 0.001)
        m.closed(record(route, c2t=total_bytes // n, t2c=total_bytes // n))


CONNS = 'portway_connections_total{route="web",protocol="tcp"}'
BYTES = 'portway_bytes_total{route="web",protocol="tcp",direction="%s"}'


def test_one_process(scraped: Callable[[Callable[[], bytes]], Prometheus]) -> None:
    m = MetricsObserver(FakeTargets([("web", "127.0.0.1:80", True, 0)]))
    registry = local_registry(m.snapshot)
    prom = scraped(lambda: render(registry))
    traffic(m, N, M)
    assert prom.wait_value(CONNS, N) == N, prom.target_health()
    for direction in ("client_to_target", "target_to_client"):
        assert prom.wait_value(BYTES % direction, M) == M
    assert prom.wait_value('portway_target_up{route="web",target="127.0.0.1:80"}', 1) == 1
    assert prom.wait_value('portway_connection_closes_total{route="web",reason="normal"}', N) == N
    assert prom.wait_value('portway_dial_duration_seconds_count{route="web"}', N) == N
    assert float(prom.query("process_open_fds")[0]["value"][1]) > 0
    # Live: more traffic shows up in the next scrapes.
    traffic(m, 2, 2000)
    assert prom.wait_value(CONNS, N + 2) == N + 2


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_two_workers_and_a_restart(
    tmp_path: Path, scraped: Callable[[Callable[[], bytes]], Prometheus]
) -> None:
    shared = tmp_path / "observe"
    shared.mkdir()
    files = WorkerFiles(shared)
    registry = workers_registry(files)
    prom = scraped(lambda: render(registry))
    workers = [MetricsObserver(), MetricsObserver()]
    publishers = [WorkerPublisher(shared, i, w.snapshot) for i, w in enumerate(workers)]
    traffic(workers[0], N // 2, M // 2)
    traffic(workers[1], N // 2, M // 2)
    for p in publishers:
        p.publish()
    assert prom.wait_value(CONNS, N) == N, prom.target_health()
    assert prom.wait_value(BYTES % "client_to_target", M) == M

    # Worker 1 dies: its last file stays behind under a pid that no longer exists. A fresh worker 1
    # takes its place; the sum neither drops nor doubles.
    dead = publishers[1].path
    dead.write_text(dead.read_text().replace(f'"pid": {publishers[1].pid}', f'"pid": {dead_pid()}'))
    replacement = MetricsObserver()
    publishers[1] = WorkerPublisher(shared, 1, replacement.snapshot)
    traffic(replacement, 1, 10)
    publishers[1].publish()
    assert prom.wait_value(CONNS, N + 1) == N + 1
    assert prom.wait_value(BYTES % "client_to_target", M + 10) == M + 10
    assert not dead.exists()  # folded into the retired total
    prom.wait_scrapes(2)
    assert prom.wait_value(CONNS, N + 1, timeout=1) == N + 1  # still exactly once
