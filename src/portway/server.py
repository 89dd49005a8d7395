"""Running a configuration: one stream per route, started all-or-nothing, stopped cleanly."""

from __future__ import annotations

import asyncio
import logging

from portway.addr import format_hostport, is_udp
from portway.admission import AdmissionFactory
from portway.config.schema import Config, RouteConfig
from portway.errors import PortwayError
from portway.reload import plan_reload, shared_settings_changed
from portway.stream.tcp import TCPStream
from portway.stream.udp import UDPStream

log = logging.getLogger("portway")

AnyStream = TCPStream | UDPStream


def build_stream(
    name: str, route: RouteConfig, *, reuse_port: bool = False, admission: AdmissionFactory | None = None
) -> AnyStream:
    """The stream a route describes (not yet bound).

    `admission` supplies the global ACL and the entrypoint's PROXY protocol settings and shares
    GeoIP databases and ACL logs between routes; without it only the route's own ACL and PROXY
    settings apply. Raises ConfigError (naming the route) if a GeoIP database or ACL log file
    cannot be opened.
    """
    admission = admission if admission is not None else AdmissionFactory()
    listen = format_hostport(route.listen_host(), route.port.listening)
    target = format_hostport(route.host, route.port.target)
    access = admission.access_control(name, route)
    if is_udp(route.scheme):
        return UDPStream(
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
        )
    return TCPStream(
        route.scheme,
        listen,
        target,
        name=name,
        connect_timeout=route.connect_timeout,
        idle_timeout=route.idle_timeout,
        resolve_interval=route.resolve_interval,
        reuse_port=reuse_port,
        access=access,
        proxy_protocol=admission.proxy_protocol(route),
        relay_proxy_protocol=route.proxy_protocol_version if route.relay_proxy_protocol_header else 0,
    )


class Server:
    """The routes of one config, in one process."""

    def __init__(self, config: Config, *, reuse_port: bool = False) -> None:
        self.config = config
        self.reuse_port = reuse_port
        self.streams: dict[str, AnyStream] = {}
        #: The global ACL, GeoIP databases and ACL logs, opened once and shared by the routes.
        self.admission = AdmissionFactory(config)
        #: Streams replaced or removed by a reload, finishing their connections in the background.
        self._draining: dict[asyncio.Task[None], AnyStream] = {}
        #: Admission factories replaced by a reload, closed when their streams finish draining.
        self._retired: list[AdmissionFactory] = []
        self._closers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Resolve and bind every route, then serve them all; on any failure, nothing is left running."""
        streams = {
            name: build_stream(name, r, reuse_port=self.reuse_port, admission=self.admission)
            for name, r in self.config.routes.items()
        }
        try:
            for stream in streams.values():
                await stream.prepare()
        except BaseException:
            for stream in streams.values():
                await stream.close()
            raise
        for name, stream in streams.items():
            await stream.listen_and_serve()
            self.streams[name] = stream
            log.info("route started", extra={**stream.fields, "action": "start"})

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting everywhere, give live connections `grace` seconds, then close them."""
        streams, self.streams = self.streams, {}
        draining, self._draining = self._draining, {}
        await asyncio.gather(
            *(s.drain(grace) for s in streams.values()),
            _finish_draining(draining, grace),
            return_exceptions=True,
        )
        for stream in streams.values():
            log.info("route stopped", extra={**stream.fields, "action": "stop"})
        for admission in (*self._retired, self.admission):
            admission.close()
        self._retired.clear()

    async def apply(self, config: Config) -> dict[str, Exception]:
        """Move the running routes to those of `config`, disturbing as little as possible.

        Unchanged routes keep their listener and connections. A removed route stops accepting and
        its connections get ``config.grace_period`` to finish. A changed route gets a new stream;
        the old one stops accepting once the new one listens (or just before it binds, when both
        want the same port) and drains like a removed one, so established connections finish on
        the settings they started with. A route that cannot start (its port is taken, its target
        does not resolve) fails alone and loudly; if its old version was still listening it keeps
        serving. Returns the routes that failed, with why; ``self.config`` afterwards describes
        what actually runs, so the next reload retries whatever failed.
        """
        running = {name: self.config.routes[name] for name in self.streams}
        shared_changed = shared_settings_changed(self.config, config)
        plan = plan_reload(running, config.routes, replace_all=shared_changed)
        retired_admission = None
        if shared_changed:
            # New global ACL or entrypoint: every route is rebuilt against a fresh factory; the old
            # one (its GeoIP databases, ACL log files) closes once the old streams have drained.
            retired_admission, self.admission = self.admission, AdmissionFactory(config)
        grace = config.grace_period
        for name in (*plan.removed, *plan.release_first):
            why = "removed" if name in plan.removed else "replaced"
            await self._retire(self.streams.pop(name), grace, why)
        failed: dict[str, Exception] = {}
        ready: dict[str, AnyStream] = {}
        for name in plan.to_start:
            stream = self._build(name, config.routes[name])
            try:
                await stream.prepare()
            except (PortwayError, OSError) as exc:
                await stream.close()
                failed[name] = exc
                kept = " (the previous version keeps serving)" if name in self.streams else ""
                log.error(
                    f"route failed to start on reload{kept}",
                    extra={**stream.fields, "action": "reload", "error": str(exc)},
                )
                continue
            ready[name] = stream
        for name, stream in ready.items():
            await stream.listen_and_serve()
            old = self.streams.get(name)
            self.streams[name] = stream
            log.info("route started", extra={**stream.fields, "action": "start"})
            if old is not None:
                await self._retire(old, grace, "replaced")
        routes = {
            name: config.routes[name] if name in ready or name in plan.unchanged else running[name]
            for name in self.streams
        }
        self.config = config.model_copy(update={"routes": routes})
        if retired_admission is not None:
            self._close_after_drains(retired_admission)
        return failed

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

    def _build(self, name: str, route: RouteConfig) -> AnyStream:
        """How `apply` builds a stream: must stay in step with `start`."""
        return build_stream(name, route, reuse_port=self.reuse_port, admission=self.admission)

    async def _retire(self, stream: AnyStream, grace: float, why: str) -> None:
        """Stop `stream` accepting now; its live connections drain in the background."""
        task = asyncio.get_running_loop().create_task(stream.drain(grace))
        self._draining[task] = stream
        task.add_done_callback(lambda t: self._draining.pop(t, None))
        # drain() closes the listener before its first await: one turn of the loop and the port
        # is free (a changed route that keeps its port binds right after this returns).
        await asyncio.sleep(0)
        log.info(
            f"route {why}, draining",
            extra={**stream.fields, "action": "drain", "grace_s": grace, "live": _live(stream)},
        )


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
