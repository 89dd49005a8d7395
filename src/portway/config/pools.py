"""The schema of a route's pool: its targets, how one is chosen, health checks and limits.

Kept apart from ``schema.py`` because a pool is its own concept (listener -> route -> pool of
targets) and because every field here can change on a reload without touching the listener:
``reload.plan_reload`` compares routes with these fields set aside to decide that a pool can be
updated in place, which keeps every live connection.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from portway.addr import ip_family, parse_port_number
from portway.config.durations import parse_duration
from portway.probe import compile_expect_regex, parse_escapes

__all__ = [
    "MODES",
    "HealthCheckConfig",
    "LoadBalanceConfig",
    "PerClientConfig",
    "TargetConfig",
    "parse_rate",
    "parse_target",
]

Mode = Literal["roundrobin", "leastconn", "iphash", "random", "first"]
MODES: tuple[Mode, ...] = ("roundrobin", "leastconn", "iphash", "random", "first")


def _duration(value: Any) -> Any:
    return parse_duration(value) if isinstance(value, str) else value


Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0)]
PositiveDuration = Annotated[float, BeforeValidator(_duration), Field(gt=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def parse_target(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 literal -> (host, port or None)."""
    text = text.strip()
    if not text:
        raise ValueError("a target needs a host")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"malformed target {text!r} (expected [ipv6] or [ipv6]:port)")
        host, rest = text[1:end], text[end + 1 :]
        if ip_family(host) is None or ":" not in host:
            raise ValueError(f"malformed target {text!r}: {host!r} is not an IPv6 address")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"malformed target {text!r} (expected [ipv6]:port)")
        return host, parse_port_number(rest[1:], allow_zero=False)
    if text.count(":") > 1:
        if ip_family(text) is not None:
            return text, None  # a bare IPv6 literal, no port
        raise ValueError(f"malformed target {text!r}: write IPv6 addresses as [addr]:port")
    host, sep, port = text.partition(":")
    if not host:
        raise ValueError(f"malformed target {text!r}: the host is missing")
    return host, (parse_port_number(port, allow_zero=False) if sep else None)


class TargetConfig(_Model):
    """One pool member. Written as a string (``host``, ``host:port``) or as a mapping."""

    host: str
    #: None: the route's target port (the part after ``:`` in ``port:``).
    port: int | None = None
    #: Share of new connections; 0 drains the target (live connections stay, no new ones).
    weight: int = Field(default=1, ge=0, le=1000)
    #: Used only while no other target is healthy.
    backup: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            host, port = parse_target(value)
            return {"host": host, "port": port}
        if isinstance(value, dict) and isinstance(value.get("host"), str) and value.get("port") is None:
            host, port = parse_target(value["host"])
            if port is not None:
                return {**value, "host": host, "port": port}
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        value = value.strip("[]")
        if not value:
            raise ValueError("a target needs a host")
        return value

    @field_validator("port", mode="before")
    @classmethod
    def _port(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_port_number(value.strip(), allow_zero=False)
        return value

    @field_validator("port")
    @classmethod
    def _port_range(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 65535:
            raise ValueError(f"port {value} out of range 1-65535")
        return value


class LoadBalanceConfig(_Model):
    """How a target is chosen, and GoDoxy's ``link`` that joins routes into one pool."""

    mode: Mode = "roundrobin"
    #: Routes with the same link serve one listener and each contribute their target.
    link: str | None = None
    #: With ``link``: this route's target weight in the joined pool.
    weight: int | None = Field(default=None, ge=0, le=1000)

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        mode = value.strip().lower()
        if mode not in MODES:
            close = difflib.get_close_matches(mode, MODES, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown mode {value!r}{hint}; expected one of: {', '.join(MODES)}")
        return mode


class HealthCheckConfig(_Model):
    """Active checks (HAProxy's ``check``): only for routes that have this block."""

    # `send: "PING\r\n"` must keep its line ending: no whitespace stripping here.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    interval: PositiveDuration = 5.0
    timeout: PositiveDuration = 2.0
    rise: int = Field(default=2, ge=1, le=100)
    fall: int = Field(default=3, ge=1, le=100)
    #: TCP: bytes written after connect; UDP: the probe datagram. Escapes: see probe.parse_escapes.
    send: str | None = None
    #: The reply must start with these bytes.
    expect: str | None = None
    #: Or match this regular expression (over the first 4 KiB of the reply).
    expect_regex: str | None = None

    @field_validator("send", "expect")
    @classmethod
    def _escapes(cls, value: str | None) -> str | None:
        if value is not None:
            parse_escapes(value)
        return value

    @field_validator("expect_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            compile_expect_regex(value)
        return value

    @model_validator(mode="after")
    def _one_expectation(self) -> HealthCheckConfig:
        if self.expect is not None and self.expect_regex is not None:
            raise ValueError("give expect or expect_regex, not both")
        if self.timeout > self.interval:
            raise ValueError("timeout must not be longer than interval")
        return self

    def send_bytes(self) -> bytes:
        return parse_escapes(self.send) if self.send is not None else b""

    def expectation(self) -> bytes | re.Pattern[bytes] | None:
        if self.expect_regex is not None:
            return compile_expect_regex(self.expect_regex)
        return parse_escapes(self.expect) if self.expect is not None else None


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute)\s*$")


def parse_rate(text: str) -> float:
    """``50/s`` or ``600/m`` -> new connections per second."""
    m = _RATE.match(text)
    if m is None:
        raise ValueError(f"malformed rate {text!r} (expected N/s or N/m, e.g. 50/s)")
    per = float(m.group(1))
    if per <= 0:
        raise ValueError(f"rate {text!r} must be positive")
    return per if m.group(2).startswith("s") else per / 60.0


class PerClientConfig(_Model):
    """Limits per source address (the real client when the PROXY protocol is received)."""

    #: Concurrent connections (TCP) or sessions (UDP) per source address.
    max_connections: int | None = Field(default=None, ge=1)
    #: New connections per source address, as ``N/s``; a token bucket whose burst is N.
    rate: str | None = None

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    def rate_per_second(self) -> float | None:
        return parse_rate(self.rate) if self.rate is not None else None
