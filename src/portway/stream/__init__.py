"""The data plane: TCP and UDP streams and what they share."""

from __future__ import annotations

from portway.stream.base import Hook, HookContext, Stream, StreamDescription
from portway.stream.tcp import TCPStream
from portway.stream.udp import UDPStream

__all__ = ["Hook", "HookContext", "Stream", "StreamDescription", "TCPStream", "UDPStream"]
