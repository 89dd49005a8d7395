"""Creating listening sockets with errors that name the route, the address and the reason.

We create sockets ourselves rather than letting the event loop do it, to control dual-stack
(IPV6_V6ONLY), SO_REUSEPORT for worker processes, and to turn bind failures into one clear line.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from portway.addr import Network, family_of, format_hostport
from portway.errors import BindError
from portway.logs import BurstLog

if TYPE_CHECKING:
    from portway.events import Observer
    from portway.matching import MatchTable
    from portway.stream.base import Address

_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "address not available on this host",
    errno.EAFNOSUPPORT: "address family not supported on this host",
}


def bind_socket(
    host: str,
    port: int,
    *,
    family: int,
    kind: int,
    v6only: bool,
    reuse_port: bool = False,
    backlog: int = 4096,
    name: str = "",
) -> socket.socket:
    """Create, bind and (for TCP) listen; raises BindError naming `name` and the address."""
    where = f"route {name!r}: " if name else ""
    try:
        sock = socket.socket(family, kind)
    except OSError as exc:
        raise BindError(f"{where}cannot listen on {format_hostport(host, port)}: {_reason(exc)}") from None
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
        raise BindError(
            f"{where}cannot listen on {format_hostport(host, port)}/{proto}: {_reason(exc)}"
        ) from None
    return sock


def _reason(exc: OSError) -> str:
    return _REASONS.get(exc.errno or 0, exc.strerror or str(exc))


def listen_family(host: str, pinned: int) -> tuple[int, bool]:
    """The socket family for a bind address, and whether an IPv6 socket must be IPv6-only."""
    if ":" in host:
        return socket.AF_INET6, pinned == socket.AF_INET6
    return socket.AF_INET, False


def bind_listener(
    network: Network, host: str, port: int, kind: int, *, reuse_port: bool = False, name: str = ""
) -> socket.socket:
    """A listener on `host:port` for a route's `network` (``::`` is dual-stack unless the
    network pins IPv6); raises BindError naming `name` and the address."""
    family, v6only = listen_family(host, family_of(network))
    return bind_socket(host, port, family=family, kind=kind, v6only=v6only, reuse_port=reuse_port, name=name)


S = TypeVar("S")


class PortGroup(Generic[S]):
    """What the shared TCP and UDP listeners have in common: the routes (streams of type `S`)
    that share one address, their match table, the one bound socket, and the names that logs
    and bind errors use."""

    #: socket.SOCK_STREAM or socket.SOCK_DGRAM.
    KIND: ClassVar[int]

    def __init__(
        self,
        network: Network,
        host: str,
        port: int,
        routes: Mapping[str, S],
        table: MatchTable,
        *,
        peek_timeout: float,
        reuse_port: bool,
        observer: Observer | None,
    ) -> None:
        self.network = network
        self.host = host
        self.port = port
        self.routes = dict(routes)
        self.table = table
        self.peek_timeout = peek_timeout
        self.reuse_port = reuse_port
        self.observer = observer
        self.name = format_hostport(host, port)
        self.fields = {"listen": self.name, "routes": ",".join(self.routes)}
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by _bind()
        self._sock: socket.socket | None = None
        self._failures = BurstLog(5.0)

    @property
    def local_addr(self) -> Address | None:
        if self._sock is None:
            return None
        host, port = self._sock.getsockname()[:2]
        return (host, port)

    def _bind(self) -> socket.socket | None:
        """Bind the group's socket on the running loop, once: None if it is bound already.
        Raises BindError naming the routes and the address."""
        if self._sock is not None:
            return None
        self.loop = asyncio.get_running_loop()
        self._sock = bind_listener(
            self.network,
            self.host,
            self.port,
            self.KIND,
            reuse_port=self.reuse_port,
            name="+".join(self.routes),
        )
        return self._sock
