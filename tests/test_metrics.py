"""metrics.py: the integer tables, their exposition (parsed back with prometheus_client's parser),
and the workers' files summed without losing or doubling a dead worker's counters."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from portway.events import CLOSE_REASONS, ConnectionRecord, Fanout
from portway.metrics import (
    DIAL_BUCKETS,
    MetricsObserver,
    Tables,
    TargetState,
    WorkerFiles,
    WorkerPublisher,
    local_registry,
    render,
    workers_registry,
)
from tests.polling import eventually


def record(
    route: str = "web",
    protocol: str = "tcp",
    reason: str = "normal",
    c2t: int = 0,
    t2c: int = 0,
    dg: tuple[int, int] = (0, 0),
    target: str | None = "127.0.0.1:80",
) -> ConnectionRecord:
    return ConnectionRecord(
        route=route,
        protocol=protocol,  # type: ignore[arg-type]
        client=("127.0.0.1", 40000),
        target=target,
        started=1_700_000_000.0,
        duration=0.5,
        bytes_client_to_target=c2t,
        bytes_target_to_client=t2c,
        reason=reason,  # type: ignore[arg-type]
        datagrams_client_to_target=dg[0],
        datagrams_target_to_client=dg[1],
    )


class FakeTargets:
    """A plain in-memory TargetSource (the server's pools stand-in)."""

    def __init__(self, states: list[TargetState]) -> None:
        self.states = states

    def targets(self) -> Iterable[TargetState]:
        return list(self.states)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]


def feed_known_events(m: MetricsObserver) -> None:
    for _ in range(3):
        m.accepted("web", "tcp")
    m.dialed("web", "127.0.0.1:80", 0.0002)
    m.dialed("web", "127.0.0.1:80", 0.003)
    m.closed(record(c2t=100, t2c=1000))
    m.closed(record(c2t=50, t2c=5, reason="client_reset"))
    m.accepted("web", "tcp")
    m.closed(record(reason="acl_denied", target=None))
    m.accepted("dns", "udp")
    m.closed(record("dns", "udp", "idle_timeout", c2t=30, t2c=90, dg=(3, 2), target="127.0.0.1:53"))
    m.datagram_dropped("dns", "limit")
    m.datagram_dropped("dns", "acl_denied")
    m.reloaded(True, when=1234.5)
    m.reloaded(False)


def test_exposition_has_exactly_the_contract_series() -> None:
    m = MetricsObserver(FakeTargets([("web", "127.0.0.1:80", True, 1), ("web", "127.0.0.1:81", False, 0)]))
    feed_known_events(m)
    parsed = samples(render(local_registry(m.snapshot)))

    assert value(parsed, "portway_connections_total", route="web", protocol="tcp") == 4
    assert value(parsed, "portway_connections_total", route="dns", protocol="udp") == 1
    assert value(parsed, "portway_connections_active", route="web", protocol="tcp") == 1
    assert value(parsed, "portway_connections_active", route="dns", protocol="udp") == 0
    for reason in CLOSE_REASONS:
        want = {"normal": 1, "client_reset": 1, "acl_denied": 1}.get(reason, 0)
        assert (
            value(parsed, "portway_connection_closes_total", route="web", protocol="tcp", reason=reason)
            == want
        )
    assert (
        value(parsed, "portway_bytes_total", route="web", protocol="tcp", direction="client_to_target") == 150
    )
    assert (
        value(parsed, "portway_bytes_total", route="web", protocol="tcp", direction="target_to_client")
        == 1005
    )
    assert (
        value(parsed, "portway_bytes_total", route="dns", protocol="udp", direction="target_to_client") == 90
    )
    assert value(parsed, "portway_udp_datagrams_total", route="dns", direction="client_to_target") == 3
    assert value(parsed, "portway_udp_datagrams_total", route="dns", direction="target_to_client") == 2
    assert value(parsed, "portway_udp_datagrams_dropped_total", route="dns", reason="limit") == 1
    assert value(parsed, "portway_acl_denied_total", route="web") == 1
    assert value(parsed, "portway_acl_denied_total", route="dns") == 1
    h = {"route": "web", "target": "127.0.0.1:80"}
    assert value(parsed, "portway_dial_duration_seconds_count", **h) == 2
    assert value(parsed, "portway_dial_duration_seconds_bucket", le="0.0005", **h) == 1
    assert value(parsed, "portway_dial_duration_seconds_bucket", le="0.0025", **h) == 1
    assert value(parsed, "portway_dial_duration_seconds_bucket", le="0.005", **h) == 2
    assert value(parsed, "portway_dial_duration_seconds_bucket", le="+Inf", **h) == 2
    assert abs(value(parsed, "portway_dial_duration_seconds_sum", **h) - 0.0032) < 1e-9
    assert value(parsed, "portway_target_up", route="web", target="127.0.0.1:80") == 1
    assert value(parsed, "portway_target_up", route="web", target="127.0.0.1:81") == 0
    assert value(parsed, "portway_target_connections_active", route="web", target="127.0.0.1:80") == 1
    assert value(parsed, "portway_config_reloads_total", result="success") == 1
    assert value(parsed, "portway_config_reloads_total", result="failure") == 1
    assert value(parsed, "portway_config_last_reload_success_timestamp_seconds") == 1234.5
    assert value(parsed, "portway_access_log_dropped_total") == 0
    assert ("portway_event_loop_lag_seconds", ()) in parsed
    assert value(parsed, "process_open_fds") > 0
    assert value(parsed, "process_resident_memory_bytes") > 0
    # Bounded cardinality: no client address anywhere in the labels.
    assert not any("40000" in v for _, labels in parsed for _, v in labels)


def test_dial_buckets_are_le_bounds() -> None:
    """A dial of exactly a bucket's bound falls in that bucket (Prometheus `le` semantics)."""
    m = MetricsObserver()
    for bound in DIAL_BUCKETS:
        m.dialed("r", "t", bound)
    m.dialed("r", "t", 99.0)
    counts = m.tables.dial_buckets[("r", "t")]
    assert counts == [1] * len(DIAL_BUCKETS) + [1]


def test_fanout_reaches_metrics_and_another_observer() -> None:
    a, b = MetricsObserver(), MetricsObserver()
    f = Fanout([a, b])
    f.accepted("r", "tcp")
    f.closed(record("r", c2t=7))
    assert a.tables.bytes_c2t == b.tables.bytes_c2t == {("r", "tcp"): 7}


async def test_loop_lag_probe_sees_a_blocked_loop() -> None:
    m = MetricsObserver()
    probe = m.start_lag_probe(interval=0.01)
    try:
        await asyncio.sleep(0.02)
        time.sleep(0.15)  # noqa: ASYNC251 - blocking the loop is the point: the probe must see it

        async def seen() -> bool:
            return probe.lag >= 0.05

        await eventually(seen, step=0.005)
        assert 0.05 <= m.snapshot().loop_lag < 1.0
    finally:
        m.stop()


counter_tables = st.builds(
    lambda conns, closes, dropped: _tables(conns, closes, dropped),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 10**12), max_size=3),
    st.dictionaries(st.sampled_from(CLOSE_REASONS), st.integers(0, 10**6), max_size=4),
    st.dictionaries(st.sampled_from(["limit", "queue_full"]), st.integers(0, 100), max_size=2),
)


def _tables(conns: dict[str, int], closes: dict[str, int], dropped: dict[str, int]) -> Tables:
    t = Tables()
    t.connections = {(r, "tcp"): n for r, n in conns.items()}
    t.closes = {("a", "tcp", reason): n for reason, n in closes.items()}
    t.dropped = {("u", reason): n for reason, n in dropped.items()}
    t.dial_buckets = {("a", "x"): [len(conns)] * (len(DIAL_BUCKETS) + 1)}
    t.dial_sum = {("a", "x"): 0.25 * len(conns)}
    return t


@given(st.lists(counter_tables, max_size=5))
def test_json_round_trip_and_sums(parts: list[Tables]) -> None:
    total = Tables()
    for part in parts:
        again = Tables.from_json(json.loads(json.dumps(part.to_json())))
        assert again.to_json() == part.to_json()
        total.add_counters(again)
    for key in {k for p in parts for k in p.connections}:
        assert total.connections[key] == sum(p.connections.get(key, 0) for p in parts)
    for key in {k for p in parts for k in p.closes}:
        assert total.closes[key] == sum(p.closes.get(key, 0) for p in parts)


def _publish(directory: Path, pid: int, index: int, tables: Tables) -> Path:
    """A worker file as `WorkerPublisher` writes it, for a pretend pid."""
    path = directory / f"worker-{pid}-{index}.json"
    path.write_text(json.dumps({"pid": pid, "worker": index, "tables": tables.to_json(), "status": None}))
    return path


def _one_worker(conns: int, active: int, lag: float = 0.0) -> Tables:
    t = Tables()
    t.connections[("web", "tcp")] = conns
    t.active[("web", "tcp")] = active
    t.bytes_c2t[("web", "tcp")] = conns * 10
    t.loop_lag = lag
    t.targets = [("web", "127.0.0.1:80", True, active)]
    return t


def test_workers_sum_and_a_dead_worker_counts_exactly_once(tmp_path: Path) -> None:
    alive = {101, 102}
    files = WorkerFiles(tmp_path, alive=lambda pid: pid in alive)
    _publish(tmp_path, 101, 0, _one_worker(5, 2, lag=0.01))
    _publish(tmp_path, 102, 1, _one_worker(7, 3, lag=0.03))
    total = files.snapshot()
    assert total.connections[("web", "tcp")] == 12
    assert total.active[("web", "tcp")] == 5
    assert total.loop_lag == 0.03
    assert sorted(t[3] for t in total.targets) == [2, 3]

    # Worker 1 dies; its replacement (pid 103) starts from zero.
    alive.discard(102)
    alive.add(103)
    _publish(tmp_path, 103, 1, _one_worker(1, 1))
    for _ in range(3):  # every scrape after the death: counted once, folded, never again
        total = files.snapshot()
        assert total.connections[("web", "tcp")] == 5 + 7 + 1
        assert total.bytes_c2t[("web", "tcp")] == 130
        assert total.active[("web", "tcp")] == 2 + 1  # the dead worker's connections died with it
    assert not list(tmp_path.glob("worker-102-*"))

    # The reader itself restarts (worker 0 hosts the admin listener): the retired total survives.
    again = WorkerFiles(tmp_path, alive=lambda pid: pid in alive)
    assert again.snapshot().connections[("web", "tcp")] == 13


def test_a_fold_interrupted_before_the_unlink_is_not_counted_twice(tmp_path: Path) -> None:
    files = WorkerFiles(tmp_path, alive=lambda pid: False)
    dead = _publish(tmp_path, 201, 0, _one_worker(4, 0))
    content = dead.read_text()
    assert files.snapshot().connections[("web", "tcp")] == 4
    # As if the reader crashed after saving retired.json but before removing the file:
    dead.write_text(content)
    retired = json.loads((tmp_path / "retired.json").read_text())
    retired["folded"] = [dead.name]
    (tmp_path / "retired.json").write_text(json.dumps(retired))
    assert WorkerFiles(tmp_path, alive=lambda pid: False).snapshot().connections[("web", "tcp")] == 4


async def test_publisher_writes_what_the_supervisor_exports(tmp_path: Path) -> None:
    m = MetricsObserver()
    m.accepted("web", "tcp")
    m.closed(record(c2t=3, t2c=4))
    publisher = WorkerPublisher(tmp_path, 0, m.snapshot, interval=0.01)
    publisher.start()
    try:
        m.accepted("web", "tcp")
        path = publisher.path

        def published_conns() -> int:
            tables = json.loads(path.read_text())["tables"]
            return int(next(row[-1] for row in tables["connections"]))

        async def published() -> bool:  # the timer publishes the later event too
            return published_conns() == 2

        await eventually(published, step=0.01)
    finally:
        publisher.stop()
    parsed = samples(render(workers_registry(WorkerFiles(tmp_path))))
    assert value(parsed, "portway_connections_total", route="web", protocol="tcp") == 2
    assert value(parsed, "portway_connections_active", route="web", protocol="tcp") == 1
    assert (
        value(parsed, "portway_bytes_total", route="web", protocol="tcp", direction="target_to_client") == 4
    )
    assert value(parsed, "portway_worker_open_fds", worker="0") > 0
    assert json.loads(path.read_text())["pid"] == os.getpid()
