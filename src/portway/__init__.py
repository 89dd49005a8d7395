"""portway: a small, fast, safe TCP/UDP stream proxy."""

from __future__ import annotations

from portway.errors import BindError, ConfigError, PortwayError, ProxyProtocolError, ResolveError

__version__ = "0.1.0"

__all__ = [
    "BindError",
    "ConfigError",
    "PortwayError",
    "ProxyProtocolError",
    "ResolveError",
    "__version__",
]
