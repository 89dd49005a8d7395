"""The schema of ``GET /api/status``: frozen values, their JSON form, and where they come from.

The server knows what runs (routes, listeners, pools and their health: a `StatusSource`); the
metrics know what happened (totals). `build_status` joins the two, so the server keeps no counters
of its own and the totals on the page always agree with ``/metrics``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from portway.metrics import Tables, TargetState

__all__ = [
    "ProcessStatus",
    "RouteStatus",
    "RouteTotals",
    "Status",
    "StatusSource",
    "TargetStatus",
    "build_status",
    "render_status",
    "route_from_json",
    "status_from_json",
    "targets_of",
]

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class TargetStatus:
    target: str  # as written in the config, host:port
    up: bool
    active: int  # open connections to it


@dataclass(frozen=True, slots=True)
class RouteTotals:
    """Since the process (or, with workers, the supervisor) started; summed over workers."""

    connections: int = 0
    active: int = 0
    bytes_client_to_target: int = 0
    bytes_target_to_client: int = 0
    datagrams_client_to_target: int = 0
    datagrams_target_to_client: int = 0
    closes: dict[str, int] = field(default_factory=dict)  # reason -> count, only non-zero reasons


@dataclass(frozen=True, slots=True)
class RouteStatus:
    name: str
    protocol: str  # "tcp" or "udp"
    listen: str  # the actual listen address, host:port
    match: str | None  # what selects this route on a shared listener (e.g. an SNI name), or None
    targets: list[TargetStatus]
    totals: RouteTotals = field(default_factory=RouteTotals)


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    version: str
    uptime: float  # seconds
    workers: int
    config: str  # the config file's path
    last_reload: float | None  # Unix time of the last reload attempt, None before any
    last_reload_result: str | None  # "success" | "failure" | None


@dataclass(frozen=True, slots=True)
class Status:
    process: ProcessStatus
    routes: list[RouteStatus]
    time: float = 0.0  # when this was taken (Unix time)
    schema: int = SCHEMA_VERSION


class StatusSource(Protocol):
    """What the running server reports about its routes (totals left at their defaults)."""

    def status(self) -> list[RouteStatus]: ...


def targets_of(source: StatusSource) -> Iterable[TargetState]:
    """A `metrics.TargetSource` from a `StatusSource`: the server need implement only `status()`."""
    for route in source.status():
        for t in route.targets:
            yield (route.name, t.target, t.up, t.active)


class StatusTargets:
    """Adapts a `StatusSource` to `metrics.TargetSource`."""

    def __init__(self, source: StatusSource) -> None:
        self.source = source

    def targets(self) -> Iterable[TargetState]:
        return targets_of(self.source)


def with_totals(route: RouteStatus, t: Tables) -> RouteStatus:
    """`route` with its totals taken from the metric tables."""
    proto = route.protocol
    key = (route.name, proto)
    closes = {
        reason: n for (r, p, reason), n in sorted(t.closes.items()) if r == route.name and p == proto and n
    }
    totals = RouteTotals(
        connections=t.connections.get(key, 0),
        active=max(0, t.active.get(key, 0)),
        bytes_client_to_target=t.bytes_c2t.get(key, 0),
        bytes_target_to_client=t.bytes_t2c.get(key, 0),
        datagrams_client_to_target=t.datagrams_c2t.get(route.name, 0) if proto == "udp" else 0,
        datagrams_target_to_client=t.datagrams_t2c.get(route.name, 0) if proto == "udp" else 0,
        closes=closes,
    )
    return replace(route, totals=totals)


def build_status(routes: Iterable[RouteStatus], tables: Tables, process: ProcessStatus) -> Status:
    return Status(
        process=process,
        routes=[with_totals(r, tables) for r in routes],
        time=time.time(),
    )


def status_to_json(status: Status) -> dict[str, Any]:
    return asdict(status)


def render_status(status: Status) -> bytes:
    return json.dumps(status_to_json(status), separators=(",", ":")).encode()


def route_to_json(route: RouteStatus) -> dict[str, Any]:
    return asdict(route)


def route_from_json(data: dict[str, Any]) -> RouteStatus:
    totals = data.get("totals") or {}
    return RouteStatus(
        name=str(data["name"]),
        protocol=str(data["protocol"]),
        listen=str(data["listen"]),
        match=None if data.get("match") is None else str(data["match"]),
        targets=[TargetStatus(str(t["target"]), bool(t["up"]), int(t["active"])) for t in data["targets"]],
        totals=RouteTotals(**totals),
    )


def status_from_json(data: dict[str, Any]) -> Status:
    """Parse a ``/api/status`` document (what ``portway status`` does); raises KeyError/TypeError."""
    return Status(
        process=ProcessStatus(**data["process"]),
        routes=[route_from_json(r) for r in data["routes"]],
        time=float(data.get("time", 0.0)),
        schema=int(data.get("schema", SCHEMA_VERSION)),
    )


def merge_routes(per_worker: Iterable[list[RouteStatus]]) -> list[RouteStatus]:
    """One view of the routes several workers report: targets' active connections summed, a
    target up if any worker sees it up (each worker checks health on its own)."""
    merged: dict[str, RouteStatus] = {}
    targets: dict[str, dict[str, tuple[bool, int]]] = {}
    for routes in per_worker:
        for route in routes:
            merged.setdefault(route.name, route)
            have = targets.setdefault(route.name, {})
            for t in route.targets:
                up, active = have.get(t.target, (False, 0))
                have[t.target] = (up or t.up, active + t.active)
    return [
        replace(r, targets=[TargetStatus(name, up, n) for name, (up, n) in targets[r.name].items()])
        for r in merged.values()
    ]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def format_status(status: Status) -> str:
    """The terminal table of ``portway status``: one line per route, then one per target."""
    p = status.process
    head = f"portway {p.version}  up {p.uptime:.0f}s  workers {p.workers}  config {p.config}"
    if p.last_reload is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.last_reload))
        head += f"  last reload {stamp} {p.last_reload_result}"
    rows = [("ROUTE", "PROTO", "LISTEN", "ACTIVE", "TOTAL", "IN", "OUT", "TARGETS")]
    for r in status.routes:
        t = r.totals
        targets = ", ".join(f"{x.target} {'up' if x.up else 'DOWN'} {x.active}" for x in r.targets) or "-"
        name = r.name + (f" ({r.match})" if r.match else "")
        rows.append(
            (
                name,
                r.protocol,
                r.listen,
                str(t.active),
                str(t.connections),
                _size(t.bytes_client_to_target),
                _size(t.bytes_target_to_client),
                targets,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [head, ""]
    for row in rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + "  " + row[-1])
    return "\n".join(lines)
