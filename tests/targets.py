"""Real loopback targets for the tests: echo servers that also record what they saw."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast


class _EchoProtocol(asyncio.Protocol):
    def __init__(self, owner: TCPEchoTarget) -> None:
        self.owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.owner.accepted += 1
        self.owner.peers.append(transport.get_extra_info("peername"))
        self.owner.live.add(self)
        self.owner.accepted_event.set()

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.live.discard(self)
        self.owner.closed += 1
        self.owner.closed_event.set()


class TCPEchoTarget:
    """Echoes every byte; counts connections; closes when the client is done sending."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.accepted = 0
        self.closed = 0
        self.peers: list[Any] = []
        self.live: set[_EchoProtocol] = set()
        self.accepted_event = asyncio.Event()
        self.closed_event = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _EchoProtocol(self), self.host, 0, backlog=1024)
        self.port: int = self.server.sockets[0].getsockname()[1]

    @property
    def addr(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def stop(self) -> None:
        self.server.close()
        for p in list(self.live):
            p.transport.abort()


class _UDPEchoProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UDPEchoTarget) -> None:
        self.owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner.sources.add(addr[:2])
        self.owner.received += 1
        if self.owner.reply:
            self.transport.sendto(data, addr)


class UDPEchoTarget:
    """Echoes each datagram to its sender; records the source addresses it saw."""

    def __init__(self, host: str = "127.0.0.1", reply: bool = True) -> None:
        self.host = host
        self.reply = reply
        self.sources: set[Any] = set()
        self.received = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((self.host, 0))
        self.transport, _ = await loop.create_datagram_endpoint(lambda: _UDPEchoProtocol(self), sock=sock)
        self.port: int = sock.getsockname()[1]

    @property
    def addr(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def stop(self) -> None:
        self.transport.close()


class UDPClient(asyncio.DatagramProtocol):
    """A connected UDP client socket with an awaitable inbox."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()

    @classmethod
    async def connect(cls, host: str, port: int, local: str | None = None) -> UDPClient:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        if local:
            sock.bind((local, 0))
        sock.connect((host, port))
        sock.setblocking(False)
        _, proto = await loop.create_datagram_endpoint(cls, sock=sock)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.inbox.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        pass

    def send(self, data: bytes) -> None:
        self.transport.sendto(data)

    async def recv(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    def close(self) -> None:
        self.transport.close()
