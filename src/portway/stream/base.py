"""What every stream (TCP or UDP) offers, and the context hooks receive.

A `Stream` is one listener forwarding to one target. The server starts routes through this
protocol and never needs to know which transport sits behind it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from portway.addr import format_hostport

Address = tuple[str, int]
#: Which side bytes came from, for `on_read` hooks.
Direction = Literal["client", "target"]


@dataclass(frozen=True, slots=True)
class HookContext:
    """What a hook knows about the connection or session it runs for."""

    route: str
    client: Address
    listen: Address
    target: str
    #: For `on_read`: which side the bytes came from, and the bytes themselves.
    direction: Direction | None = None
    data: bytes = b""


Hook = Callable[[HookContext], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class StreamDescription:
    """The fields every log line about a stream carries."""

    protocol: str
    listen: str
    dst: str

    def as_fields(self) -> dict[str, str]:
        return {"protocol": self.protocol, "listen": self.listen, "dst": self.dst}


class Stream(Protocol):
    """A listener that forwards everything it receives to one target."""

    @property
    def local_addr(self) -> Address | None:
        """The bound address (so port 0 tells which port was picked); None before binding."""

    def describe(self) -> StreamDescription: ...

    async def listen_and_serve(self, pre_dial: Hook | None = None, on_read: Hook | None = None) -> None:
        """Bind, start serving in the background, and return once listening."""

    async def close(self) -> None:
        """Stop accepting and close every live connection or session."""


def addr_str(addr: Address | None) -> str:
    if addr is None:
        return "-"
    return format_hostport(addr[0], addr[1])
