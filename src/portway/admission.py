"""Who may use a listener, and who the client really is: the glue between config and streams.

The pure parts live elsewhere (`portway.acl` decides, `portway.proxy_protocol` parses,
`portway.proxy_header` runs the header phase); this module turns the validated config into the
few objects a stream consults once per connection or UDP session, and is the only one of them
that imports the config schema and GeoIP, which the data plane never does:

- `policy_from_config`: whether a listener expects PROXY headers, from whom (trusted_proxies)
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

import contextlib
import ipaddress
import logging
import sys

from portway.access import AccessControl
from portway.acl import Acl
from portway.config.schema import AclConfig, Config, ProxyProtocolConfig, RouteConfig
from portway.errors import ConfigError
from portway.geoip import GeoIpDatabase
from portway.logs import ConsoleFormatter
from portway.proxy_header import ProxyProtocolPolicy, unmap_net

__all__ = ["AccessControl", "AdmissionFactory", "policy_from_config"]  # AccessControl: re-exported


def policy_from_config(config: ProxyProtocolConfig | None) -> ProxyProtocolPolicy | None:
    """The receiving policy a config block describes; ``mode: disabled`` is no policy at all."""
    if config is None or config.mode == "disabled":
        return None
    trusted = tuple(unmap_net(ipaddress.ip_network(n, strict=False)) for n in config.trusted_proxies)
    return ProxyProtocolPolicy(config.mode, trusted, config.header_timeout)


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
        return self.global_access_control()

    def global_access_control(self) -> AccessControl | None:
        """The global ACL (shared), or None: what a shared listener applies before choosing a route."""
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
            return policy_from_config(route.proxy_protocol)
        if self.config is None:
            return None
        return policy_from_config(self.config.entrypoint.proxy_protocol)

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
