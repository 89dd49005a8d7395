"""Loopback targets and clients for the pool tests: targets that say who they are.

A pool test needs to know which target served each client. These targets greet every connection
(TCP) or prefix every reply (UDP) with their name, so a client learns where the balancer sent it
without any bookkeeping inside portway; they also count what they accepted, on the target side.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import textwrap
from collections.abc import AsyncIterator
from typing import Any, cast

from portway.config.load import load_config_text
from portway.server import Server

#: Every greeting starts with this: a health check can `expect` it from any target.
GREETING = "hello"


class _Greeter(asyncio.Protocol):
    def __init__(self, owner: NamedTarget) -> None:
        self.owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        owner = self.owner
        owner.accepted += 1
        owner.live.add(self)
        #: A hung target accepts and then never says a word, whatever it is sent.
        self.hung = owner.hung
        if not self.hung:
            self.transport.write(f"{GREETING} {owner.name}\n".encode())

    def data_received(self, data: bytes) -> None:
        if not self.hung:
            self.transport.write(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.live.discard(self)


class NamedTarget:
    """A TCP target that greets each connection with ``hello NAME\\n``, then echoes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.accepted = 0
        self.hung = False
        self.live: set[_Greeter] = set()
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> NamedTarget:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Greeter(self), "127.0.0.1", port, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Dies: the port refuses new connections and live ones are reset."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for greeter in list(self.live):
            greeter.transport.abort()


class _NamedDatagrams(asyncio.DatagramProtocol):
    def __init__(self, owner: NamedUDPTarget) -> None:
        self.owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        owner = self.owner
        owner.received += 1
        owner.sources.add(addr[:2])
        if owner.reply:
            self.transport.sendto(owner.name.encode() + b":" + data, addr)


class NamedUDPTarget:
    """A UDP target that answers each datagram with ``NAME:`` + the datagram (unless silent)."""

    def __init__(self, name: str, reply: bool = True) -> None:
        self.name = name
        self.reply = reply
        self.received = 0
        self.sources: set[Any] = set()
        self.port = 0
        self.transport: asyncio.DatagramTransport | None = None

    async def start(self) -> NamedUDPTarget:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        self.transport, _ = await loop.create_datagram_endpoint(lambda: _NamedDatagrams(self), sock=sock)
        self.port = sock.getsockname()[1]
        return self

    async def stop(self) -> None:
        """Closes the socket: datagrams to the port now draw ICMP port unreachable."""
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        await asyncio.sleep(0)  # the close callback releases the port


def dead_port() -> int:
    """A loopback port nothing listens on (bound once, then released): dials to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def member(port: int, weight: int = 1, backup: bool = False) -> str:
    """One `targets:` entry as a YAML flow mapping."""
    return f"{{host: 127.0.0.1, port: {port}, weight: {weight}, backup: {str(backup).lower()}}}"


def pool_yaml(*members: str, scheme: str = "tcp4", route: str = "", top: str = "") -> str:
    """A config with one route `pool` on an ephemeral loopback port over `members`.

    `route` holds more route fields (YAML, unindented), `top` more top-level settings.
    """
    lines = [
        *textwrap.dedent(top).strip().splitlines(),
        "routes:",
        "  pool:",
        f"    scheme: {scheme}",
        "    bind: 127.0.0.1",
        '    port: "0:9"',
        "    targets:",
        *(f"      - {m}" for m in members),
        *("    " + line for line in textwrap.dedent(route).strip().splitlines()),
    ]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def running(text: str) -> AsyncIterator[Server]:
    """portway serving the config in `text`, in this process, stopped afterwards."""
    server = Server(load_config_text(text, "pools.yml"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def listen_addr(server: Server, name: str = "pool") -> tuple[str, int]:
    addr = server.streams[name].local_addr
    assert addr is not None
    return addr[0], addr[1]


class Refused(Exception):
    """portway closed the connection before any target spoke."""


async def open_greeted(
    addr: tuple[str, int], source: str | None = None, timeout: float = 5.0
) -> tuple[socket.socket, str]:
    """Connect through portway (from `source`) and read the greeting: (open socket, target name).

    Raises Refused if portway closes the connection first (a limit, no target up).
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        if source is not None:
            sock.bind((source, 0))
        await loop.sock_connect(sock, addr)
        data = b""
        async with asyncio.timeout(timeout):
            while not data.endswith(b"\n"):
                try:
                    chunk = await loop.sock_recv(sock, 256)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    raise Refused(f"closed after {data!r}")
                data += chunk
    except BaseException:
        sock.close()
        raise
    greeting, name = data.decode().split()
    assert greeting == GREETING
    return sock, name


async def greeted_by(addr: tuple[str, int], source: str | None = None) -> str:
    """The name of the target that served one short connection (closed at once with a reset,
    so thousands of them leave no TIME_WAIT behind)."""
    sock, name = await open_greeted(addr, source)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    return name


async def refused(addr: tuple[str, int], source: str | None = None, timeout: float = 2.0) -> bool:
    """True if portway closes this connection at once (well within `timeout`) without a target."""
    try:
        sock, _ = await open_greeted(addr, source, timeout)
    except Refused:
        return True
    sock.close()
    return False


async def echo(sock: socket.socket, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a greeted connection and read it back (b"" if the connection closed)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, data)
    got = b""
    async with asyncio.timeout(timeout):
        while len(got) < len(data):
            try:
                chunk = await loop.sock_recv(sock, len(data) - len(got))
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
    return got


class Blackhole:
    """A loopback port whose accept queue is full: the kernel drops further SYNs, so a dial to it
    hangs until the dialer's own timeout (what a dead host looks like), without leaving loopback."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)  # room for one connection, never accepted
        self.port: int = self.listener.getsockname()[1]
        self.fillers = []
        for _ in range(2):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)

    def close(self) -> None:
        for sock in (*self.fillers, self.listener):
            sock.close()
