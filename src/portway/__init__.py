"""portway: a small, fast, safe TCP/UDP stream proxy."""

from __future__ import annotations

__version__ = "0.1.0"

from portway.errors import BindError, ConfigError, PortwayError, ProxyProtocolError, ResolveError
from portway.stream import Hook, HookContext, Stream, StreamDescription, TCPStream, UDPStream

__all__ = [
    "BindError",
    "ConfigError",
    "Hook",
    "HookContext",
    "PortwayError",
    "ProxyProtocolError",
    "ResolveError",
    "Stream",
    "StreamDescription",
    "TCPStream",
    "UDPStream",
    "__version__",
]
