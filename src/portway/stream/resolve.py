"""Resolving a route's target: once at start, then on a timer or after a failed dial.

Never per connection: a DNS lookup per dial would cost more than the rest of the connection
setup, and a slow resolver would stall every new client.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from portway.addr import format_hostport, ip_family
from portway.errors import ResolveError

log = logging.getLogger("portway.resolve")

SockAddr = tuple[int, tuple[str, int]]  # (family, (ip, port))

#: A failed dial asks for a fresh lookup at most this often, so a dead target with a working
#: name cannot turn every client into a DNS query.
_MIN_RERESOLVE_INTERVAL = 1.0


class TargetResolver:
    """The current addresses of a target, kept fresh in the background."""

    def __init__(
        self, host: str, port: int, *, family: int, kind: int, interval: float, route: str = ""
    ) -> None:
        self.host = host or "localhost"
        self.port = port
        self.family = family
        self.kind = kind
        self.interval = interval
        self.route = route
        self.addresses: list[SockAddr] = []
        self._task: asyncio.Task[None] | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._last_lookup = float("-inf")
        self._literal = ip_family(self.host) is not None

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)

    async def start(self) -> None:
        """Resolve now (raising ResolveError naming the route) and keep resolving on the timer."""
        self.addresses = await self._lookup()
        if not self._literal and self.interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def prefer(self, addr: SockAddr) -> None:
        """Move an address that just worked to the front, so dual-stack names dial fast next time.

        Builds a new list: dials in flight hold the old one as their snapshot."""
        current = self.addresses
        if current and current[0] != addr and addr in current:
            self.addresses = [addr, *(a for a in current if a != addr)]

    def dial_failed(self) -> None:
        """Ask for a fresh lookup soon (rate-limited), in case the target moved."""
        if self._literal:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_lookup < _MIN_RERESOLVE_INTERVAL:
            return
        self._last_lookup = loop.time()
        self._refresh = loop.create_task(self._refresh_once())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._refresh_once()

    async def _refresh_once(self) -> None:
        try:
            fresh = await self._lookup()
        except ResolveError as exc:
            # Keep the last known addresses: a resolver hiccup must not take a working route down.
            log.warning("re-resolve failed", extra={"route": self.route, "dst": str(self), "error": str(exc)})
            return
        if fresh != self.addresses:
            old = {a for _, (a, _p) in self.addresses}
            log.info(
                "target re-resolved",
                extra={
                    "route": self.route,
                    "dst": str(self),
                    "addresses": [a for _, (a, _p) in fresh],
                    "previous": sorted(old),
                },
            )
            self.addresses = fresh

    async def _lookup(self) -> list[SockAddr]:
        loop = asyncio.get_running_loop()
        self._last_lookup = loop.time()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, family=self.family, type=self.kind)
        except (socket.gaierror, UnicodeError) as exc:
            where = f"route {self.route!r}: " if self.route else ""
            reason = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
            raise ResolveError(f"{where}target host {self.host!r} does not resolve: {reason}") from None
        out: list[SockAddr] = []
        for fam, _type, _proto, _canon, sockaddr in infos:
            entry = (int(fam), (str(sockaddr[0]), int(sockaddr[1])))
            if entry not in out:
                out.append(entry)
        if not out:
            raise ResolveError(f"route {self.route!r}: target host {self.host!r} has no usable address")
        # IPv4 first for unpinned names: "localhost" targets are far more often bound to 127.0.0.1.
        out.sort(key=lambda e: e[0] != socket.AF_INET)
        return out
