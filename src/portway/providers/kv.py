"""Routes from a key-value store (etcd, Redis): a snapshot of keys in, validated routes out.

The layout is one key per route, ``<prefix>routes/<name>``, whose value is that route as YAML
with the same fields as under ``routes:`` in a file. One key per route makes every change to a
route atomic: a writer can never leave half a route behind, and a watcher never sees one.

Everything here is pure (bytes in, decisions out) so the rules are tested without a store; the
providers in ``etcd.py`` and ``redis.py`` only keep a ``{key: value}`` snapshot current and hand
it to `KVRouteTable`. A value is read with the same YAML loader and validated by the same schema
machinery as a file, so an error reads like a file's: which store, which key, which field, why.
A bad key skips only its own route; it is reported once per (key, value), so a store re-read
every few seconds does not repeat the same complaint, but writing a new bad value does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from portway.config.schema import RouteConfig
from portway.config.validate import validate_config
from portway.config.yamlload import Document, load_yaml
from portway.errors import ConfigError
from portway.providers.docker import ProvidedRoutes

__all__ = [
    "BACKOFF_MAX_S",
    "BACKOFF_START_S",
    "MAX_VALUE_BYTES",
    "KVRouteTable",
    "KVRoutes",
    "Outage",
    "route_name_problem",
    "routes_from_kv",
    "routes_prefix",
]

#: A route is a few hundred bytes; a megabyte-sized value is a mistake (or an attack on our memory
#: and YAML parser), reported instead of parsed.
MAX_VALUE_BYTES = 64 * 1024
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0

#: Route names from a store end up in logs, metrics labels and error messages: keep them plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def routes_prefix(prefix: str) -> str:
    """Where the route keys live under `prefix`: ``/portway/`` -> ``/portway/routes/``."""
    return f"{prefix}routes/"


def route_name_problem(name: str) -> str | None:
    """Why `name` cannot name a route, or None when it can."""
    if not name:
        return "the key names no route (nothing after 'routes/')"
    if "/" in name:
        return f"route name {name!r} contains '/'; one key is one route, <prefix>routes/<name>"
    if not _NAME.fullmatch(name):
        return (
            f"route name {name!r} is not usable: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return None


@dataclass(slots=True)
class KVRoutes(ProvidedRoutes):
    """`ProvidedRoutes` plus the (key, value) each problem is about, for reporting once."""

    problem_keys: dict[tuple[str, bytes], str] = field(default_factory=dict)


def routes_from_kv(store: str, prefix: str, items: Mapping[str, bytes]) -> KVRoutes:
    """The routes in `items` (every key and value under `prefix`), in key order.

    `store` names the source in origins and problems (``"etcd"``, ``"redis"``). Keys outside
    ``<prefix>routes/`` are ignored: the prefix may hold other things (a future ``pools/``).
    """
    out = KVRoutes()
    under = routes_prefix(prefix)
    for key in sorted(items):
        if not key.startswith(under):
            continue
        value = items[key]
        where = f"{store} key {key}"
        name = key[len(under) :]
        route, problem = _maybe_route(name, value, where)
        if route is None:
            out.problems.append(problem or f"{where}: skipped")
            out.problem_keys[(key, value)] = out.problems[-1]
            continue
        out.routes[name] = route
        out.origins[name] = where
    return out


def _maybe_route(name: str, value: bytes, where: str) -> tuple[RouteConfig | None, str | None]:
    bad_name = route_name_problem(name)
    if bad_name is not None:
        return None, f"{where}: {bad_name}; skipped"
    if len(value) > MAX_VALUE_BYTES:
        return None, f"{where}: the value is {len(value)} bytes, over {MAX_VALUE_BYTES}; skipped"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"{where}: the value is not UTF-8 text ({exc.reason} at byte {exc.start}); skipped"
    try:
        doc = load_yaml(text, where)
        data = doc.data
        if not isinstance(data, dict):
            raise ConfigError("the value must be a YAML mapping of route fields, e.g. 'port: 2222:22'")
        # Validated as `routes: {name: ...}` of a file, so errors and "did you mean" hints are a file's.
        marks = {("routes", name, *p): m for p, m in doc.marks.items()}
        sub = Document({"routes": {name: data}}, marks, where)
        route = validate_config({"routes": {name: data}}, sub).routes[name]
    except ConfigError as exc:
        return None, f"{where}: {_describe(exc)}; skipped"
    return route, None


def _describe(exc: ConfigError) -> str:
    """``field 'port' at line 2: ...``: the field first, as in "etcd key K: field F: reason"."""
    where = f"field {exc.field!r}" if exc.field is not None else ""
    if exc.line is not None:
        where = f"{where} at line {exc.line}" if where else f"line {exc.line}"
    return f"{where}: {exc.message}" if where else exc.message


class KVRouteTable:
    """The routes of a store as its snapshot changes; decides what to report and when to reload.

    ``update`` returns the problems not reported before for the same (key, value), so a periodic
    re-read stays quiet while a newly written bad value (or a bad value written again after being
    fixed) is reported once.
    """

    def __init__(self, store: str, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.current: KVRoutes = KVRoutes()
        self._items: dict[str, bytes] = {}
        self._reported: set[tuple[str, bytes]] = set()

    @property
    def items(self) -> Mapping[str, bytes]:
        return self._items

    def replace(self, items: Mapping[str, bytes]) -> tuple[bool, list[str]]:
        """Take a whole new snapshot; return (routes changed, problems to report now)."""
        self._items = dict(items)
        return self._rebuild()

    def apply(self, puts: Mapping[str, bytes], deletes: set[str] | frozenset[str]) -> tuple[bool, list[str]]:
        """Apply changed and deleted keys to the snapshot; return as ``replace`` does."""
        for key in deletes:
            self._items.pop(key, None)
        self._items.update(puts)
        return self._rebuild()

    def _rebuild(self) -> tuple[bool, list[str]]:
        provided = routes_from_kv(self.store, self.prefix, self._items)
        fresh = [msg for kv, msg in provided.problem_keys.items() if kv not in self._reported]
        self._reported = set(provided.problem_keys)
        changed = provided.routes != self.current.routes or provided.origins != self.current.origins
        self.current = provided
        return changed, fresh


class Outage:
    """Exponential back-off (0.5 s doubling to 30 s) and "say it once" for an unreachable store.

    Users need to hear that the store went away and that it came back, each once: not a line per
    retry, which at 30 s apart for a day is thousands of identical lines.
    """

    def __init__(self) -> None:
        self.down = False
        self.backoff = BACKOFF_START_S

    def failed(self) -> tuple[bool, float]:
        """Record a failed attempt: (first failure of this outage, seconds to wait before retrying)."""
        first = not self.down
        self.down = True
        wait = self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)
        return first, wait

    def succeeded(self) -> bool:
        """Record a successful read: whether this ends an outage (say so once)."""
        recovered = self.down
        self.down = False
        self.backoff = BACKOFF_START_S
        return recovered
