"""Everything ``serve`` would refuse before listening, found without listening: what ``check`` runs.

``portway check`` must be as strict as ``serve`` (as ``haproxy -c`` and ``nginx -t`` are), or it
says OK to a file that then fails at 3 a.m. Both commands call `preflight` on the loaded config
before anything binds, so the messages are the same and carry the file and line of the value.

What it does that validation cannot: it opens the GeoIP databases and ACL log files through the
very `AdmissionFactory` the server uses (so a missing database or a log file in a directory that
does not exist is found, with serve's own wording), and it resolves every target name once. It
does not bind: whether a port is free at ``check`` time says nothing about when ``serve`` runs.

Opening an ACL log file creates it, as ``nginx -t`` creates its logs: the same side effect serve
would have.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from portway.addr import family_of, ip_family, is_udp
from portway.admission import AdmissionFactory
from portway.certificates import ServerCertificates, target_context
from portway.config.load import Sources
from portway.config.schema import AclConfig, RouteConfig
from portway.errors import ConfigError

__all__ = ["Preflight", "preflight", "resolve_problem"]


@dataclass(slots=True)
class Preflight:
    """What would stop ``serve`` (errors) and what only might (warnings, e.g. names offline)."""

    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[ConfigError] = field(default_factory=list)


def preflight(sources: Sources, *, offline: bool = False) -> Preflight:
    """Open what serve opens and resolve what serve resolves; `offline` makes names only warnings."""
    out = Preflight()
    seen: set[str] = set()

    def add(error: ConfigError, *, warning: bool = False) -> None:
        if str(error) not in seen:  # the global ACL fails once, not once per route using it
            seen.add(str(error))
            (out.warnings if warning else out.errors).append(error)

    config = sources.config
    admission = AdmissionFactory(config)
    try:
        for name, route in config.routes.items():
            try:
                admission.access_control(name, route)
                admission.proxy_protocol(route)
            except ConfigError as exc:
                add(_located_acl(sources, exc, name, route))
    finally:
        admission.close()
    for name, route in config.routes.items():
        if route.tls is not None:  # loaded exactly as serve loads them: a bad pair names its file
            tls = route.tls
            try:
                ServerCertificates(name, tls.pairs(), client_ca=tls.client_ca, min_version=tls.min_version)
                if tls.relay:
                    target_context(name, ca=tls.ca, verify=tls.verify)
            except ConfigError as exc:
                add(sources.locate(exc, ("tls",)))
        for index, target in enumerate(route.pool()):
            problem = resolve_problem(route, target.host, target.port or route.port.target)
            if problem is None:
                continue
            where: tuple[str | int, ...] = ("host",) if route.targets is None else ("targets", index)
            field = "host" if route.targets is None else f"targets[{index}]"
            add(sources.locate(ConfigError(problem, route=name, field=field), where), warning=offline)
    out.errors.sort(key=_position)
    out.warnings.sort(key=_position)
    return out


def _position(error: ConfigError) -> tuple[str, int, int]:
    return (error.file or "", error.line or 0, error.column or 0)


def resolve_problem(route: RouteConfig, host: str, port: int) -> str | None:
    """Why a target of `route` does not resolve (the words the running resolver logs), or None."""
    host = host or "localhost"
    if ip_family(host) is not None:
        return None
    kind = socket.SOCK_DGRAM if is_udp(route.scheme) else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(host, port, family=family_of(route.scheme), type=kind)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
        return f"target host {host!r} does not resolve: {reason}"
    if not infos:
        return f"target host {host!r} has no usable address"
    return None


def _located_acl(sources: Sources, exc: ConfigError, name: str, route: RouteConfig) -> ConfigError:
    """`exc` from the admission factory, pointed at the value that caused it."""
    own = route.acl is not None
    acl: AclConfig | None = route.acl if own else sources.config.acl
    path: tuple[str, ...] = ("acl",)
    if acl is not None and acl.geoip is not None and exc.message.startswith("GeoIP database"):
        path = ("acl", "geoip", "database")
    elif acl is not None and acl.log.path is not None and exc.message.startswith("ACL log file"):
        path = ("acl", "log", "path")
    return sources.locate(ConfigError(exc.message, route=name if own else None, field=".".join(path)), path)
