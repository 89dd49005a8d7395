"""UDP sessions across a reload: an unrelated option edit must not cut off game or VPN clients.

A changed UDP route that keeps its listening address hands its socket to the new stream: the old
sessions keep their target and settings and their replies keep leaving from the same address,
while new clients get the new settings. A removed UDP route serves its sessions for the grace
period (no new clients), like a removed TCP route's connections.
"""

from __future__ import annotations

import asyncio

from portway.config.schema import Config, RouteConfig
from portway.server import Server
from tests.ports import free_udp_port
from tests.targets import UDPEchoTarget


def udp_route(port: int, target: int, **fields: str) -> RouteConfig:
    return RouteConfig.model_validate(
        {"scheme": "udp4", "bind": "127.0.0.1", "port": f"{port}:{target}", **fields}
    )


class Client:
    """A UDP client with its own source port that waits for each echo (nothing may be lost)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self.replies

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                queue.put_nowait(data)

        self.transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=("127.0.0.1", self.port))

    async def roundtrip(self, data: bytes) -> bytes:
        self.transport.sendto(data)
        return await asyncio.wait_for(self.replies.get(), 2)

    def close(self) -> None:
        self.transport.close()


async def test_changed_udp_route_keeps_its_sessions_across_the_reload(udp_echo: UDPEchoTarget) -> None:
    port = free_udp_port()
    server = Server(Config(routes={"game": udp_route(port, udp_echo.port)}, grace_period=0.2))  # type: ignore[arg-type]
    await server.start()
    client = Client(port)
    await client.start()
    try:
        for i in range(20):
            assert await client.roundtrip(b"before %d" % i) == b"before %d" % i
        old = server.streams["game"]
        changed = Config(
            routes={"game": udp_route(port, udp_echo.port, udp_idle_timeout="2m")},  # type: ignore[dict-item]
            grace_period=0.2,  # type: ignore[arg-type]
        )
        # The client keeps sending while the reload runs: every datagram comes back.
        sending = asyncio.gather(*(client.roundtrip(b"during") for _ in range(5)))
        assert await server.apply(changed) == {}
        assert await sending == [b"during"] * 5
        new = server.streams["game"]
        assert new is not old and new.local_addr == old.local_addr
        for i in range(20):
            assert await client.roundtrip(b"after %d" % i) == b"after %d" % i
        assert len(udp_echo.sources) == 1  # one session throughout: the target saw one source
        assert len(old.sessions) == 1 and len(new.sessions) == 0  # it stayed on its old settings

        # A new client gets the new settings.
        fresh = Client(port)
        await fresh.start()
        assert await fresh.roundtrip(b"new") == b"new"
        assert len(new.sessions) == 1
        fresh.close()
    finally:
        client.close()
        await server.stop()


async def test_removed_udp_route_serves_its_sessions_for_the_grace_period(udp_echo: UDPEchoTarget) -> None:
    port = free_udp_port()
    server = Server(Config(routes={"vpn": udp_route(port, udp_echo.port)}, grace_period=30))  # type: ignore[arg-type]
    await server.start()
    client = Client(port)
    await client.start()
    try:
        assert await client.roundtrip(b"hello") == b"hello"
        old = server.streams["vpn"]
        assert await server.apply(Config(routes={}, grace_period=30)) == {}  # type: ignore[arg-type]
        assert "vpn" not in server.streams
        assert await client.roundtrip(b"still here") == b"still here"  # within the grace period
        stranger = Client(port)
        await stranger.start()
        stranger.transport.sendto(b"new client")
        with_reply = asyncio.ensure_future(stranger.replies.get())
        assert await client.roundtrip(b"still") == b"still"  # ordered after the stranger's datagram
        assert not with_reply.done() and len(old.sessions) == 1  # no session for a new client
        with_reply.cancel()
        stranger.close()
    finally:
        client.close()
        await server.stop(0.1)


async def test_udp_route_moved_to_another_name_keeps_the_sessions(udp_echo: UDPEchoTarget) -> None:
    port = free_udp_port()
    server = Server(Config(routes={"old-name": udp_route(port, udp_echo.port)}))
    await server.start()
    client = Client(port)
    await client.start()
    try:
        assert await client.roundtrip(b"one") == b"one"
        assert await server.apply(Config(routes={"new-name": udp_route(port, udp_echo.port)})) == {}
        assert list(server.streams) == ["new-name"]
        assert await client.roundtrip(b"two") == b"two"
        assert len(udp_echo.sources) == 1
    finally:
        client.close()
        await server.stop()
