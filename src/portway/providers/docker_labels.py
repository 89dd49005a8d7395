"""Routes from Docker container labels (GoDoxy-compatible), and where to reach a container.

Both halves are pure: they take what the Docker API returned (a label mapping, an ``inspect``
dict) and return data, so every rule is testable without a daemon. The provider that talks to
Docker feeds them and hands the raw routes to the config schema, which decides what each value
means; this module only decides *which* label sets *which* key of *which* route.

Label grammar (keys are case-sensitive, values are kept exactly as written)::

    proxy.aliases: ssh,sftp            the container's aliases; default: the container name
    proxy.exclude: true                skip the container
    proxy.network: backend             which network's IP to use (see target_for_container)
    proxy.ports: 2222:22,5353:53       shortcut: `port` of alias 1, alias 2, ... by position
    proxy.schemes: tcp,udp             shortcut: `scheme` by position
    proxy.<alias>: |                   a YAML mapping with the whole route
    proxy.<alias>.<field>: value       one field; dots nest: proxy.ssh.acl.default: deny
    proxy.#<n>.<field> / proxy.#<n>    the n-th alias (1-based), e.g. for aliases with dots
    proxy.*.<field> / proxy.*          every alias of the container

Precedence, lowest first; a later layer overrides keys (deep, per nested key) of an earlier one:
``proxy.*`` YAML, ``proxy.*.<field>``, the ``ports``/``schemes`` shortcuts, ``proxy.#n`` YAML,
``proxy.#n.<field>``, ``proxy.<alias>`` YAML, ``proxy.<alias>.<field>``. Two labels of the same
layer that disagree (``acl: x`` beside ``acl.default: y``, or ``#1.port`` beside ``#01.port``) are a
problem; the first in sorted label order is kept.

Nothing here raises on bad labels: a container is one of many, and one typo must not take the
others down, so every mistake becomes a message in ``LabelResult.problems`` that names the
container and the label.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

from portway.config.yamlload import load_yaml
from portway.errors import ConfigError

__all__ = [
    "LabelResult",
    "Skip",
    "Target",
    "routes_from_labels",
    "target_for_container",
]

PREFIX = "proxy."

# Container-wide labels. `proxy.<one of these>` always means the setting, never the whole-route
# YAML of an alias with that name (such an alias is still reachable as `proxy.#n` and its fields
# as `proxy.<name>.<field>`).
_ALIASES = "aliases"
_EXCLUDE = "exclude"
_NETWORK = "network"
_SHORTCUTS = {"ports": "port", "schemes": "scheme"}
_RESERVED = frozenset({_ALIASES, _EXCLUDE, _NETWORK, *_SHORTCUTS})

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class _Layer(IntEnum):
    """Where a label's values rank; higher overrides lower."""

    WILDCARD_YAML = 0
    WILDCARD_FIELDS = 1
    SHORTCUTS = 2
    INDEX_YAML = 3
    INDEX_FIELDS = 4
    NAME_YAML = 5
    NAME_FIELDS = 6


@dataclass(frozen=True, slots=True)
class LabelResult:
    """What a container's labels ask for.

    ``routes`` maps alias to a raw route mapping (strings as written, nested dicts and lists
    from YAML) for the config schema to validate. ``network`` is the ``proxy.network`` label.
    ``excluded`` is true when ``proxy.exclude`` asked to skip the container (or could not be read,
    which we treat the same: routing a container its owner tried to hide is the worse mistake).
    """

    routes: dict[str, dict[str, Any]]
    problems: list[str] = field(default_factory=list)
    network: str | None = None
    excluded: bool = False


def routes_from_labels(container_name: str, labels: Mapping[str, str], *, explicit_only: bool) -> LabelResult:
    """Return the routes `labels` describe for the container named `container_name`.

    With `explicit_only`, a container without ``proxy.aliases`` has no routes (the provider only
    routes containers that opted in); otherwise its single alias is its name. The result does not
    depend on the order of `labels`.
    """
    name = container_name.removeprefix("/")
    report = _Reporter(name)
    ours = {key[len(PREFIX) :]: labels[key] for key in sorted(labels) if key.startswith(PREFIX)}

    if _EXCLUDE in ours:
        excluded = _maybe_parse_bool(ours[_EXCLUDE])
        if excluded is None:
            report(_EXCLUDE, f"must be true or false, not {ours[_EXCLUDE]!r}; skipping the container")
            return LabelResult({}, report.problems, excluded=True)
        if excluded:
            return LabelResult({}, report.problems, excluded=True)

    network: str | None = None
    if _NETWORK in ours:
        network = ours[_NETWORK].strip() or None
        if network is None:
            report(_NETWORK, "is empty; using the default network choice")

    if _ALIASES in ours:
        slots = _alias_slots(ours[_ALIASES], report)
    elif explicit_only:
        return LabelResult({}, report.problems, network=network)
    else:
        slots = [name]

    layers = _Layers(slots)
    for rest, value in ours.items():
        if rest in _SHORTCUTS:
            _apply_shortcut(rest, value, slots, layers, report)
        elif rest not in _RESERVED:
            _apply_label(rest, value, slots, layers, report)

    routes = {alias: layers.route_for(index) for index, alias in enumerate(slots) if alias is not None}
    return LabelResult(routes, report.problems, network=network)


class _Reporter:
    """Collects problems, each naming the container and the label it is about."""

    def __init__(self, container: str) -> None:
        self.container = container
        self.problems: list[str] = []

    def __call__(self, rest: str, message: str) -> None:
        self.problems.append(f"container {self.container!r}: label {PREFIX + rest!r} {message}")


def _maybe_parse_bool(text: str) -> bool | None:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    return None


def _alias_slots(text: str, report: _Reporter) -> list[str | None]:
    """Split ``proxy.aliases``; unusable items keep their position so #n and shortcuts line up."""
    slots: list[str | None] = []
    seen: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            slots.append(None)  # "a,,b" or a trailing comma: a hole, not worth a complaint
        elif item == "*" or item.startswith("#"):
            report(_ALIASES, f"alias {item!r} cannot be used: '*' and '#n' address aliases")
            slots.append(None)
        elif item in seen:
            report(_ALIASES, f"alias {item!r} is listed twice; keeping the first")
            slots.append(None)
        else:
            seen.add(item)
            slots.append(item)
    if not seen:
        report(_ALIASES, "names no alias; the container has no routes")
    return slots


class _Layers:
    """Per-alias trees of values for each layer, merged into one route at the end."""

    def __init__(self, slots: list[str | None]) -> None:
        self.wildcard: dict[_Layer, dict[str, Any]] = {}
        self.per_slot: list[dict[_Layer, dict[str, Any]]] = [{} for _ in slots]

    def tree(self, slot: int | None, layer: _Layer) -> dict[str, Any]:
        layers = self.wildcard if slot is None else self.per_slot[slot]
        return layers.setdefault(layer, {})

    def route_for(self, slot: int) -> dict[str, Any]:
        route: dict[str, Any] = {}
        own = self.per_slot[slot]
        for layer in _Layer:
            tree = self.wildcard.get(layer) or own.get(layer)
            if tree:
                _merge_into(route, tree)
        return route


def _merge_into(base: dict[str, Any], over: Mapping[str, Any]) -> None:
    """Deep-merge `over` into `base`; `over` wins. Copies, because `*` trees are shared."""
    for key, value in over.items():
        current = base.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge_into(current, value)
        else:
            base[key] = copy.deepcopy(value)


def _apply_shortcut(
    rest: str, value: str, slots: list[str | None], layers: _Layers, report: _Reporter
) -> None:
    """Fan ``proxy.ports``/``proxy.schemes`` out by position; an empty item sets nothing."""
    key = _SHORTCUTS[rest]
    items = [part.strip() for part in value.split(",")]
    for index, item in enumerate(items):
        if not item:
            continue
        if index >= len(slots):
            # More values than aliases is almost always a forgotten alias; guessing which one
            # gets what would route traffic somewhere the user did not ask for.
            extra = ", ".join(repr(i) for i in items[len(slots) :] if i)
            report(
                rest, f"has {len(items)} values but the container has {len(slots)} aliases; ignoring {extra}"
            )
            return
        if slots[index] is None:
            report(rest, f"value {item!r} is for alias #{index + 1}, which is not usable; ignoring it")
            continue
        layers.tree(index, _Layer.SHORTCUTS)[key] = item  # trimmed, not interpreted


def _apply_label(rest: str, value: str, slots: list[str | None], layers: _Layers, report: _Reporter) -> None:
    """Route one ``proxy.<target>[.<field>...]`` label into the right alias and layer."""
    located = _maybe_locate(rest, slots, report)
    if located is None:
        return
    slot, tail = located
    by_index = rest.startswith("#")
    if tail is None:
        mapping = _maybe_parse_route_yaml(rest, value, report)
        if mapping is None:
            return
        layer = _Layer.WILDCARD_YAML if slot is None else _Layer.INDEX_YAML if by_index else _Layer.NAME_YAML
        _merge_into(layers.tree(slot, layer), mapping)
        return
    path = tuple(tail.split("."))
    if "" in path:
        report(rest, "has an empty field name (two dots in a row, or a trailing dot)")
        return
    layer = (
        _Layer.WILDCARD_FIELDS if slot is None else _Layer.INDEX_FIELDS if by_index else _Layer.NAME_FIELDS
    )
    _maybe_set_path(layers.tree(slot, layer), path, value, rest, report)


def _maybe_locate(
    rest: str, slots: list[str | None], report: _Reporter
) -> tuple[int | None, str | None] | None:
    """Return (slot, field path) for a label, or None if it addresses no usable alias.

    The slot is None for ``*`` (every alias); the path is None for a whole-route YAML label.

    Aliases may contain dots (GoDoxy users write FQDNs), so a label is matched against the
    longest alias it starts with: with aliases ``a`` and ``a.b``, ``proxy.a.b.port`` is ``a.b``'s
    ``port``. ``proxy.#n`` always works for those who prefer not to rely on that.
    """
    if rest == "*" or rest.startswith("*."):
        return None, _tail_after(rest, "*")
    if rest.startswith("#"):
        number = rest[1:].partition(".")[0]
        index = int(number) - 1 if number.isdigit() else -1
        if not 0 <= index < len(slots):
            report(rest, f"refers to alias #{number}, but the container has {len(slots)} aliases")
            return None
        if slots[index] is None:
            report(rest, f"refers to alias #{number}, which is empty or not usable")
            return None
        return index, _tail_after(rest, "#" + number)
    best: int | None = None
    for index, alias in enumerate(slots):
        if alias is not None and (rest == alias or rest.startswith(alias + ".")):
            current = slots[best] if best is not None else None
            if current is None or len(alias) > len(current):
                best = index
    if best is None:
        known = ", ".join(repr(a) for a in slots if a is not None) or "none"
        target = rest.partition(".")[0]
        report(rest, f"is for {target!r}, which is not an alias of the container (aliases: {known})")
        return None
    alias = slots[best]
    assert alias is not None
    return best, _tail_after(rest, alias)


def _tail_after(rest: str, target: str) -> str | None:
    """What follows ``<target>.`` in `rest`, or None when `rest` is just the target."""
    return None if rest == target else rest[len(target) + 1 :]


def _maybe_parse_route_yaml(rest: str, value: str, report: _Reporter) -> dict[str, Any] | None:
    try:
        data = load_yaml(value, f"{PREFIX}{rest}").data
    except ConfigError as exc:
        where = f" (line {exc.line}, column {exc.column})" if exc.line is not None else ""
        report(rest, f"is not valid YAML{where}: {exc.message}")
        return None
    if data is None:
        return {}  # `proxy.app: ""` declares the route and leaves every field to other labels
    if not isinstance(data, dict):
        report(rest, f"must be a YAML mapping of route fields, not a {type(data).__name__}")
        return None
    return data


def _maybe_set_path(
    tree: dict[str, Any], path: tuple[str, ...], value: str, rest: str, report: _Reporter
) -> None:
    """Set `value` at `path`, unless an earlier label of the same layer already claimed it."""
    *parents, leaf = path
    node = tree
    for depth, key in enumerate(parents):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            claimed = ".".join(parents[: depth + 1])
            report(rest, f"conflicts with another label that sets {claimed!r} to a value; ignoring it")
            return
        node = child
    if leaf in node:
        what = "a mapping" if isinstance(node[leaf], dict) else repr(node[leaf])
        report(rest, f"conflicts with another label that already set this field to {what}; ignoring it")
        return
    node[leaf] = value


# --------------------------------------------------------------------------------------------
# Where to reach a container


@dataclass(frozen=True, slots=True)
class Target:
    """An address the proxy can connect to; `via` says how it was found, for logs."""

    host: str
    port: int
    via: Literal["published", "network", "host-network"]


@dataclass(frozen=True, slots=True)
class Skip:
    """The container cannot be reached; `reason` names it and says why, for the log."""

    reason: str


_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def target_for_container(
    attrs: Mapping[str, Any],
    target_port: int,
    proto: Literal["tcp", "udp"],
    *,
    network: str | None,
    host_address: str,
) -> Target | Skip:
    """Return where to reach `target_port`/`proto` of the container described by `attrs`.

    `attrs` is what ``docker inspect`` returns. In order of preference:

    * host networking: the container's ports are the host's, so `host_address` and `target_port`;
    * a published port: the host side of the binding, because it works whether or not the proxy
      shares a network with the container; a wildcard HostIp means `host_address` (127.0.0.1
      for a local daemon, the daemon's address for a remote one);
    * the container's IP on `network` (the ``proxy.network`` label), or on the first network in
      name order that gives it an address, with `target_port` itself.

    Anything else (``none`` networking, another container's namespace, a stopped container, no
    address at all) is a `Skip`, never an exception: one bad container must not stop the others.
    """
    name = str(attrs.get("Name") or attrs.get("Id", "")[:12] or "?").removeprefix("/")
    state = attrs.get("State") or {}
    if isinstance(state, Mapping) and state.get("Running") is False:
        return Skip(f"container {name!r} is not running")

    mode = str((attrs.get("HostConfig") or {}).get("NetworkMode") or "")
    if mode == "host":
        return Target(host_address, target_port, "host-network")
    if mode == "none":
        return Skip(f"container {name!r} has no network (network mode 'none')")
    if mode.startswith("container:"):
        other = mode.removeprefix("container:")
        return Skip(f"container {name!r} uses the network of container {other!r}; route to that one")

    settings = attrs.get("NetworkSettings") or {}
    published = _maybe_published(settings.get("Ports") or {}, target_port, proto, host_address)
    if published is not None:
        return published

    networks: Mapping[str, Any] = settings.get("Networks") or {}
    if network is not None:
        if network not in networks:
            known = ", ".join(sorted(networks)) or "none"
            return Skip(f"container {name!r} is not on network {network!r} (it is on: {known})")
        address = _maybe_address(networks[network])
        if address is None:
            return Skip(f"container {name!r} has no IP address on network {network!r}")
        return Target(address, target_port, "network")
    for net_name in sorted(networks):
        address = _maybe_address(networks[net_name])
        if address is not None:
            return Target(address, target_port, "network")
    return Skip(
        f"container {name!r} does not publish {target_port}/{proto} and has no IP address on any network"
    )


def _maybe_published(
    ports: Mapping[str, Any], target_port: int, proto: str, host_address: str
) -> Target | None:
    """The first usable host binding of `target_port`/`proto`, IPv4 bindings first."""
    bindings = ports.get(f"{target_port}/{proto}") or []
    usable: list[tuple[int, str, int]] = []
    for binding in bindings:
        host_ip = str(binding.get("HostIp") or "")
        port_text = str(binding.get("HostPort") or "")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            continue
        host = host_address if host_ip in _WILDCARD_HOSTS else host_ip
        # Docker lists 0.0.0.0 and :: bindings of one port; prefer the IPv4 one so the choice
        # does not depend on the daemon's order and matches the usual 127.0.0.1 host_address.
        family_rank = 1 if ":" in host_ip else 0
        usable.append((family_rank, host, int(port_text)))
    if not usable:
        return None
    _, host, port = min(usable, key=lambda u: u[0])
    return Target(host, port, "published")


def _maybe_address(endpoint: Any) -> str | None:
    """The endpoint's IPv4 address, else its global IPv6 one; None if it has neither."""
    if not isinstance(endpoint, Mapping):
        return None
    for key in ("IPAddress", "GlobalIPv6Address"):
        text = str(endpoint.get(key) or "")
        try:
            ipaddress.ip_address(text)
        except ValueError:
            continue
        return text
    return None
