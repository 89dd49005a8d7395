"""What a reload must do: the pure diff between the running routes and a new config.

No sockets here. ``plan_reload`` compares routes by name and says which to leave alone, start,
replace and stop, and which old listeners must be released *before* the new ones bind (a route
that keeps its port cannot have two listeners on it at once; we do not use SO_REUSEPORT for this,
because two listeners on one port share incoming connections between old and new settings).
``Server.apply`` carries the plan out.

Rules:

* A route whose settings are equal (field by field, after validation) is unchanged, and so are its
  listener and live connections. Writing ``port: "2222:22"`` as ``port: 2222:22`` or reordering
  keys changes nothing.
* Settings outside ``routes:`` that every route inherits (the global ``acl`` and the
  ``entrypoint``) count as part of each route: changing them replaces every route.
* ``grace_period``, ``providers`` and ``workers`` change no route by themselves.
* The routes of a shared listener (``match:``/``tls:``) are rebuilt together, listener and all,
  when any of them is added, removed or changed (see ``shared_groups_changed``).
* A route whose only changes are to its pool (``host``/``targets``, the target port,
  ``load_balance``, ``healthcheck``) is *retargeted*: its listener and every live connection
  stay, the pool is updated in place (targets that stay keep their health state), and only
  connections to a removed target drain.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from portway.addr import PortSpec
from portway.config.schema import Config, RouteConfig, listeners_overlap, shared_groups

__all__ = ["ReloadPlan", "plan_reload", "shared_groups_changed", "shared_settings_changed"]


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """Route names sorted into what happens to them; every tuple is in name order."""

    unchanged: tuple[str, ...]
    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]
    #: Changed routes whose old listener overlaps a listener of the new config: it must stop
    #: accepting before the new listeners bind, so the port is briefly closed for these only.
    release_first: tuple[str, ...]
    #: Routes whose pool changed and nothing else: updated in place, connections kept.
    retargeted: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.added or self.changed or self.removed or self.retargeted)

    @property
    def to_start(self) -> tuple[str, ...]:
        """Routes that need a new listener: added and changed, in name order."""
        return tuple(sorted((*self.added, *self.changed)))


def shared_settings_changed(old: Config, new: Config) -> bool:
    """Whether a setting every route inherits differs between `old` and `new`."""
    return old.acl != new.acl or old.entrypoint != new.entrypoint


def plan_reload(
    old: Mapping[str, RouteConfig],
    new: Mapping[str, RouteConfig],
    *,
    replace_all: bool = False,
    replace: Collection[str] = (),
) -> ReloadPlan:
    """Compare running routes `old` with the wanted routes `new`.

    With `replace_all` (see ``shared_settings_changed``) every route present in both counts as
    changed; routes in `replace` count as changed too (the routes of a shared listener that
    changes are all rebuilt with it, see `shared_groups_changed`).
    """
    unchanged: list[str] = []
    changed: list[str] = []
    retargeted: list[str] = []
    for name in sorted(old.keys() & new.keys()):
        if name in replace:
            changed.append(name)
        elif old[name] == new[name] and not replace_all:
            unchanged.append(name)
        elif not replace_all and only_pool_changed(old[name], new[name]):
            retargeted.append(name)
        else:
            changed.append(name)
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    starting = [new[name] for name in (*added, *changed)]
    release_first = [
        name for name in changed if any(listeners_overlap(old[name], route) for route in starting)
    ]
    return ReloadPlan(
        tuple(unchanged),
        tuple(added),
        tuple(changed),
        tuple(removed),
        tuple(release_first),
        tuple(retargeted),
    )


def shared_groups_changed(
    old: Mapping[str, RouteConfig], new: Mapping[str, RouteConfig], plan: ReloadPlan
) -> set[str]:
    """The routes of every shared listener that a reload touches: one whose set of routes changes,
    or one of whose routes is added, removed or changed (a pool-only change does not count: the
    listener and the route's stream both stay). The whole group is rebuilt, listener included:
    simpler than patching a live match table, and the port is closed only for as long as any
    changed route's would be. Connections already handed to a route drain as usual."""
    touched = {*plan.added, *plan.changed, *plan.removed}
    old_groups = shared_groups(dict(old))
    new_groups = shared_groups(dict(new))
    out: set[str] = set()
    for key in old_groups.keys() | new_groups.keys():
        before, after = old_groups.get(key, []), new_groups.get(key, [])
        if before != after or touched.intersection(before) or touched.intersection(after):
            out.update(before)
            out.update(after)
    return out


def pool_settings(route: RouteConfig) -> tuple[object, ...]:
    """What a route's pool is made of: equal tuples mean the same pool (health state kept)."""
    return (route.pool(), route.load_balance.mode, route.healthcheck, route.scheme, route.resolve_interval)


def only_pool_changed(old: RouteConfig, new: RouteConfig) -> bool:
    """Whether `old` becomes `new` by changing its pool only (targets, weights, mode, checks)."""
    moved = old.model_copy(
        update={
            "host": new.host,
            "targets": new.targets,
            "port": PortSpec(old.port.listening, new.port.target),
            "load_balance": new.load_balance,
            "healthcheck": new.healthcheck,
        }
    )
    return moved == new
