"""`portway demo`: echo targets on loopback and routes to them, so a newcomer sees bytes come back."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from portway.config.schema import Config, RouteConfig


class _TCPEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once the client is done sending


class _UDPEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


class EchoTargets:
    """A TCP and a UDP echo server on 127.0.0.1, on ports the OS picks."""

    async def start(self) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        self.tcp = await loop.create_server(_TCPEcho, "127.0.0.1", 0)
        self.udp, _ = await loop.create_datagram_endpoint(_UDPEcho, local_addr=("127.0.0.1", 0))
        tcp_port = self.tcp.sockets[0].getsockname()[1]
        udp_port = self.udp.get_extra_info("sockname")[1]
        return tcp_port, udp_port

    async def stop(self) -> None:
        self.tcp.close()
        self.udp.close()
        await self.tcp.wait_closed()


def demo_config(tcp_listen: int, udp_listen: int, tcp_target: int, udp_target: int) -> Config:
    return Config(
        routes={
            "demo-tcp": RouteConfig.model_validate(
                {
                    "scheme": "tcp4",
                    "host": "127.0.0.1",
                    "bind": "127.0.0.1",
                    "port": f"{tcp_listen}:{tcp_target}",
                }
            ),
            "demo-udp": RouteConfig.model_validate(
                {
                    "scheme": "udp4",
                    "host": "127.0.0.1",
                    "bind": "127.0.0.1",
                    "port": f"{udp_listen}:{udp_target}",
                }
            ),
        }
    )


def instructions(tcp_port: int, udp_port: int) -> str:
    return (
        "\nportway demo is running. In another terminal, type:\n\n"
        f"    echo hello over tcp | socat - TCP:127.0.0.1:{tcp_port}\n"
        f"    echo hello over udp | socat -t1 - UDP:127.0.0.1:{udp_port}\n\n"
        "(or with netcat: `nc 127.0.0.1 PORT` and `nc -u 127.0.0.1 PORT`, then type a line)\n"
        "Each line comes back through the proxy from an echo target. Ctrl-C stops the demo.\n"
    )
