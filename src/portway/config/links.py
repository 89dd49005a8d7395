"""GoDoxy's ``load_balance.link``: routes that name the same link become one pool.

Every route with ``load_balance: {link: app}`` serves the same listener and contributes its
target(s) with its ``load_balance.weight``. With Docker labels this is how
``docker compose up --scale app=3`` becomes one pool of three containers that grows and shrinks
with them: each container brings a route, and folding runs after every source is merged.

Pure: routes in, routes and problems out. The folded route is named after the link; its
settings (timeouts, ACL, limits, health check) are those of the first member by name, so the
result does not depend on the order sources were read in. Members that disagree on what a
listener is (scheme, bind, listening port) or on the balancing mode are a problem naming both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from portway.config.pools import LoadBalanceConfig, TargetConfig
from portway.config.schema import RouteConfig

__all__ = ["Folded", "LinkProblem", "fold_links"]


@dataclass(frozen=True, slots=True)
class LinkProblem:
    """Why a member could not join its link: names both routes and the field they disagree on."""

    route: str
    other: str
    field: str
    message: str


@dataclass(slots=True)
class Folded:
    routes: dict[str, RouteConfig] = field(default_factory=dict)
    #: link name -> the member routes it was made of, in name order
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)
    problems: list[LinkProblem] = field(default_factory=list)


def _disagreement(a: RouteConfig, b: RouteConfig) -> str | None:
    if a.scheme != b.scheme:
        return "scheme"
    if a.listen_host() != b.listen_host():
        return "bind"
    if a.port.listening != b.port.listening:
        return "port"
    if a.load_balance.mode != b.load_balance.mode:
        return "load_balance.mode"
    return None


def fold_links(routes: Mapping[str, RouteConfig]) -> Folded:
    """Replace every group of linked routes by one pool route named after the link."""
    out = Folded()
    groups: dict[str, list[str]] = {}
    for name, route in routes.items():  # unlinked routes keep the order they were written in
        link = route.load_balance.link
        if link is None:
            out.routes[name] = route
        else:
            groups.setdefault(link, []).append(name)
    for names in groups.values():
        names.sort()
    for link, names in groups.items():
        if link in out.routes:
            out.problems.append(
                LinkProblem(
                    names[0],
                    link,
                    "load_balance.link",
                    f"links to {link!r}, which is also the name of a route that is not part of the link",
                )
            )
            continue
        first = routes[names[0]]
        joined: list[str] = []
        targets: list[TargetConfig] = []
        seen: set[tuple[str, int | None]] = set()
        for name in names:
            route = routes[name]
            where = _disagreement(first, route)
            if where is not None:
                out.problems.append(
                    LinkProblem(
                        name,
                        names[0],
                        where,
                        f"is linked to {link!r} with route {names[0]!r} but differs in {where}; skipped",
                    )
                )
                continue
            weight = route.load_balance.weight
            for target in route.pool():
                key = (target.host.lower(), target.port)
                if key in seen:
                    continue  # two members naming one target: one pool member
                seen.add(key)
                targets.append(target if weight is None else target.model_copy(update={"weight": weight}))
            joined.append(name)
        if not any(t.weight > 0 for t in targets):
            targets = [t.model_copy(update={"weight": 1}) for t in targets]
        out.routes[link] = first.model_copy(
            update={
                "targets": targets,
                "load_balance": LoadBalanceConfig(mode=first.load_balance.mode),
            }
        )
        out.members[link] = tuple(joined)
    return out
