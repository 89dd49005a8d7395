"""The key-value store providers a config asks for (``providers.etcd``, ``providers.redis``), kept in step.

The serve loop holds one `StoreProviders` and calls ``sync`` after every config (re)load: a
provider whose settings are unchanged keeps running (and its routes), a changed one is replaced,
a removed one stopped. Files named in the settings (password_file, ca, cert, key) are relative to
the main config file, like ``providers.include``.

Priority in the merge: files, then Docker providers, then etcd, then Redis (``sources()`` order).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from portway.config.schema import EtcdConfig, ProvidersConfig, RedisConfig, RouteConfig
from portway.providers.etcd import EtcdProvider
from portway.providers.kv import KVRoutes, KVRouteTable
from portway.providers.redis import RedisProvider

__all__ = ["StoreProvider", "StoreProviders"]

log = logging.getLogger("portway")


class StoreProvider(Protocol):
    name: str
    table: KVRouteTable

    @property
    def current(self) -> KVRoutes: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...


class StoreProviders:
    """At most one etcd and one Redis provider, following the config."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.running: dict[str, tuple[EtcdConfig | RedisConfig, StoreProvider]] = {}

    def sources(self) -> list[tuple[Mapping[str, RouteConfig], Mapping[str, str]]]:
        """(routes, origins) of each store, in merge priority order."""
        out: list[tuple[Mapping[str, RouteConfig], Mapping[str, str]]] = []
        for kind in ("etcd", "redis"):
            if kind in self.running:
                current = self.running[kind][1].current
                out.append((current.routes, current.origins))
        return out

    def sync(self, config: ProvidersConfig, base: Path) -> None:
        """Start, replace or stop providers so they match `config`."""
        wanted: dict[str, EtcdConfig | RedisConfig] = {}
        if config.etcd is not None:
            wanted["etcd"] = config.etcd
        if config.redis is not None:
            wanted["redis"] = config.redis
        replaced: dict[str, KVRoutes] = {}
        for kind in list(self.running):
            if self.running[kind][0] != wanted.get(kind):
                _, provider = self.running.pop(kind)
                replaced[kind] = provider.current
                asyncio.get_running_loop().create_task(provider.stop())
                self.on_change()  # a removed store's routes leave with it
        for kind, settings in wanted.items():
            if kind in self.running:
                continue
            provider = self._make(settings, base)
            if kind in replaced:
                # New settings for the same store (another endpoint, a new password): its routes keep
                # serving until the new connection reads them, as during an outage, instead of
                # vanishing for a moment and draining every connection.
                provider.table.current = replaced[kind]
            self.running[kind] = (settings, provider)
            provider.start()
            log.info(f"{kind} provider started", extra={"provider": kind})

    def _make(self, settings: EtcdConfig | RedisConfig, base: Path) -> StoreProvider:
        def path(written: str | None) -> Path | None:
            return None if written is None else base / written

        if isinstance(settings, EtcdConfig):
            return EtcdProvider(
                settings.endpoints,
                prefix=settings.prefix,
                on_change=self.on_change,
                username=settings.username,
                password_file=path(settings.password_file),
                ca=path(settings.ca),
                cert=path(settings.cert),
                key=path(settings.key),
            )
        return RedisProvider(
            settings.url,
            prefix=settings.prefix,
            on_change=self.on_change,
            password_file=path(settings.password_file),
            poll_interval=settings.poll_interval,
        )

    async def stop(self) -> None:
        running, self.running = self.running, {}
        await asyncio.gather(*(p.stop() for _, p in running.values()), return_exceptions=True)
