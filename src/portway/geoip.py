"""Country and time zone of an IP address, from a MaxMind database (GeoLite2-City or -Country).

Only ACL rules of the form ``country:XX`` and ``tz:Area/City`` need this, so the database is
opened only when such a rule exists (see `portway.acl.Acl.needs_geoip`). Opening happens once,
at startup or reload, and a missing or unreadable file is a `ConfigError` naming the path
then, never a surprise on the first connection.

The file is memory-mapped (maxminddb's default), so several worker processes share one copy
of its pages, and a lookup does no I/O beyond page faults.

`GeoLookup` is the seam the ACL depends on; tests and other sources can provide their own.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from portway.errors import ConfigError

__all__ = ["GeoInfo", "GeoIpDatabase", "GeoLookup"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class GeoInfo:
    """Where an address is: ISO 3166 country code (upper case) and IANA time zone, if known."""

    country: str | None = None
    time_zone: str | None = None


UNKNOWN = GeoInfo()


class GeoLookup(Protocol):
    """Anything that can place an IP address; `GeoIpDatabase` is the real one."""

    def lookup(self, address: IPAddress) -> GeoInfo: ...


class GeoIpDatabase:
    """A MaxMind .mmdb file opened once; `lookup` is safe to call on every new connection."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        # Imported here: only a config with country:/tz: rules pays for the reader at all.
        import maxminddb

        try:
            self._reader = maxminddb.open_database(self.path)
        except FileNotFoundError:
            raise ConfigError(f"GeoIP database {self.path!r} does not exist") from None
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            # InvalidDatabaseError subclasses RuntimeError; ValueError covers empty files.
            raise ConfigError(f"GeoIP database {self.path!r} cannot be read: {exc}") from None
        self._ipv4_only = self._reader.metadata().ip_version == 4

    def lookup(self, address: IPAddress) -> GeoInfo:
        """Return the country and time zone of `address`; fields are None when not recorded.

        Accepts both the City layout (country.iso_code, location.time_zone) and the Country
        layout (no location). Fields of an unexpected type are treated as absent rather than
        trusted, since the file is external input.
        """
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # Dual-stack listeners report IPv4 peers as ::ffff:a.b.c.d; not every database
            # aliases that range to its IPv4 tree.
            address = address.ipv4_mapped
        if self._ipv4_only and address.version == 6:
            return UNKNOWN
        record: Any = self._reader.get(address)
        if not isinstance(record, dict):
            return UNKNOWN
        country = _field(record, "country", "iso_code")
        return GeoInfo(
            country=country.upper() if country is not None else None,
            time_zone=_field(record, "location", "time_zone"),
        )

    def close(self) -> None:
        """Unmap the file; later lookups fail."""
        self._reader.close()

    def __enter__(self) -> GeoIpDatabase:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _field(record: dict[Any, Any], section: str, key: str) -> str | None:
    part = record.get(section)
    if not isinstance(part, dict):
        return None
    value = part.get(key)
    return value if isinstance(value, str) else None
