"""Running a configuration: one stream per route, started all-or-nothing, stopped cleanly."""

from __future__ import annotations

import asyncio
import logging

from portway.addr import format_hostport, is_udp
from portway.admission import AdmissionFactory
from portway.config.schema import Config, RouteConfig
from portway.errors import PortwayError
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
            route.scheme, listen, target, name=name, idle_timeout=route.udp_idle_timeout,
            max_sessions=route.udp_max_sessions, resolve_interval=route.resolve_interval, reuse_port=reuse_port,
            access=access, relay_proxy_protocol=route.relay_proxy_protocol_header,
        )
    return TCPStream(
        route.scheme, listen, target, name=name, connect_timeout=route.connect_timeout,
        idle_timeout=route.idle_timeout, resolve_interval=route.resolve_interval, reuse_port=reuse_port,
        access=access, proxy_protocol=admission.proxy_protocol(route),
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
        await asyncio.gather(*(s.drain(grace) for s in streams.values()), return_exceptions=True)
        for stream in streams.values():
            log.info("route stopped", extra={**stream.fields, "action": "stop"})


__all__ = ["PortwayError", "Server", "build_stream"]
