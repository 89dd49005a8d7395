"""The ``match:`` and ``tls:`` blocks of a route (shared ports, TLS termination). Pure models.

Kept apart from ``schema.py`` so the shared-port feature reads as one unit; ``schema`` imports
these models into `RouteConfig`. The data plane never imports them: the server turns them into a
`portway.matching.Match` and a `portway.tlsfiles.ServerCertificates`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from portway.matching import Match

__all__ = ["CertificateConfig", "MatchConfig", "TLSConfig"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class MatchConfig(_Model):
    """Which connections of a shared listener this route takes (see docs/shared-ports.md)."""

    sni: list[str] = Field(default_factory=list)
    alpn: list[str] = Field(default_factory=list)
    protocol: Literal["tls", "ssh", "http"] | None = None
    http_host: list[str] = Field(default_factory=list)

    def describe(self) -> str:
        """``sni=a|b,alpn=h2,protocol=tls``: for `portway check` and the status API."""
        parts = [f"sni={'|'.join(self.sni)}"] if self.sni else []
        parts += [f"alpn={'|'.join(self.alpn)}"] if self.alpn else []
        parts += [f"http_host={'|'.join(self.http_host)}"] if self.http_host else []
        parts += [f"protocol={self.protocol}"] if self.protocol else []
        return ",".join(parts) or "fallback"

    @field_validator("sni", "alpn", "http_host", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _one_or_many(value)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    def to_match(self) -> Match:
        return Match(tuple(self.sni), tuple(self.alpn), self.protocol, tuple(self.http_host))


class CertificateConfig(_Model):
    """One PEM certificate chain and its private key."""

    cert: str
    key: str


class TLSConfig(_Model):
    """Terminate TLS on this route: the target gets plaintext (or, with `relay`, a new TLS session).

    Several certificates are allowed (`cert`/`key` plus `certificates:`); the one whose names
    cover the client's SNI is served, else the first. Files are read at start and on every
    reload (and when they change on disk); a bad file keeps the previous certificates serving.
    """

    cert: str | None = None
    key: str | None = None
    certificates: list[CertificateConfig] = Field(default_factory=list)
    #: Require a client certificate signed by this CA bundle (mTLS).
    client_ca: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"
    #: Re-encrypt towards the target (verified against `ca`, else the system trust store).
    relay: bool = False
    verify: bool = True
    ca: str | None = None

    @field_validator("min_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        return str(value).strip() if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _pairs(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together (the certificate chain and its private key)")
        if self.cert is None and not self.certificates:
            raise ValueError("give cert and key (or certificates: [{cert, key}, ...]) to terminate TLS")
        if not self.relay and (self.ca is not None or "verify" in self.model_fields_set):
            raise ValueError("ca and verify are about re-encrypting to the target: they need relay: true")
        if self.ca is not None and not self.verify:
            raise ValueError("ca with verify: false would never be used; drop one of them")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        """Every (cert, key) pair, the default first."""
        first = [(self.cert, self.key)] if self.cert is not None and self.key is not None else []
        return first + [(c.cert, c.key) for c in self.certificates]
