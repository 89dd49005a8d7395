"""One exception hierarchy for everything a user can get wrong or the system can refuse.

Every message names where the problem came from (file, route, field, address), because the
CLI prints it as a single line and exits: there is no traceback to help the reader.
"""

from __future__ import annotations


class PortwayError(Exception):
    """Base of every error portway raises on purpose."""


class ConfigError(PortwayError):
    """A configuration value is wrong; carries its location so the message can name it."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        route: str | None = None,
        field: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.route = route
        self.field = field
        self.line = line
        self.column = column
        super().__init__(str(self))

    def located(self, **where: str | int | None) -> ConfigError:
        """Return a copy with missing location fields filled in from `where`."""
        fields = {k: getattr(self, k) for k in ("file", "route", "field", "line", "column")}
        for key, value in where.items():
            if fields.get(key) is None:
                fields[key] = value
        return ConfigError(self.message, **fields)

    def __str__(self) -> str:
        parts: list[str] = []
        if self.file is not None:
            loc = self.file
            if self.line is not None:
                loc += f":{self.line}"
                if self.column is not None:
                    loc += f":{self.column}"
            parts.append(loc)
        if self.route is not None:
            parts.append(f"route {self.route!r}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        prefix = ", ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class ResolveError(PortwayError):
    """A target host name does not resolve."""


class BindError(PortwayError):
    """A listener could not be bound (address in use, permission, no such address)."""


class ProxyProtocolError(PortwayError):
    """A PROXY protocol header is malformed, truncated, oversized or not allowed."""
