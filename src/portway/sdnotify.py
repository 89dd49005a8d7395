"""systemd readiness (``Type=notify``): ``READY=1``, ``RELOADING=1``, ``STOPPING=1`` to $NOTIFY_SOCKET.

The protocol is one datagram per state change to an AF_UNIX socket systemd names in the
environment; a name starting with ``@`` is in the abstract namespace (a leading NUL byte).
Written here rather than taken from a library because it is a dozen lines, and must never fail
the proxy: outside systemd (no $NOTIFY_SOCKET) every call does nothing, and a send error is
swallowed (readiness is advisory; systemd times out on its own if it never hears from us).

``RELOADING=1`` carries ``MONOTONIC_USEC`` (systemd >= 253 requires it to accept the message).
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["notify", "ready", "reloading", "stopping"]


def _address(name: str) -> str | bytes:
    return b"\0" + name[1:].encode() if name.startswith("@") else name


def notify(message: str) -> bool:
    """Send `message` (``KEY=value`` lines); True if it was sent, False outside systemd or on error."""
    name = os.environ.get("NOTIFY_SOCKET")
    if not name or not (name.startswith(("/", "@"))):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(name))
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")
