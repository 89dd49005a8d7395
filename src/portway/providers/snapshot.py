"""Every source's routes read once, for ``portway check --providers``.

``serve`` follows the providers for as long as it runs; ``check`` wants one merged picture with
the source of each route, so it starts the same providers (a Docker event stream, an etcd or
Redis reader), waits for each one's first snapshot for at most `timeout` seconds, merges them
exactly as the control plane does (files first, then Docker, then etcd, then Redis), and stops
them. A provider that has not answered in time is named in ``silent``: the picture is incomplete,
and ``check`` says so rather than printing fewer routes as if that were all.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from portway.config.schema import RouteConfig
from portway.config.sources import Sources
from portway.providers.docker import DockerProvider, docker_url, parse_provider_name
from portway.providers.merge import merge_routes
from portway.providers.stores import StoreProviders

__all__ = ["AllRoutes", "read_every_source"]


@dataclass
class AllRoutes:
    routes: dict[str, RouteConfig] = field(default_factory=dict)
    #: route name -> where it is defined (file and line, container, store key).
    origins: dict[str, str] = field(default_factory=dict)
    #: Clashes between sources (the later definition is skipped, as in serve).
    problems: list[str] = field(default_factory=list)
    #: Providers that gave no snapshot within the timeout.
    silent: list[str] = field(default_factory=list)


def _ignore() -> None:
    """Nothing to re-merge while check waits: it reads each provider's snapshot at the end."""


async def read_every_source(sources: Sources, base: Path, timeout: float) -> AllRoutes:
    docker: list[tuple[str, DockerProvider]] = []
    for written_name, written in sources.config.providers.docker.items():
        name, explicit = parse_provider_name(written_name)
        url = docker_url(written)
        provider = DockerProvider(name, url, explicit_only=explicit, on_change=_ignore)
        provider.start()
        docker.append((f"docker provider {name!r} ({url})", provider))
    stores = StoreProviders(on_change=_ignore)
    stores.sync(sources.config.providers, base)
    waits: dict[str, asyncio.Event] = {label: p.synced for label, p in docker}
    for kind, (_settings, store) in stores.running.items():
        synced = getattr(store, "synced", None)
        if isinstance(synced, asyncio.Event):
            waits[f"{kind} provider"] = synced
    try:
        if waits:
            tasks = [asyncio.ensure_future(e.wait()) for e in waits.values()]
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
        merged = merge_routes(
            [
                (sources.config.routes, sources.origins),
                *((p.current.routes, p.current.origins) for _label, p in docker),
                *stores.sources(),
            ]
        )
    finally:
        await asyncio.gather(*(p.stop() for _label, p in docker), return_exceptions=True)
        await stores.stop()
    return AllRoutes(
        merged.routes,
        merged.origins,
        merged.problems,
        sorted(label for label, event in waits.items() if not event.is_set()),
    )
