"""Putting routes from several sources together: the files first, then each Docker provider.

A name or a listening port claimed twice is never resolved silently in favour of the newcomer: the
source that had it first (files before providers, providers in config order) keeps it, and the
problem names both sources so the user can find the duplicate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from portway.config.schema import RouteConfig, listen_key, listeners_overlap

__all__ = ["Merged", "merge_routes"]


@dataclass(slots=True)
class Merged:
    routes: dict[str, RouteConfig] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def merge_routes(sources: Sequence[tuple[Mapping[str, RouteConfig], Mapping[str, str]]]) -> Merged:
    """Merge (routes, origins) pairs in priority order; later clashes are dropped and reported."""
    out = Merged()
    for routes, origins in sources:
        for name, route in routes.items():
            origin = origins.get(name, "?")
            if name in out.routes:
                out.problems.append(
                    f"route {name!r} is defined in {out.origins[name]} and {origin}; kept the first"
                )
                continue
            clash = next((other for other, r in out.routes.items() if listeners_overlap(r, route)), None)
            if clash is not None:
                proto, host, port = listen_key(route)
                out.problems.append(
                    f"route {name!r} ({origin}) listens on {host} port {port}/{proto} like route {clash!r} "
                    f"({out.origins[clash]}); skipped"
                )
                continue
            out.routes[name] = route
            out.origins[name] = origin
    return out
