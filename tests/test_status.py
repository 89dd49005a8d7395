"""status.py: the /api/status values, joined with the metric tables, merged over workers, and
printed as `portway status` prints them."""

from __future__ import annotations

import json

from portway.metrics import MetricsObserver
from portway.status import (
    ProcessStatus,
    RouteStatus,
    StatusTargets,
    TargetStatus,
    build_status,
    format_status,
    merge_routes,
    render_status,
    status_from_json,
)
from tests.test_metrics import record

PROCESS = ProcessStatus("0.1.0", 61.0, 2, "/etc/portway/portway.yml", 1_764_000_000.0, "success")


def routes(active: int, up: bool = True) -> list[RouteStatus]:
    return [
        RouteStatus("web", "tcp", "[::]:443", "example.com", [TargetStatus("10.0.0.1:443", up, active)]),
        RouteStatus("dns", "udp", "0.0.0.0:53", None, []),
    ]


def test_totals_come_from_the_tables_and_round_trip() -> None:
    m = MetricsObserver()
    m.accepted("web", "tcp")
    m.accepted("web", "tcp")
    m.closed(record("web", c2t=10, t2c=2048))
    m.accepted("dns", "udp")
    m.closed(record("dns", "udp", "idle_timeout", c2t=5, t2c=6, dg=(1, 2)))
    status = build_status(routes(1), m.snapshot(), PROCESS)
    web, dns = status.routes
    assert (web.totals.connections, web.totals.active, web.totals.bytes_target_to_client) == (2, 1, 2048)
    assert web.totals.closes == {"normal": 1}
    assert (dns.totals.datagrams_client_to_target, dns.totals.datagrams_target_to_client) == (1, 2)
    again = status_from_json(json.loads(render_status(status)))
    assert again == status


def test_workers_merge_sums_active_and_ors_health() -> None:
    merged = merge_routes([routes(2, up=False), routes(3, up=True), routes(0, up=False)])
    assert [r.name for r in merged] == ["web", "dns"]
    assert merged[0].targets == [TargetStatus("10.0.0.1:443", True, 5)]
    assert merged[0].match == "example.com"


def test_a_status_source_is_a_target_source() -> None:
    class Source:
        def status(self) -> list[RouteStatus]:
            return routes(4)

    assert list(StatusTargets(Source()).targets()) == [("web", "10.0.0.1:443", True, 4)]


def test_the_terminal_table() -> None:
    m = MetricsObserver()
    m.accepted("web", "tcp")
    m.closed(record("web", c2t=10, t2c=3 * 1024 * 1024))
    text = format_status(build_status(routes(0, up=False), m.snapshot(), PROCESS))
    lines = text.splitlines()
    assert lines[0].startswith(
        "portway 0.1.0  up 61s  workers 2  config /etc/portway/portway.yml  last reload "
    )
    assert lines[2].split() == ["ROUTE", "PROTO", "LISTEN", "ACTIVE", "TOTAL", "IN", "OUT", "TARGETS"]
    want = "web (example.com) tcp [::]:443 0 1 10 B 3.0 MiB 10.0.0.1:443 DOWN 0"
    assert lines[3].split() == want.split()
    assert lines[4].split()[:3] == ["dns", "udp", "0.0.0.0:53"] and lines[4].endswith("-")
