"""Routes from the labels of running Docker containers, kept current by Docker's event stream.

Why the docker SDK in a thread rather than aiodocker: the SDK is Docker's own, well kept client
(already a dependency, also used by the tests), it negotiates the API version, and it understands
every ``DOCKER_HOST`` form (``unix://``, ``tcp://``, ``ssh://``) the same way the ``docker`` CLI
does. It blocks, so each provider owns one thread that subscribes to container events, lists the running
containers once per connection, and after each event inspects just that container (inspect is
the daemon's authoritative view; the list can lag a dying container by a moment). Each time it
hands the whole set of running containers to the event loop with ``call_soon_threadsafe``, so the
routes are always a function of "what runs now", never a log of deltas that could drift.

The conversion from a snapshot to routes is pure (``routes_from_containers``) so its rules are
tested without a daemon. A problem with one container (a bad label, no usable address) is
reported and that route skipped; it never takes the other containers or the proxy down.

If the daemon goes away, the last known routes keep serving; the thread reconnects with
exponential backoff (0.5 s doubling to 30 s) and the first successful snapshot replaces them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import ValidationError

from portway.addr import PortSpec, is_udp
from portway.config.schema import RouteConfig
from portway.providers.docker_labels import Skip, routes_from_labels, target_for_container
from portway.providers.notify import SnapshotNotifier

__all__ = [
    "ContainerInfo",
    "DockerProvider",
    "ProvidedRoutes",
    "docker_url",
    "host_address_for",
    "parse_provider_name",
    "routes_from_containers",
]

log = logging.getLogger("portway.docker")

DEFAULT_URL = "unix:///var/run/docker.sock"
#: Container events after which the set of running containers (or their labels) may differ.
WATCHED_ACTIONS = frozenset(
    {"start", "die", "stop", "kill", "destroy", "rename", "pause", "unpause", "update"}
)
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """What the provider needs of one running container: ``docker inspect`` output."""

    name: str
    labels: Mapping[str, str]
    attrs: Mapping[str, Any]


@dataclass(slots=True)
class ProvidedRoutes:
    """Validated routes from one snapshot, where each came from, and what was skipped and why."""

    routes: dict[str, RouteConfig] = field(default_factory=dict)
    #: alias -> "docker 'local' container 'web'"
    origins: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def parse_provider_name(key: str) -> tuple[str, bool]:
    """``"remote-1!"`` -> ("remote-1", True): a trailing ``!`` means explicit-only."""
    return (key[:-1], True) if key.endswith("!") else (key, False)


def docker_url(written: str, environ: Mapping[str, str] = os.environ) -> str:
    """Expand ``$VAR``/``${VAR}`` in `written`; empty (e.g. an unset ``$DOCKER_HOST``) is the local socket."""
    expanded = _expand(written.strip(), environ)
    return expanded or DEFAULT_URL


def _expand(text: str, environ: Mapping[str, str]) -> str:
    # os.path.expandvars leaves unset variables as written; an unset $DOCKER_HOST must mean "default".
    return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: environ.get(m.group(1) or m.group(2), ""), text)


def host_address_for(url: str) -> str:
    """Where a container's published ports are reached: loopback for a local daemon, else its host."""
    parts = urlsplit(url)
    if parts.scheme in ("tcp", "http", "https", "ssh") and parts.hostname:
        return parts.hostname
    return "127.0.0.1"


def routes_from_containers(
    provider: str, containers: Iterable[ContainerInfo], *, explicit_only: bool, host_address: str
) -> ProvidedRoutes:
    """The routes the running `containers` ask for (pure: ``docker inspect`` data in, routes out).

    A route whose ``host`` label is set goes where it says; otherwise its target is found with
    ``target_for_container`` (host network, published port, or the container's address).
    Containers are visited in name order, so when two claim one alias the first name keeps it.
    """
    out = ProvidedRoutes()
    for info in sorted(containers, key=lambda c: c.name):
        name = info.name.removeprefix("/")
        where = f"docker {provider!r} container {name!r}"
        result = routes_from_labels(name, info.labels, explicit_only=explicit_only)
        out.problems.extend(f"docker {provider!r}: {p}" for p in result.problems)
        for alias, raw in result.routes.items():
            route = _maybe_route(alias, raw, where, out.problems)
            if route is None:
                continue
            if "host" not in raw:
                proto: Literal["tcp", "udp"] = "udp" if is_udp(route.scheme) else "tcp"
                target = target_for_container(
                    info.attrs, route.port.target, proto, network=result.network, host_address=host_address
                )
                if isinstance(target, Skip):
                    out.problems.append(f"{where}, route {alias!r}: {target.reason}; skipped")
                    continue
                route = route.model_copy(
                    update={"host": target.host, "port": PortSpec(route.port.listening, target.port)}
                )
            if alias in out.routes:
                out.problems.append(
                    f"route {alias!r} is defined by {out.origins[alias]} and {where}; kept the first"
                )
                continue
            out.routes[alias] = route
            out.origins[alias] = where
    return out


def _maybe_route(alias: str, raw: Mapping[str, Any], where: str, problems: list[str]) -> RouteConfig | None:
    try:
        return RouteConfig.model_validate(dict(raw))
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field_name = ".".join(str(p) for p in err["loc"]) or "route"
        message = "is required" if err["type"] == "missing" else str(err["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}, route {alias!r}, field {field_name!r}: {message}; skipped")
        return None


class DockerProvider(SnapshotNotifier):
    """One Docker daemon's containers as routes; ``routes`` is always the last good snapshot.

    ``start()`` launches the watcher thread; `on_change` runs on the event loop whenever the
    routes differ from the previous snapshot's. ``stop()`` ends the thread.
    """

    def __init__(self, name: str, url: str, *, explicit_only: bool, on_change: Callable[[], None]) -> None:
        self.name = name
        self.url = url
        self.explicit_only = explicit_only
        self.host_address = host_address_for(url)
        super().__init__(on_change)
        self.current = ProvidedRoutes()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._client: Any = None
        self._events: Any = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._watch, name=f"docker-{self.name}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            events, client = self._events, self._client
        # Closing the response unblocks the thread's read of the event stream.
        for closable in (events, client):
            if closable is not None:
                with contextlib.suppress(Exception):  # best effort: the thread checks _stopping too
                    closable.close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    # -- event loop side

    def _deliver(self, containers: list[ContainerInfo]) -> None:
        provided = routes_from_containers(
            self.name, containers, explicit_only=self.explicit_only, host_address=self.host_address
        )
        changed = provided.routes != self.current.routes or provided.origins != self.current.origins
        self.current = provided
        self.published(changed, provided.problems, provider=self.name, logger=log)

    # -- the watcher thread

    def _watch(self) -> None:
        import docker
        import docker.errors
        import requests

        backoff = BACKOFF_START_S
        reported = False
        while not self._stopping.is_set():
            try:
                client = docker.DockerClient(base_url=self.url, version="auto", timeout=30)
                with self._lock:
                    self._client = client
                # Subscribe before listing so nothing that happens in between is missed.
                events = client.events(decode=True, filters={"type": "container"})
                with self._lock:
                    self._events = events
                running = self._snapshot(client)
                if reported:
                    log.warning("docker daemon reachable again", extra={"provider": self.name})
                reported = False
                backoff = BACKOFF_START_S
                for event in events:
                    if self._stopping.is_set():
                        return
                    container_id = event.get("id") or event.get("Actor", {}).get("ID")
                    if container_id and event.get("Action", "").split(":")[0] in WATCHED_ACTIONS:
                        self._refresh(client, running, container_id)
                        self._send(running)
                if not self._stopping.is_set():
                    raise ConnectionError("the event stream ended")
            except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
                if self._stopping.is_set():
                    return
                if not reported:
                    log.error(
                        "docker daemon unreachable; keeping the last known routes",
                        extra={"provider": self.name, "url": self.url, "error": str(exc), "retry_s": backoff},
                    )
                reported = True
            finally:
                with self._lock:
                    client, self._client, self._events = self._client, None, None
                if client is not None:
                    client.close()
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _snapshot(self, client: Any) -> dict[str, ContainerInfo]:
        """Every running container, by id, as ``inspect`` describes it; delivered to the loop."""
        running: dict[str, ContainerInfo] = {}
        for summary in client.api.containers(filters={"status": "running"}):
            self._refresh(client, running, summary["Id"])
        self._send(running)
        return running

    def _refresh(self, client: Any, running: dict[str, ContainerInfo], container_id: str) -> None:
        """Update `running` for one container from ``inspect``, the daemon's authoritative view.

        The container list is served from a view that can lag the container's real state by a
        moment (a container that just died may still be listed as running), so after an event we
        ask about that container itself rather than listing again.
        """
        import docker.errors

        try:
            attrs = client.api.inspect_container(container_id)
        except docker.errors.NotFound:
            running.pop(container_id, None)
            return
        if not (attrs.get("State") or {}).get("Running"):
            running.pop(container_id, None)
            return
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        running[container_id] = ContainerInfo(str(attrs.get("Name", "")), labels, attrs)

    def _send(self, running: dict[str, ContainerInfo]) -> None:
        if self._loop is not None and not self._stopping.is_set():
            self._loop.call_soon_threadsafe(self._deliver, list(running.values()))
