"""Who may use a listener, and who the client really is: the glue between config and streams.

The pure parts live elsewhere (`portway.acl` decides, `portway.proxy_protocol` parses); this
module turns the validated config into the few objects a stream consults once per connection
or UDP session:

- `ProxyProtocolPolicy`: whether a listener expects PROXY headers, from whom (trusted_proxies)
  and for how long it waits. ``mode: disabled`` is represented by no policy at all, so a stream
  without one never looks at a header.
- `AccessControl`: an `Acl` plus its logging. Denials are aggregated per address through a
  `DenyLog` (first one logged at once, repeats summarised by a periodic drain task), so a scan
  or flood costs a few lines, not one per attempt.
- `AdmissionFactory`: builds both for each route of a config, sharing the global ACL (one
  decision cache, one drain task) between the routes that use it and opening every GeoIP
  database and ACL log file once, at startup, where a missing file is a `ConfigError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import sys
from dataclasses import dataclass
from typing import Literal

from portway.acl import Acl, DenyLog
from portway.config.schema import AclConfig, Config, ProxyProtocolConfig, RouteConfig
from portway.errors import ConfigError, ProxyProtocolError
from portway.geoip import GeoIpDatabase
from portway.logs import ConsoleFormatter
from portway.proxy_protocol import ProxyHeader, build_v1, build_v2, classify_prefix, maybe_parse_header

__all__ = [
    "AccessControl",
    "AdmissionFactory",
    "HeaderDone",
    "HeaderReader",
    "HeaderRefused",
    "ProxyProtocolPolicy",
    "relay_header",
]

Address = tuple[str, int]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Seconds between summaries of repeated denials (and the window they aggregate over).
DENY_LOG_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class ProxyProtocolPolicy:
    """Receiving the PROXY protocol on one TCP listener (never built for ``mode: disabled``)."""

    mode: Literal["required", "mixed"]
    trusted: tuple[IPNetwork, ...]
    header_timeout: float

    @classmethod
    def from_config(cls, config: ProxyProtocolConfig | None) -> ProxyProtocolPolicy | None:
        if config is None or config.mode == "disabled":
            return None
        trusted = tuple(_unmap_net(ipaddress.ip_network(n, strict=False)) for n in config.trusted_proxies)
        return cls(config.mode, trusted, config.header_timeout)

    def first_step(self, host: str) -> Literal["read", "skip", "refuse"]:
        """What a new connection from `host` does first: read a header (a trusted proxy), skip
        it (mixed mode: an untrusted peer is served as itself, its bytes never inspected), or be
        refused (required mode, untrusted peer)."""
        if self.trusts(host):
            return "read"
        return "refuse" if self.mode == "required" else "skip"

    def trusts(self, host: str) -> bool:
        """Whether a peer at `host` may tell us who the client is."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # dual-stack listeners report IPv4 peers as ::ffff:a.b.c.d
        return any(ip in net for net in self.trusted)


UNTRUSTED = "peer is not a trusted proxy (PROXY protocol required)"
#: A v2 header is at most 16 + 65535 bytes and v1 far shorter: reading stops there, so a trusted
#: but broken peer cannot make a connection hold more.
HEADER_LIMIT = 16 + 65535


@dataclass(frozen=True, slots=True)
class HeaderDone:
    """The header phase is over: `header` is None when a mixed-mode client sent none; `rest` are
    the bytes after the header, to be forwarded to the target before anything else."""

    header: ProxyHeader | None
    rest: bytes

    def addresses(self, client: Address, local: Address | None) -> tuple[Address, Address | None]:
        """The client and the address it connected to, as a believed header tells them; a LOCAL
        or UNKNOWN header (the proxy speaking for itself, e.g. health checks) or none at all
        leaves the socket's own."""
        parsed = self.header
        if parsed is None or parsed.source is None:
            return client, local
        return parsed.source, parsed.destination if parsed.destination is not None else local


@dataclass(frozen=True, slots=True)
class HeaderRefused:
    reason: str


HeaderOutcome = HeaderDone | HeaderRefused


class HeaderReader:
    """The start of a trusted peer's connection, until its PROXY header is complete. Sans-I/O.

    Both TCP engines feed it what they read and act on the outcome; it decides, in one place,
    what counts as a header, as plain data (mixed mode), or as a reason to close.
    """

    __slots__ = ("buffer", "mixed", "timeout")

    def __init__(self, policy: ProxyProtocolPolicy) -> None:
        self.mixed = policy.mode == "mixed"
        self.timeout = policy.header_timeout
        self.buffer = bytearray()

    def room(self) -> int:
        """How many more bytes may be read before the header is too long."""
        return HEADER_LIMIT + 1 - len(self.buffer)

    def feed(self, data: bytes) -> HeaderOutcome | None:
        """Add bytes; None means "need more"."""
        buffer = self.buffer
        buffer += data
        if self._plain(final=False):
            return HeaderDone(None, bytes(buffer))
        try:
            parsed = maybe_parse_header(buffer)
        except ProxyProtocolError as exc:
            return HeaderRefused(str(exc))
        if parsed is not None:
            return HeaderDone(parsed, bytes(buffer[parsed.length :]))
        if len(buffer) > HEADER_LIMIT:
            return HeaderRefused(f"PROXY header longer than {HEADER_LIMIT} bytes")
        return None

    def end_of_stream(self) -> HeaderOutcome:
        """The peer stopped sending before the header was complete."""
        if self.buffer and self._plain(final=True):
            return HeaderDone(None, bytes(self.buffer))
        return HeaderRefused("connection ended before the PROXY header did")

    def expired(self) -> HeaderOutcome:
        """`header_timeout` passed before the header was complete."""
        if self.buffer and self._plain(final=True):
            return HeaderDone(None, bytes(self.buffer))
        return HeaderRefused(
            f"no complete PROXY header within {self.timeout:g}s ({len(self.buffer)} bytes received)"
        )

    def _plain(self, *, final: bool) -> bool:
        """Mixed mode only: do these first bytes belong to a client that sent no header?
        `final` (EOF or timeout): a short prefix that could still have become a header is data."""
        if not self.mixed:
            return False
        starts = classify_prefix(self.buffer)
        return starts is False or (final and starts is None)


def relay_header(version: int, source: Address | None, destination: Address | None) -> bytes:
    """The PROXY header (v1 or v2) that tells a target who the client is."""
    try:
        if version == 1:
            return build_v1(source, destination)
        return build_v2(source, destination)
    except ValueError:
        # An address the header cannot carry (e.g. with a zone index): say "unknown" rather than
        # fail the connection; the target then uses our own address.
        return build_v1(None, None) if version == 1 else build_v2(None, None)


def _unmap_net(net: IPNetwork) -> IPNetwork:
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(mapped):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


class AccessControl:
    """An ACL as streams use it: `admit` decides for a client address and logs the outcome.

    Streams call `attach` when they start serving and `detach` when they stop; the first attach
    starts the task that flushes denial summaries, the last detach stops it and flushes the rest.
    """

    def __init__(self, acl: Acl, logger: logging.Logger, *, log_allowed: bool = False) -> None:
        self.acl = acl
        self.log = logger
        self.log_allowed = log_allowed
        self.denials = DenyLog(DENY_LOG_INTERVAL)
        self._users = 0
        self._drainer: asyncio.Task[None] | None = None

    def admit(self, host: str, route: str) -> bool:
        """Whether `host` may connect to `route`; a lookup error (corrupt GeoIP data) denies."""
        try:
            decision = self.acl.decide(host)
        except Exception as exc:
            allowed, reason = False, f"ACL error: {exc!r}"
        else:
            allowed, reason = decision.allowed, decision.reason
        if allowed:
            if self.log_allowed and self.log.isEnabledFor(logging.INFO):
                self.log.info(
                    f"allowed {host} ({reason})", extra={"route": route, "action": "allow", "client": host}
                )
            return True
        line = self.denials.record(host, reason)
        if line is not None:
            self.log.info(line, extra={"route": route, "action": "deny", "client": host})
        return False

    def attach(self) -> None:
        self._users += 1
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain_periodically())

    def detach(self) -> None:
        self._users -= 1
        if self._users <= 0 and self._drainer is not None:
            self._users = 0
            self._drainer.cancel()
            self._drainer = None
            self._flush(force=True)

    async def _drain_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.denials.interval)
            self._flush()

    def _flush(self, *, force: bool = False) -> None:
        for line in self.denials.drain(force=force):
            self.log.info(line, extra={"action": "deny"})


class AdmissionFactory:
    """Builds the admission objects of a config's routes, sharing what can be shared.

    Everything that touches the file system (GeoIP databases, ACL log files) happens here, at
    startup, so a missing file stops the start with a message naming it rather than surfacing
    on the first connection.
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config
        self._geo: dict[str, GeoIpDatabase] = {}
        self._files: dict[str, logging.Handler] = {}
        self._global: AccessControl | None = None

    def access_control(self, name: str, route: RouteConfig) -> AccessControl | None:
        """The route's own ACL, else the global one (shared), else None (everyone admitted)."""
        if route.acl is not None:
            try:
                return self._build(route.acl, f"route.{name}")
            except ConfigError as exc:
                raise exc.located(route=name, field="acl") from None
        global_acl = self.config.acl if self.config is not None else None
        if global_acl is None:
            return None
        if self._global is None:
            try:
                self._global = self._build(global_acl, "global")
            except ConfigError as exc:
                raise exc.located(field="acl") from None
        return self._global

    def proxy_protocol(self, route: RouteConfig) -> ProxyProtocolPolicy | None:
        """The route's PROXY protocol receiving policy, else the entrypoint's (TCP only)."""
        if route.proxy_protocol is not None:
            return ProxyProtocolPolicy.from_config(route.proxy_protocol)
        if self.config is None:
            return None
        return ProxyProtocolPolicy.from_config(self.config.entrypoint.proxy_protocol)

    def _build(self, config: AclConfig, label: str) -> AccessControl:
        geo = None
        if config.geoip is not None:
            path = config.geoip.database
            geo = self._geo.get(path)
            if geo is None:
                geo = self._geo[path] = GeoIpDatabase(path)
        acl = Acl(
            default=config.default,
            allow_local=config.allow_local,
            allow=config.allow,
            deny=config.deny,
            geo=geo,
        )
        return AccessControl(acl, self._logger(config, label), log_allowed=config.log.log_allowed)

    def _logger(self, config: AclConfig, label: str) -> logging.Logger:
        # One logger per ACL so each can have its own destinations; with none configured it
        # propagates to portway's main log.
        logger = logging.getLogger(f"portway.acl.{label}")
        handlers: list[logging.Handler] = []
        if config.log.path is not None:
            handlers.append(self._file_handler(config.log.path))
        if config.log.stdout:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(ConsoleFormatter())
            handlers.append(handler)
        logger.handlers[:] = handlers
        logger.propagate = not handlers
        if handlers and logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        return logger

    def _file_handler(self, path: str) -> logging.Handler:
        handler = self._files.get(path)
        if handler is None:
            try:
                handler = logging.FileHandler(path, encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"ACL log file {path!r} cannot be opened: {exc.strerror or exc}") from None
            handler.setFormatter(ConsoleFormatter())
            self._files[path] = handler
        return handler

    def close(self) -> None:
        """Close GeoIP databases and log files (after every stream using them has stopped)."""
        for geo in self._geo.values():
            with contextlib.suppress(Exception):
                geo.close()
        for handler in self._files.values():
            handler.close()
        self._geo.clear()
        self._files.clear()
