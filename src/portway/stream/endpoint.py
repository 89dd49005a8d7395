"""What TCP and UDP streams share: addresses, target resolution, binding, and log fields.

Kept apart from the data paths so that `TCPStream` and `UDPStream` differ only in how they move
bytes, and a change to binding or logging cannot drift between the two.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, ClassVar

from portway.addr import Network, family_of, format_hostport, parse_hostport
from portway.logs import ConnectionLog, connection_log
from portway.stream.base import Address, Direction, HookContext, StreamDescription
from portway.stream.listen import bind_socket, listen_family
from portway.stream.resolve import TargetResolver


class Endpoint:
    """A listener on one address that forwards to one (resolved) target."""

    #: Set by subclasses: the socket type, and the INFO line logged per connection or session.
    KIND: ClassVar[int]
    ACCEPT_MESSAGE: ClassVar[str]
    LOG: ClassVar[logging.Logger]

    def __init__(
        self,
        network: Network,
        listen: str,
        target: str,
        *,
        name: str,
        resolve_interval: float,
        reuse_port: bool,
    ) -> None:
        self.network = network
        self.name = name
        listen_hp = parse_hostport(listen)
        target_hp = parse_hostport(target, allow_zero_port=False)
        self.listen_host = listen_hp.host or ("0.0.0.0" if family_of(network) == socket.AF_INET else "::")
        self.listen_port = listen_hp.port
        self.reuse_port = reuse_port
        self.resolver = TargetResolver(
            target_hp.host,
            target_hp.port,
            family=family_of(network),
            kind=self.KIND,
            interval=resolve_interval,
            route=name,
        )
        self._sock: socket.socket | None = None
        self._local: Address | None = None
        self.fields: dict[str, str] = {}
        self._conn_log: ConnectionLog | None = None
        self._refresh_fields()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in prepare()

    @property
    def local_addr(self) -> Address | None:
        return self._local

    def describe(self) -> StreamDescription:
        listen = format_hostport(*(self._local or (self.listen_host, self.listen_port)))
        return StreamDescription(f"{self.network}->{self.network}", listen, str(self.resolver))

    async def prepare(self) -> None:
        """Resolve the target and bind the listener without serving yet (all-or-nothing starts)."""
        if self._sock is not None:
            return
        self.loop = asyncio.get_running_loop()
        await self.resolver.start()
        family, v6only = listen_family(self.listen_host, family_of(self.network))
        self._sock = bind_socket(
            self.listen_host,
            self.listen_port,
            family=family,
            kind=self.KIND,
            v6only=v6only,
            reuse_port=self.reuse_port,
            name=self.name,
        )
        self._configure(self._sock)
        host, port = self._sock.getsockname()[:2]
        self._local = (host, port)
        self._refresh_fields()

    def _configure(self, sock: socket.socket) -> None:
        """Socket options a subclass wants on its listener, set right after binding."""

    def hook_context(self, client: Any, direction: Direction | None = None, data: bytes = b"") -> HookContext:
        return HookContext(
            route=self.name,
            client=(client[0], client[1]),
            listen=self._local or (self.listen_host, self.listen_port),
            target=str(self.resolver),
            direction=direction,
            data=data,
        )

    def log_accepted(self, client: str) -> None:
        """The INFO line for a new connection or session, pre-rendered when logging allows it."""
        fast = self._conn_log
        if fast is not None:
            fast.log(client)
        elif self.LOG.isEnabledFor(logging.INFO):
            self.LOG.info(self.ACCEPT_MESSAGE, extra={**self.fields, "client": client, "action": "accept"})

    def _refresh_fields(self) -> None:
        self.fields = {"route": self.name, **self.describe().as_fields()}
        self._conn_log = connection_log(self.LOG, self.ACCEPT_MESSAGE, {**self.fields, "action": "accept"})
