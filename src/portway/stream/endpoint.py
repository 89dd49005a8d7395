"""What TCP and UDP streams share: addresses, the target pool, binding, limits and log fields.

Kept apart from the data paths so that `TCPStream` and `UDPStream` differ only in how they move
bytes, and a change to binding or logging cannot drift between the two.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, ClassVar

from portway.addr import Network, family_of, format_hostport, parse_hostport
from portway.events import Observer
from portway.limits import ClientLimits
from portway.logs import BurstLog, ConnectionLog, connection_log
from portway.stream.base import Address, Direction, Hook, HookContext, StreamDescription, addr_str
from portway.stream.listen import bind_listener
from portway.stream.pool import PoolMember, TargetPool


class Endpoint:
    """A listener on one address that forwards to a pool of targets (often a pool of one)."""

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
        pool: TargetPool | None = None,
        max_connections: int | None = None,
        client_limits: ClientLimits | None = None,
        observer: Observer | None = None,
    ) -> None:
        """`pool` replaces `target` (a pool of one built from it otherwise); a pool given here
        belongs to the caller, which starts and stops it (a reload may hand it to the next
        stream of the same route, health state and all)."""
        self.network = network
        self.name = name
        listen_hp = parse_hostport(listen)
        self.listen_host = listen_hp.host or ("0.0.0.0" if family_of(network) == socket.AF_INET else "::")
        self.listen_port = listen_hp.port
        self.reuse_port = reuse_port
        self.owns_pool = pool is None
        if pool is None:
            target_hp = parse_hostport(target, allow_zero_port=False)
            pool = TargetPool(
                name,
                [PoolMember(target_hp.host or "localhost", target_hp.port)],
                family=family_of(network),
                kind=self.KIND,
                resolve_interval=resolve_interval,
            )
        self.pool = pool
        #: Live connections (TCP) or sessions (UDP) past which new clients are refused; 0 = none.
        self.max_connections = max_connections or 0
        self.client_limits = client_limits
        #: Whoever wants the lifecycle events (metrics, access log); None costs one test per event.
        self.observer = observer
        self._limit_log = BurstLog(5.0)
        #: Runs before each dial (per TCP connection, per new UDP session); set when serving starts.
        self.pre_dial: Hook | None = None
        self._sock: socket.socket | None = None
        self._local: Address | None = None
        self.fields: dict[str, str] = {}
        #: The pre-rendered INFO line for new connections; None when INFO is off or not batched.
        self.conn_log: ConnectionLog | None = None
        self._refresh_fields()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in prepare()

    @property
    def local_addr(self) -> Address | None:
        return self._local

    def describe(self) -> StreamDescription:
        listen = format_hostport(*(self._local or (self.listen_host, self.listen_port)))
        return StreamDescription(f"{self.network}->{self.network}", listen, str(self.pool))

    async def prepare(self) -> None:
        """Resolve the target and bind the listener without serving yet (all-or-nothing starts)."""
        if self._sock is not None:
            return
        self.loop = asyncio.get_running_loop()
        await self.pool.start()
        self._sock = bind_listener(
            self.network,
            self.listen_host,
            self.listen_port,
            self.KIND,
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
            target=str(self.pool),
            direction=direction,
            data=data,
        )

    async def passes_pre_dial(self, client: Any) -> bool:
        """Run the `pre_dial` hook for `client`: False (logged) if it raised, so the caller closes
        the connection or drops the session before anything is dialed."""
        hook = self.pre_dial
        if hook is None:
            return True
        try:
            await hook(self.hook_context(client))
        except Exception as exc:
            self.LOG.info(
                "rejected by pre_dial hook",
                extra={**self.fields, "client": addr_str(client), "action": "reject", "error": repr(exc)},
            )
            return False
        return True

    def log_accepted(self, client: str) -> None:
        """The INFO line for a new connection or session, pre-rendered when logging allows it."""
        fast = self.conn_log
        if fast is not None:
            fast.log(client)
        elif self.LOG.isEnabledFor(logging.INFO):
            self.LOG.info(self.ACCEPT_MESSAGE, extra={**self.fields, "client": client, "action": "accept"})

    def _refresh_fields(self) -> None:
        self.fields = {"route": self.name, **self.describe().as_fields()}
        self.conn_log = connection_log(self.LOG, self.ACCEPT_MESSAGE, {**self.fields, "action": "accept"})

    def stop_pool(self) -> None:
        """Stop resolving and probing, if this stream built its own pool."""
        if self.owns_pool:
            self.pool.stop()

    def over_limit(self, live: int, client: str) -> str | None:
        """Why a new client must be refused (route or per-client limit), or None to admit it.

        An admitted client counts against its per-client limit until `release_client`."""
        if self.max_connections and live >= self.max_connections:
            return "route connection limit"
        limits = self.client_limits
        if limits is not None:
            return limits.admit(client, self.loop.time())
        return None

    def release_client(self, client: str) -> None:
        if self.client_limits is not None:
            self.client_limits.release(client)

    def log_limited(self, client: str, reason: str) -> None:
        """A client refused by a limit: logged at a bounded rate, whatever the flood."""
        emit, suppressed = self._limit_log.hit()
        if emit:
            self.LOG.warning(
                f"refused: {reason}",
                extra={**self.fields, "client": client, "action": "limit", "suppressed": suppressed},
            )

    # -- connections to targets a reload removed

    def live(self) -> list[Any]:
        """Live connections (TCP) or sessions (UDP): objects with `holding` and `shutdown()`."""
        raise NotImplementedError

    def detached_live(self) -> int:
        """How many live connections use a target that a reload removed from the pool."""
        return sum(1 for c in self.live() if c.holding is not None and not c.holding.attached)

    async def close_detached(self, grace: float) -> None:
        """Give connections to removed targets `grace` seconds, then close them (like a
        removed route's); connections to targets that stayed are never touched."""
        await asyncio.sleep(grace)
        for conn in self.live():
            holding = conn.holding
            if holding is not None and not holding.attached:
                conn.shutdown()
