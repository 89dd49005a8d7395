"""Running a configuration: one stream per route, started all-or-nothing, stopped cleanly.

The server owns each route's target pool (not the stream): a reload that replaces a route's
listener hands the same pool, health state and all, to the new stream when the pool's settings
did not change, and a reload that changes only the pool updates it in place.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Collection, Mapping, Sequence

from portway.addr import family_of, format_hostport, is_udp
from portway.admission import AdmissionFactory
from portway.balance import HealthPolicy
from portway.certificates import ServerCertificates, target_context
from portway.config.links import fold_links
from portway.config.schema import Config, Proto, RouteConfig, listen_key, listeners_overlap, shared_groups
from portway.errors import PortwayError
from portway.events import Observer
from portway.limits import ClientLimits
from portway.matching import MatchTable
from portway.reload import plan_reload, pool_settings, shared_groups_changed, shared_settings_changed
from portway.status import RouteStatus, TargetStatus
from portway.stream.pool import HealthCheck, PoolMember, TargetPool
from portway.stream.shared import SharedListener
from portway.stream.shared_udp import SharedUDPListener
from portway.stream.tcp import TCPStream
from portway.stream.udp import UDPStream

log = logging.getLogger("portway")

AnyStream = TCPStream | UDPStream
AnyListener = SharedListener | SharedUDPListener


def build_pool(name: str, route: RouteConfig) -> TargetPool:
    """The target pool a route describes (not yet resolved)."""
    hc = route.healthcheck
    check = None
    health = HealthPolicy()
    if hc is not None:
        check = HealthCheck(hc.interval, hc.timeout, hc.send_bytes(), hc.expectation())
        health = HealthPolicy(rise=hc.rise, fall=hc.fall)
    return TargetPool(
        name,
        [PoolMember(t.host, t.port or route.port.target, t.weight, t.backup) for t in route.pool()],
        family=family_of(route.scheme),
        kind=socket.SOCK_DGRAM if is_udp(route.scheme) else socket.SOCK_STREAM,
        mode=route.load_balance.mode,
        health=health,
        check=check,
        resolve_interval=route.resolve_interval,
    )


def client_limits(route: RouteConfig) -> ClientLimits | None:
    per = route.per_client
    if per.max_connections is None and per.rate is None:
        return None
    return ClientLimits(per.max_connections, per.rate_per_second())


def build_stream(
    name: str,
    route: RouteConfig,
    *,
    reuse_port: bool = False,
    admission: AdmissionFactory | None = None,
    pool: TargetPool | None = None,
    observer: Observer | None = None,
    shared: bool = False,
) -> AnyStream:
    """The stream a route describes (not yet bound).

    `admission` supplies the global ACL and the entrypoint's PROXY protocol settings and shares
    GeoIP databases and ACL logs between routes; without it only the route's own ACL and PROXY
    settings apply. Raises ConfigError (naming the route) if a GeoIP database or ACL log file
    cannot be opened, or a TLS certificate or key cannot be loaded. `pool` is the caller's (it
    stops it); without one the stream builds and owns its own. `shared`: the route sits behind a
    `SharedListener` or `SharedUDPListener` (see `build_listener`), so the stream never binds.
    """
    admission = admission if admission is not None else AdmissionFactory()
    listen = format_hostport(route.listen_host(), route.port.listening)
    owned = pool is None
    pool = pool if pool is not None else build_pool(name, route)
    target = str(pool.resolvers[0])
    access = admission.access_control(name, route)
    stream: AnyStream
    if is_udp(route.scheme):
        stream = UDPStream(
            route.scheme,
            listen,
            target,
            name=name,
            idle_timeout=route.udp_idle_timeout,
            max_sessions=route.udp_max_sessions,
            resolve_interval=route.resolve_interval,
            reuse_port=reuse_port,
            access=access,
            relay_proxy_protocol=route.relay_proxy_protocol_header,
            pool=pool,
            max_connections=route.max_connections,
            client_limits=client_limits(route),
            observer=observer,
            shared=shared,
        )
    else:
        tls = route.tls
        certificates = None
        relay_tls = None
        if tls is not None:
            certificates = ServerCertificates(
                name, tls.pairs(), client_ca=tls.client_ca, min_version=tls.min_version
            )
            if tls.relay:
                relay_tls = target_context(name, ca=tls.ca, verify=tls.verify)
        stream = TCPStream(
            route.scheme,
            listen,
            target,
            name=name,
            connect_timeout=route.connect_timeout,
            idle_timeout=route.idle_timeout,
            half_close=route.half_close,
            resolve_interval=route.resolve_interval,
            reuse_port=reuse_port,
            access=access,
            proxy_protocol=admission.proxy_protocol(route),
            relay_proxy_protocol=route.proxy_protocol_version if route.relay_proxy_protocol_header else 0,
            pool=pool,
            max_connections=route.max_connections,
            client_limits=client_limits(route),
            observer=observer,
            shared=shared,
            tls=certificates,
            target_tls=relay_tls,
        )
    stream.owns_pool = owned
    return stream


ListenKey = tuple[Proto, str, int]


def build_listener(
    routes: dict[str, RouteConfig],
    streams: Mapping[str, AnyStream],
    *,
    reuse_port: bool = False,
    admission: AdmissionFactory | None = None,
    observer: Observer | None = None,
) -> AnyListener:
    """The shared listener of one group of routes (`shared_groups`), over their streams.

    Listener-level settings come from the first route: validation made every route agree. The
    global ACL is applied by the listener, before any peek, when every route of the group uses
    it; a route with its own ACL replaces the global one, so then each route applies its own
    after the choice (as a plain route would)."""
    admission = admission if admission is not None else AdmissionFactory()
    first = next(iter(routes.values()))
    table = MatchTable({n: r.match.to_match() if r.match is not None else None for n, r in routes.items()})
    if is_udp(first.scheme):
        # Each route's stream applies its own (or the global) ACL when a session is created.
        udp = {n: s for n, s in streams.items() if isinstance(s, UDPStream)}
        assert len(udp) == len(streams)
        return SharedUDPListener(
            first.scheme,
            first.listen_host(),
            first.port.listening,
            udp,
            table,
            peek_timeout=first.peek_timeout,
            reuse_port=reuse_port,
            observer=observer,
        )
    tcp = {n: s for n, s in streams.items() if isinstance(s, TCPStream)}
    assert len(tcp) == len(streams)
    return SharedListener(
        first.scheme,
        first.listen_host(),
        first.port.listening,
        tcp,
        table,
        peek_timeout=first.peek_timeout,
        proxy_protocol=admission.proxy_protocol(first),
        access=admission.global_access_control() if all(r.acl is None for r in routes.values()) else None,
        reuse_port=reuse_port,
        observer=observer,
    )


class Server:
    """The routes of one config, in one process."""

    #: Receives every connection's lifecycle events (metrics, access log); None = nobody.
    observer: Observer | None = None

    def __init__(self, config: Config, *, reuse_port: bool = False, observer: Observer | None = None) -> None:
        self.config = config
        self.reuse_port = reuse_port
        self.observer = observer
        self.streams: dict[str, AnyStream] = {}
        #: The shared listeners (routes with `match:` or `tls:`), by listen address.
        self.listeners: dict[ListenKey, AnyListener] = {}
        #: Each running route's pool; a stream only borrows it (see the module docstring).
        self.pools: dict[str, TargetPool] = {}
        #: The global ACL, GeoIP databases and ACL logs, opened once and shared by the routes.
        self.admission = AdmissionFactory(config)
        #: Streams replaced or removed by a reload, finishing their connections in the background.
        self._draining: dict[asyncio.Task[None], AnyStream] = {}
        #: Admission factories replaced by a reload, closed when their streams finish draining.
        self._retired: list[AdmissionFactory] = []
        self._closers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Resolve and bind every route, then serve them all; on any failure, nothing is left running."""
        self.config = fold(self.config)
        routes = self.config.routes
        groups = shared_groups(routes)
        grouped = {n for names in groups.values() for n in names}
        pools: dict[str, TargetPool] = {}
        streams: dict[str, AnyStream] = {}
        listeners: dict[ListenKey, AnyListener] = {}
        try:
            for name, r in routes.items():
                pools[name] = build_pool(name, r)
                streams[name] = self._build(name, r, pools[name], shared=name in grouped)
            for stream in streams.values():
                await stream.prepare()
            for key, names in groups.items():
                listeners[key] = self._build_listener(names, routes, streams)
                await _prepare(listeners[key])
        except BaseException:
            for listener in listeners.values():
                listener.close()
            for stream in streams.values():
                await stream.close()
            for pool in pools.values():
                pool.stop()
            raise
        self.pools = pools
        for name, stream in streams.items():
            await stream.listen_and_serve()
            self.streams[name] = stream
            log.info("route started", extra={**stream.fields, "action": "start"})
        for key, listener in listeners.items():
            listener.serve()
            self.listeners[key] = listener

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting everywhere, give live connections `grace` seconds, then close them."""
        for listener in self.listeners.values():
            listener.close()
        self.listeners = {}
        streams, self.streams = self.streams, {}
        draining, self._draining = self._draining, {}
        await asyncio.gather(
            *(s.drain(grace) for s in streams.values()),
            _finish_draining(draining, grace),
            return_exceptions=True,
        )
        for stream in streams.values():
            log.info("route stopped", extra={**stream.fields, "action": "stop"})
        pools, self.pools = self.pools, {}
        for pool in {
            *pools.values(),
            *(s.pool for s in streams.values()),
            *(s.pool for s in draining.values()),
        }:
            pool.stop()
        for admission in (*self._retired, self.admission):
            admission.close()
        self._retired.clear()

    async def apply(self, config: Config) -> dict[str, Exception]:
        """Move the running routes to those of `config`, disturbing as little as possible.

        Unchanged routes keep their listener and connections. A route whose pool alone changed
        keeps them too: its pool is updated in place, and connections to a target that left get
        ``config.grace_period`` to finish. A removed route stops accepting and its connections
        get the grace period. A changed route gets a new stream (with the same pool, health
        state included, when the pool's settings did not change); the old one stops accepting
        once the new one listens (or just before it binds, when both want the same port) and
        drains like a removed one, so established connections finish on the settings they
        started with. A route that cannot start (its port is taken, its target does not
        resolve) fails alone and loudly; if its old version was still listening it keeps
        serving. Returns the routes that failed, with why; ``self.config`` afterwards describes
        what actually runs, so the next reload retries whatever failed.
        """
        config = fold(config)
        running = {name: self.config.routes[name] for name in self.streams}
        shared_changed = shared_settings_changed(self.config, config)
        plan = plan_reload(running, config.routes, replace_all=shared_changed)
        regroup = shared_groups_changed(running, config.routes, plan)
        if regroup:
            plan = plan_reload(running, config.routes, replace_all=shared_changed, replace=regroup)
        new_groups = {k: v for k, v in shared_groups(config.routes).items() if regroup.intersection(v)}
        for key in [k for k, listener in self.listeners.items() if regroup.intersection(listener.routes)]:
            self.listeners.pop(key).close()  # its routes drain below, like any replaced route
        for name in plan.unchanged:
            stream = self.streams[name]
            if isinstance(stream, TCPStream) and stream.tls is not None:
                stream.tls.reload()  # a reload (SIGHUP) re-reads certificates even when unchanged
        retired_admission = None
        if shared_changed:
            # New global ACL or entrypoint: every route is rebuilt against a fresh factory; the old
            # one (its GeoIP databases, ACL log files) closes once the old streams have drained.
            retired_admission, self.admission = self.admission, AdmissionFactory(config)
        grace = config.grace_period
        failed: dict[str, Exception] = {}
        retargeted: list[str] = []
        for name in plan.retargeted:
            try:
                await self._retarget(name, config.routes[name], grace)
            except (PortwayError, OSError) as exc:
                failed[name] = exc
                log.error(
                    "pool update failed on reload (the previous pool keeps serving)",
                    extra={**self.streams[name].fields, "action": "reload", "error": str(exc)},
                )
                continue
            retargeted.append(name)
        groupings = (shared_groups(dict(running)), shared_groups(config.routes))
        behind_shared = {n for groups in groupings for names in groups.values() for n in names}
        handover = _udp_handovers(
            plan.to_start, (*plan.removed, *plan.changed), running, config.routes, shared=behind_shared
        )
        handed = {old: new for new, old in handover.items()}
        starting = [config.routes[n] for n in plan.to_start]
        for name in (*plan.removed, *plan.release_first):
            if name in handed:
                continue  # its socket goes to a new stream below; it serves on meanwhile
            why = "removed" if name in plan.removed else "replaced"
            # A UDP listener carries its sessions' replies, so a draining one keeps its socket,
            # unless a new listener needs the address now.
            wanted = any(listeners_overlap(running[name], r) for r in starting)
            await self._retire(self.streams.pop(name), grace, why, release=wanted)
        ready: dict[str, AnyStream] = {}
        for name in plan.to_start:
            route = config.routes[name]
            old_route = running.get(name)
            pool = self.pools.get(name)
            if pool is None or old_route is None or pool_settings(old_route) != pool_settings(route):
                pool = build_pool(name, route)
            try:
                stream = self._build(name, route, pool, shared=any(name in v for v in new_groups.values()))
            except PortwayError as exc:
                if pool is not self.pools.get(name):
                    pool.stop()
                failed[name] = exc
                log.error(
                    "route failed to start on reload",
                    extra={"route": name, "action": "reload", "error": str(exc)},
                )
                continue
            if name in handover and isinstance(stream, UDPStream):
                old_stream = self.streams[handover[name]]
                assert isinstance(old_stream, UDPStream)
                stream.adopt(old_stream)
            try:
                await stream.prepare()
            except (PortwayError, OSError) as exc:
                await stream.close()
                if pool is not self.pools.get(name):
                    pool.stop()
                failed[name] = exc
                kept = " (the previous version keeps serving)" if name in self.streams else ""
                log.error(
                    f"route failed to start on reload{kept}",
                    extra={**stream.fields, "action": "reload", "error": str(exc)},
                )
                old_name = handover.pop(name, None)
                if old_name in plan.removed:  # nobody takes its socket over after all
                    await self._retire(self.streams.pop(old_name), grace, "removed")
                continue
            ready[name] = stream
        listeners = await self._regroup(new_groups, config.routes, ready, failed)
        for name in plan.removed:
            self.pools.pop(name, None)
        for name, stream in ready.items():
            await stream.listen_and_serve()
            old_name = handover.get(name)
            inherited = self.streams.pop(old_name) if old_name is not None and old_name != name else None
            old = self.streams.get(name)
            self.streams[name] = stream
            replaced = self.pools.get(name)
            self.pools[name] = stream.pool
            users = [*self._draining.values(), *([old] if old is not None else [])]
            if replaced not in (None, stream.pool) and all(s.pool is not replaced for s in users):
                # Its stream already drained (a released-first listener drains while the new
                # one prepares) and saw the pool still registered: nobody else will stop it.
                replaced.stop()
            log.info("route started", extra={**stream.fields, "action": "start"})
            if old_name is not None:
                # The old stream's sessions go on, on its settings, until they idle out.
                retiring = inherited if inherited is not None else old
                if retiring is not None:
                    await self._retire(retiring, None, "replaced")
            elif old is not None:
                await self._retire(old, grace, "replaced")
        for key, listener in listeners.items():
            listener.serve()
            self.listeners[key] = listener
        done = {*ready, *plan.unchanged, *retargeted}
        routes = {name: config.routes[name] if name in done else running[name] for name in self.streams}
        self.config = config.model_copy(update={"routes": routes})
        if retired_admission is not None:
            self._close_after_drains(retired_admission)
        return failed

    def status(self) -> list[RouteStatus]:
        """Every running route with its targets' health and load (the status API's routes)."""
        out: list[RouteStatus] = []
        for name, stream in self.streams.items():
            pool = stream.pool
            now = pool.loop.time() if pool.loop is not None else 0.0
            targets = [
                TargetStatus(
                    member.key, pool.balancer.state_of(index, now) == "up" or pool.trivial, state.active
                )
                for index, (member, state) in enumerate(zip(pool.members, pool.balancer.targets, strict=True))
            ]
            protocol = "udp" if isinstance(stream, UDPStream) else "tcp"
            route = self.config.routes.get(name)
            match = route.match.describe() if route is not None and route.match is not None else None
            out.append(RouteStatus(name, protocol, stream.describe().listen, match, targets))
        return out

    async def _retarget(self, name: str, route: RouteConfig, grace: float) -> None:
        """Update a running route's pool in place; drain connections to targets that left."""
        stream = self.streams[name]
        fresh = build_pool(name, route)
        await stream.pool.update(
            fresh.members, mode=route.load_balance.mode, health=fresh.balancer.health, check=fresh.check
        )
        fresh.stop()
        log.info(
            "route pool updated",
            extra={**stream.fields, "action": "reload", "targets": str(stream.pool)},
        )
        if stream.detached_live():
            task = asyncio.get_running_loop().create_task(stream.close_detached(grace))
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    def _close_after_drains(self, admission: AdmissionFactory) -> None:
        """Close a replaced factory once the streams still draining on it are done."""
        self._retired.append(admission)
        drains = list(self._draining)

        async def close_later() -> None:
            await asyncio.gather(*drains, return_exceptions=True)
            if admission in self._retired:
                self._retired.remove(admission)
                admission.close()

        task = asyncio.get_running_loop().create_task(close_later())
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    def _build(self, name: str, route: RouteConfig, pool: TargetPool, *, shared: bool = False) -> AnyStream:
        """How `start` and `apply` build a stream."""
        return build_stream(
            name,
            route,
            reuse_port=self.reuse_port,
            admission=self.admission,
            pool=pool,
            observer=self.observer,
            shared=shared,
        )

    def _build_listener(
        self, names: list[str], routes: Mapping[str, RouteConfig], streams: Mapping[str, AnyStream]
    ) -> AnyListener:
        return build_listener(
            {n: routes[n] for n in names},
            {n: streams[n] for n in names},
            reuse_port=self.reuse_port,
            admission=self.admission,
            observer=self.observer,
        )

    async def _regroup(
        self,
        groups: dict[ListenKey, list[str]],
        routes: Mapping[str, RouteConfig],
        ready: dict[str, AnyStream],
        failed: dict[str, Exception],
    ) -> dict[ListenKey, AnyListener]:
        """Bind the new shared listeners of a reload. A group starts whole or not at all: if one
        of its routes failed, or the port cannot be bound, every route of the group fails."""
        out: dict[ListenKey, AnyListener] = {}
        for key, names in groups.items():
            problem: Exception | None = next((failed[n] for n in names if n in failed), None)
            listener = None
            if problem is None:
                try:
                    listener = self._build_listener(names, routes, ready)
                    await _prepare(listener)
                except (PortwayError, OSError) as exc:
                    problem = exc
            if listener is not None and problem is None:
                out[key] = listener
                continue
            assert problem is not None
            for name in names:
                stream = ready.pop(name, None)
                if stream is not None:
                    await stream.close()
                    if stream.pool is not self.pools.get(name):
                        stream.pool.stop()
                    failed.setdefault(name, problem)
                    log.error(
                        "route failed to start on reload (its shared listener did not start)",
                        extra={"route": name, "action": "reload", "error": str(problem)},
                    )
        return out

    async def _retire(
        self, stream: AnyStream, grace: float | None, why: str, *, release: bool = False
    ) -> None:
        """Stop `stream` accepting now; its live connections drain in the background (for
        `grace` seconds; None: until they end). `release`: a new listener needs the address,
        so a UDP stream gives up its socket (and sessions) at once."""
        if release and isinstance(stream, UDPStream):
            grace = 0.0
        task = asyncio.get_running_loop().create_task(stream.drain(grace))
        self._draining[task] = stream

        def drained(t: asyncio.Task[None]) -> None:
            self._draining.pop(t, None)
            if stream.pool not in self.pools.values():
                stream.pool.stop()  # no newer stream took it over

        task.add_done_callback(drained)
        # drain() closes the listener before its first await: one turn of the loop and the port
        # is free (a changed route that keeps its port binds right after this returns).
        await asyncio.sleep(0)
        log.info(
            f"route {why}, draining",
            extra={**stream.fields, "action": "drain", "grace_s": grace, "live": _live(stream)},
        )


async def _prepare(listener: AnyListener) -> None:
    """Bind a shared listener (a UDP one also gets its transport, which its routes reply through)."""
    if isinstance(listener, SharedUDPListener):
        await listener.open()
    else:
        listener.prepare()


def _udp_handovers(
    starting: Sequence[str],
    leaving: Sequence[str],
    running: Mapping[str, RouteConfig],
    wanted: Mapping[str, RouteConfig],
    shared: Collection[str] = (),
) -> dict[str, str]:
    """New UDP routes that listen exactly where a leaving (removed or changed) one does: the new
    stream adopts the old socket, so the old sessions keep being served from that address.

    Not for routes behind a shared UDP listener (`shared`, old or new): their socket belongs to
    the listener, which a reload rebuilds with its group (the group's sessions start over)."""
    by_key = {listen_key(running[n]): n for n in leaving if is_udp(running[n].scheme) and n not in shared}
    out: dict[str, str] = {}
    for name in starting:
        if name in shared:
            continue
        route = wanted[name]
        key = listen_key(route)
        old = by_key.get(key)
        if old is not None and is_udp(route.scheme) and key[2] != 0 and running[old].scheme == route.scheme:
            out[name] = old
            del by_key[key]
    return out


def fold(config: Config) -> Config:
    """`config` with every ``load_balance.link`` group folded into one pool route.

    Files are checked for link problems when they load (a ConfigError); routes from providers
    (Docker containers joining a link) can still disagree, and those members are skipped loudly.
    """
    if not any(r.load_balance.link for r in config.routes.values()):
        return config
    folded = fold_links(config.routes)
    for problem in folded.problems:
        log.error(
            f"route {problem.route!r} {problem.message}",
            extra={"route": problem.route, "field": problem.field, "action": "link"},
        )
    return config.model_copy(update={"routes": folded.routes})


async def _finish_draining(draining: dict[asyncio.Task[None], AnyStream], grace: float) -> None:
    """Give reload drains at most `grace` more seconds (shutdown wins), then close what is left."""
    if not draining:
        return
    _, late = await asyncio.wait(draining, timeout=grace)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    for task in late:
        await draining[task].close()


def _live(stream: AnyStream) -> int:
    return len(stream.conns) if isinstance(stream, TCPStream) else len(stream.sessions)


__all__ = ["PortwayError", "Server", "build_stream"]
