"""The configuration schema: what a route is, its defaults, and the cross-route rules.

Every value arrives as the string the user wrote (see ``yamlload``); the models decide what it
means. Validation errors carry the path of the offending value so ``load`` can name the file,
line, route and field in one line.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from portway.acl import needs_geoip, parse_rule
from portway.addr import (
    Network,
    PortSpec,
    family_of,
    ip_family,
    is_udp,
    lookup_service,
    parse_network,
    parse_port_spec,
)
from portway.config.durations import parse_duration
from portway.config.pools import HealthCheckConfig, LoadBalanceConfig, PerClientConfig, TargetConfig
from portway.config.tls import MatchConfig, TLSConfig


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    return value


Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _rule(value: Any) -> Any:
    if isinstance(value, str):
        parse_rule(value)  # raises ValueError quoting the rule
        return value.strip()
    raise ValueError("an ACL rule is written kind:value, e.g. cidr:10.0.0.0/8")


AclRule = Annotated[str, BeforeValidator(_rule)]


def _network(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("a trusted proxy is an address or network, e.g. 10.0.0.0/8")
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or network") from None
    return value.strip()


IPNetworkText = Annotated[str, BeforeValidator(_network)]


class GeoIPConfig(_Model):
    database: str


class AclLogConfig(_Model):
    path: str | None = None
    stdout: bool = False
    log_allowed: bool = False


class AclConfig(_Model):
    """Who may connect (GoDoxy-compatible; an explicit deny beats allow_local here)."""

    default: Literal["allow", "deny"] = "allow"
    allow_local: bool = True
    allow: list[AclRule] = Field(default_factory=list)
    deny: list[AclRule] = Field(default_factory=list)
    geoip: GeoIPConfig | None = None
    log: AclLogConfig = Field(default_factory=AclLogConfig)

    @field_validator("default", mode="before")
    @classmethod
    def _default(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _geoip_needed(self) -> AclConfig:
        if needs_geoip(parse_rule(r) for r in (*self.allow, *self.deny)) and self.geoip is None:
            raise ValueError("country: and tz: rules need geoip.database (a MaxMind .mmdb file)")
        return self


class ProxyProtocolConfig(_Model):
    """Receiving the PROXY protocol on TCP listeners."""

    mode: Literal["required", "mixed", "disabled"] = "disabled"
    trusted_proxies: list[IPNetworkText] = Field(default_factory=list)
    #: A peer that has not completed its header by then is closed: bounds slowloris-style holds.
    header_timeout: Duration = 5.0

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


class EntrypointConfig(_Model):
    proxy_protocol: ProxyProtocolConfig = Field(default_factory=ProxyProtocolConfig)


class RouteConfig(_Model):
    """One stream route: a listener and the target it forwards to (GoDoxy's stream route fields)."""

    scheme: Network = "tcp"
    host: str = "localhost"
    bind: str | None = None
    port: PortSpec
    #: TCP: give up dialing the target after this long; the client is closed and the reason logged.
    connect_timeout: Duration = 5.0
    #: TCP: close a connection with no traffic in either direction for this long; 0 = never.
    idle_timeout: Duration = 0.0
    #: TCP: after one side's FIN, relay the other way until it ends too (as HAProxy does);
    #: false ends the connection at the first FIN once its bytes are through (nginx's default):
    #: a wake-up fewer per short connection, but a client that half-closes and then waits for
    #: the answer (`nc -N`, some backup and file-transfer tools) gets nothing back.
    half_close: bool = True
    #: UDP: forget a client session after this long without a datagram in either direction.
    udp_idle_timeout: Duration = 300.0
    #: UDP: refuse new clients past this many live sessions (each holds a socket) rather than grow.
    udp_max_sessions: int = Field(default=10_000, ge=1)
    #: How often the target name is resolved again (also after a failed dial); 0 = only on failure.
    resolve_interval: Duration = 60.0
    #: Replaces the global ACL for this route.
    acl: AclConfig | None = None
    #: Replaces the entrypoint's PROXY protocol settings for this route (TCP only).
    proxy_protocol: ProxyProtocolConfig | None = None
    #: Send a PROXY header to the target before any client byte (UDP: on every datagram).
    relay_proxy_protocol_header: bool = False
    proxy_protocol_version: int = 2
    #: A pool of targets instead of `host` (which stays, for one target).
    targets: list[TargetConfig] | None = None
    load_balance: LoadBalanceConfig = Field(default_factory=LoadBalanceConfig)
    #: Active health checks; without this block only passive ejection (failed dials) applies.
    healthcheck: HealthCheckConfig | None = None
    #: Live connections (TCP) or sessions (UDP) of this route, per worker; past it new clients are refused.
    max_connections: int | None = Field(default=None, ge=1)
    per_client: PerClientConfig = Field(default_factory=PerClientConfig)
    #: Shared ports: which connections of a listener shared with other routes this route takes.
    match: MatchConfig | None = None
    #: Shared ports: how long to wait for the client's first bytes (every route of a listener agrees).
    peek_timeout: Annotated[float, BeforeValidator(_duration), Field(gt=0)] = 3.0
    #: Terminate TLS here (TCP only); the target gets plaintext unless `tls.relay`.
    tls: TLSConfig | None = None

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[TargetConfig] | None, info: ValidationInfo) -> list[TargetConfig] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("a pool needs at least one target")
        scheme = info.data.get("scheme")
        seen: set[tuple[str, int | None]] = set()
        for target in value:
            fam = ip_family(target.host)
            if scheme is not None and fam is not None:
                pinned = family_of(scheme)
                if pinned not in (socket.AF_UNSPEC, fam):
                    raise ValueError(
                        f"{target.host} is not an {_family_name(pinned)} address, which {scheme} pins"
                    )
            key = (target.host.lower(), target.port)
            if key in seen:
                raise ValueError(f"target {target.host} is listed twice")
            seen.add(key)
        if not any(t.weight > 0 for t in value):
            raise ValueError("every target has weight 0: the pool could never serve")
        return value

    @model_validator(mode="after")
    def _host_or_targets(self) -> RouteConfig:
        if self.targets is not None and "host" in self.model_fields_set:
            raise ValueError("give `host` (one target) or `targets` (a pool), not both")
        if is_udp(self.scheme) and not self.half_close:
            raise ValueError("half_close is TCP only: a UDP route has no FIN to act on")
        if is_udp(self.scheme) and self.tls is not None:
            raise ValueError("tls: terminates TLS over TCP; a UDP route cannot have it")
        if is_udp(self.scheme) and self.match is not None and (self.match.protocol or self.match.http_host):
            field = "protocol" if self.match.protocol else "http_host"
            raise ValueError(
                f"match.{field} is TCP only: a UDP route matches the SNI and ALPN of a QUIC Initial "
                "(match.sni, match.alpn), or is the fallback (match: {})"
            )
        if self.shares_listener and self.port.listening == 0:
            what = "match:" if self.match is not None else "tls:"
            raise ValueError(f"{what} needs a fixed listening port (it runs on a shared listener), not 0")
        return self

    @property
    def shares_listener(self) -> bool:
        """Whether this route runs behind a shared listener (it has a match or terminates TLS)."""
        return self.match is not None or self.tls is not None

    def pool(self) -> list[TargetConfig]:
        """The targets, with `host` as a pool of one and every port filled in."""
        written = self.targets if self.targets is not None else [TargetConfig(host=self.host)]
        return [t if t.port is not None else t.model_copy(update={"port": self.port.target}) for t in written]

    @field_validator("proxy_protocol_version")
    @classmethod
    def _pp_version(cls, value: int, info: ValidationInfo) -> int:
        if value not in (1, 2):
            raise ValueError("proxy_protocol_version must be 1 or 2")
        scheme = info.data.get("scheme")
        relays = info.data.get("relay_proxy_protocol_header")
        if value == 1 and relays and scheme is not None and is_udp(scheme):
            raise ValueError("PROXY protocol v1 has no datagram form; UDP routes relay v2 headers")
        return value

    @field_validator("proxy_protocol")
    @classmethod
    def _pp_receive_tcp_only(cls, value: ProxyProtocolConfig | None, info: ValidationInfo) -> Any:
        scheme = info.data.get("scheme")
        if value is not None and value.mode != "disabled" and scheme is not None and is_udp(scheme):
            raise ValueError("receiving the PROXY protocol is TCP only (a UDP route may only relay it)")
        return value

    @field_validator("scheme", mode="before")
    @classmethod
    def _scheme(cls, value: Any) -> Any:
        return parse_network(value) if isinstance(value, str) else value

    @field_validator("host", mode="before")
    @classmethod
    def _host(cls, value: Any) -> Any:
        if value is None or value == "":
            return "localhost"
        return value

    @field_validator("host")
    @classmethod
    def _host_family(cls, value: str, info: ValidationInfo) -> str:
        _refuse_port_in_host(value)
        value = value.strip("[]")
        scheme = info.data.get("scheme")
        fam = ip_family(value)
        if scheme is not None and fam is not None:
            pinned = family_of(scheme)
            if pinned not in (socket.AF_UNSPEC, fam):
                raise ValueError(f"{value} is not an {_family_name(pinned)} address, which {scheme} pins")
        return value

    @field_validator("bind", mode="before")
    @classmethod
    def _bind_empty(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        value = value.strip("[]")
        fam = ip_family(value)
        if fam is None:
            raise ValueError(f"bind {value!r} is not an IP address")
        scheme = info.data.get("scheme")
        if scheme is not None:
            pinned = family_of(scheme)
            if pinned not in (socket.AF_UNSPEC, fam):
                raise ValueError(f"{value} is not an {_family_name(pinned)} address, which {scheme} pins")
        return value

    @field_validator("port", mode="before")
    @classmethod
    def _port(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, PortSpec):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError("port must be written as [listening:]target, e.g. 2222:22")
        scheme = info.data.get("scheme", "tcp")
        return parse_port_spec(value, "udp" if is_udp(scheme) else "tcp", lookup_service)

    def listen_host(self) -> str:
        """The bind address, defaulting to every address of the scheme's family."""
        if self.bind is not None:
            return self.bind
        fam = family_of(self.scheme)
        return "0.0.0.0" if fam == socket.AF_INET else "::"


def _refuse_port_in_host(value: str) -> None:
    """``host: 127.0.0.1:22`` is the most common slip; caught here, not as a traceback at bind time."""
    if value.startswith("["):
        inner, sep, rest = value[1:].partition("]")
        host, port = (inner, rest[1:]) if sep and rest.startswith(":") else ("", "")
    elif ip_family(value) is None:
        host, _, port = value.rpartition(":")
    else:
        return  # an IPv6 literal: its colons are not a port
    if host and port:
        raise ValueError(
            f"{value!r} includes a port: write host: {host} and put the port ({port}) in `port:`"
        )


def _family_name(family: int) -> str:
    return "IPv4" if family == socket.AF_INET else "IPv6"


class ProvidersConfig(_Model):
    """Where routes come from besides `routes:` (GoDoxy-compatible)."""

    #: Files of `alias: route` maps, relative to the main file.
    include: list[str] = Field(default_factory=list)
    #: name -> Docker host URL; a trailing "!" on the name means explicit-only (needs proxy.aliases).
    docker: dict[str, str] = Field(default_factory=dict)
    #: Routes from an etcd v3 cluster, one key per route under `prefix` (see providers/etcd.py).
    etcd: EtcdConfig | None = None
    #: Routes from a Redis server, one key per route under `prefix` (see providers/redis.py).
    redis: RedisConfig | None = None


def _workers(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if value is None:
        raise ValueError("workers is a number of processes, or `auto` for one worker per CPU")
    if isinstance(value, str | int) and str(value).strip() == "0":
        # 0 once meant "one per CPU"; a silent fork bomb on a big machine is worse than an error.
        raise ValueError("0 workers would serve nothing: use `auto` for one worker per CPU")
    return value


class Config(_Model):
    """The whole file."""

    routes: dict[str, RouteConfig] = Field(default_factory=dict)
    acl: AclConfig | None = None
    entrypoint: EntrypointConfig = Field(default_factory=EntrypointConfig)
    providers: ProvidersConfig = Field(default_factory=ProvidersConfig)
    #: Worker processes sharing each listener (SO_REUSEPORT); "auto" (stored as None) = one per CPU.
    workers: Annotated[Annotated[int, Field(ge=1, le=256)] | None, BeforeValidator(_workers)] = 1
    #: How long removed or changed routes let live connections finish on reload or shutdown.
    grace_period: Duration = 10.0
    #: The admin HTTP listener (metrics, status API, status page); off when absent.
    admin: AdminConfig | None = None
    #: One line per finished connection or UDP session; off when absent.
    access_log: AccessLogConfig | None = None


Proto = Literal["tcp", "udp"]


def listen_key(route: RouteConfig) -> tuple[Proto, str, int]:
    return ("udp" if is_udp(route.scheme) else "tcp", route.listen_host(), route.port.listening)


def share_listener(a: RouteConfig, b: RouteConfig) -> bool:
    """Whether two routes may share one listener: the very same TCP or UDP address, told apart by
    `match` (at least one has one; whether the matches differ is `portway.matching.check_routes`'
    job). On UDP the match reads the QUIC Initial (`portway.stream.shared_udp`)."""
    return (
        listen_key(a) == listen_key(b)
        and a.scheme == b.scheme
        and a.port.listening != 0
        and (a.match is not None or b.match is not None)
    )


def shared_groups(routes: dict[str, RouteConfig]) -> dict[tuple[Proto, str, int], list[str]]:
    """The routes behind each shared listener, in config order: every TCP listen address where
    some route has a `match` or terminates TLS (a lone ``tls:`` route is a group of one), and every
    UDP listen address where some route has a `match` (QUIC SNI)."""
    groups: dict[tuple[Proto, str, int], list[str]] = {}
    for name, route in routes.items():
        if route.port.listening != 0:
            groups.setdefault(listen_key(route), []).append(name)
    return {key: names for key, names in groups.items() if any(routes[n].shares_listener for n in names)}


def listeners_overlap(a: RouteConfig, b: RouteConfig) -> bool:
    """Whether two routes would fight over one listening socket (same protocol and port)."""
    pa, ha, porta = listen_key(a)
    pb, hb, portb = listen_key(b)
    if pa != pb or porta != portb or porta == 0:
        return False
    link = a.load_balance.link
    if link is not None and link == b.load_balance.link:
        return False  # members of one link pool share its listener (config/links.py)
    return _covers(a, ha, hb) or _covers(b, hb, ha)


def _covers(route: RouteConfig, host: str, other: str) -> bool:
    """Does a listener on `host` (for `route`'s scheme) also receive traffic for `other`?"""
    ip = ipaddress.ip_address(host)
    oip = ipaddress.ip_address(other)
    if ip == oip:
        return True
    if not ip.is_unspecified:
        return False
    if ip.version == 4:
        return oip.version == 4
    # "::" with a pinned tcp6/udp6 scheme is IPv6-only; with plain tcp/udp it is dual-stack.
    return oip.version == 6 or family_of(route.scheme) == socket.AF_UNSPEC


# -- key-value store providers (issue 11); kept at the end so the file's earlier models stay untouched


def _prefix(value: Any) -> Any:
    if isinstance(value, str) and value.strip() and not value.strip().endswith("/"):
        raise ValueError(f"prefix {value.strip()!r} must end with '/', e.g. /portway/")
    return value


KeyPrefix = Annotated[str, BeforeValidator(_prefix), Field(min_length=1)]


def _etcd_endpoint(value: Any) -> Any:
    from urllib.parse import urlsplit

    if not isinstance(value, str):
        raise ValueError("an etcd endpoint is a URL, e.g. http://127.0.0.1:2379")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"etcd endpoint {value.strip()!r} must be http://host:port or https://host:port")
    try:
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError:
        raise ValueError(f"etcd endpoint {value.strip()!r} has a bad port") from None
    return value.strip().rstrip("/")


class EtcdConfig(_Model):
    """An etcd v3 cluster; every endpoint is used, so losing one member loses nothing."""

    endpoints: list[Annotated[str, BeforeValidator(_etcd_endpoint)]] = Field(min_length=1)
    prefix: KeyPrefix = "/portway/"
    username: str | None = None
    #: A file holding the password (secrets stay out of the config file and its backups).
    password_file: str | None = None
    #: Client TLS: the CA that signed the members' certificates, and our certificate and key.
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _pairs(self) -> EtcdConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together (the client certificate and its private key)")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        if self.username is not None and self.cert is not None:
            # etcd's JSON gateway answers 400 to a request with a client certificate once auth is on.
            raise ValueError(
                "use either username/password_file or a client certificate (cert, key), not both: "
                "etcd's HTTP gateway refuses client certificates when authentication is enabled"
            )
        return self


def _redis_url(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip().startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("url must be redis://host:port/db, rediss://... (TLS) or unix:///path")
    return value.strip()


class RedisConfig(_Model):
    """A Redis server; keyspace notifications where allowed, and a periodic full re-read."""

    url: Annotated[str, BeforeValidator(_redis_url)]
    prefix: KeyPrefix = "portway/"
    password_file: str | None = None
    #: The safety net: notifications are fire-and-forget, so everything is re-read this often.
    poll_interval: Annotated[float, BeforeValidator(_duration), Field(gt=0)] = 5.0


ProvidersConfig.model_rebuild()


# -- observability (issue 10): the admin listener and the access log


class AdminConfig(_Model):
    """``admin:``: where ``/metrics``, ``/api/status`` and the status page are served."""

    # Declared before `listen` so its validator sees them (the order in the YAML does not matter).
    #: A file holding the bearer token every request must carry (except /metrics when public).
    token_file: str | None = None
    metrics_public: bool = False
    #: Serve on a non-loopback address without a token (e.g. inside a container network).
    allow_insecure: bool = False
    listen: str

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str, info: ValidationInfo) -> str:
        from portway.addr import parse_hostport

        hp = parse_hostport(value)  # raises ValueError quoting the address
        host = hp.host.strip("[]")
        if host and host != "localhost" and ip_family(host) is None:
            raise ValueError(f"{host!r} is not an IP address (or localhost)")
        loopback = host == "localhost" or (bool(host) and ipaddress.ip_address(host).is_loopback)
        if not loopback and not info.data.get("token_file") and not info.data.get("allow_insecure"):
            raise ValueError(
                f"{value} is not a loopback address: set admin.token_file, or admin.allow_insecure: true "
                "to serve metrics and status to anyone who can reach it"
            )
        return value


class AccessLogConfig(_Model):
    """``access_log:``: a file (or "-" for stdout) and its line format."""

    path: str
    format: Literal["json", "text"] = "json"

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value:
            raise ValueError('is empty: give a file, or "-" for stdout')
        return value


Config.model_rebuild()
