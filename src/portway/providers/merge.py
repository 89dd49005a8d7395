"""Putting routes from several sources together: the files first, then each Docker provider.

A name or a listening port claimed twice is never resolved silently in favour of the newcomer: the
source that had it first (files before providers, providers in config order) keeps it, and the
problem names both sources so the user can find the duplicate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from portway.config.schema import RouteConfig, listen_key, listeners_overlap, share_listener
from portway.matching import check_routes

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
            clash = next(
                (
                    o
                    for o, r in out.routes.items()
                    if listeners_overlap(r, route) and not share_listener(r, route)
                ),
                None,
            )
            proto, host, port = listen_key(route)
            why = _cannot_share(
                name, route, {o: r for o, r in out.routes.items() if share_listener(r, route)}
            )
            if clash is None and why is not None:
                out.problems.append(
                    f"route {name!r} ({origin}) cannot share {host} port {port}/{proto}: {why}; skipped"
                )
                continue
            if clash is not None:
                out.problems.append(
                    f"route {name!r} ({origin}) listens on {host} port {port}/{proto} like route {clash!r} "
                    f"({out.origins[clash]}); skipped"
                )
                continue
            out.routes[name] = route
            out.origins[name] = origin
    return out


def _cannot_share(name: str, route: RouteConfig, group: dict[str, RouteConfig]) -> str | None:
    """Why `route` cannot join the routes already on its shared listener (a conflicting match, or
    different listener-level settings), or None."""
    if not group:
        return None
    members = {**group, name: route}
    problems = check_routes(
        {n: r.match.to_match() if r.match is not None else None for n, r in members.items()}
    )
    if problems:
        return problems[0].message
    first, other = next(iter(group.items()))
    for setting in ("peek_timeout", "proxy_protocol"):
        if getattr(route, setting) != getattr(other, setting):
            return f"its {setting} differs from route {first!r}'s"
    return None
