"""Interop with real peers: HAProxy sends PROXY headers to portway, portway relays to nginx.

    client (127.0.0.4x) -> HAProxy send-proxy[-v2] -> portway (required, trusts 127.0.0.1)
        -> relay_proxy_protocol_header -> nginx stream `listen ... proxy_protocol`

nginx answers with ``$proxy_protocol_addr``, so the test reads back which client address
survived both hops. The peers run as subprocesses with configs in tmp_path and are always killed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from portway.access import AccessControl
from portway.acl import Acl
from portway.proxy_header import ProxyProtocolPolicy
from portway.stream import TCPStream
from tests.ports import free_port

HAPROXY = shutil.which("haproxy")
NGINX = shutil.which("nginx")
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

pytestmark = pytest.mark.skipif(
    HAPROXY is None or NGINX is None or not os.path.exists(STREAM_MODULE),
    reason="!!! INTEROP NOT TESTED: haproxy, nginx or libnginx-mod-stream is not installed "
    "(apt-get install haproxy nginx-light libnginx-mod-stream) !!!",
)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll by connecting until the peer accepts; fail with its log if it died instead."""
    for _ in range(200):
        if proc.poll() is not None:
            pytest.fail(f"peer exited with {proc.returncode}: {_text(log)}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.025)
            continue
        writer.close()
        return
    pytest.fail(f"peer never listened on {port}: {_text(log)}")


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(5)


class Nginx:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.access_log = tmp / "nginx-access.log"
        self.log = tmp / "nginx.log"
        conf = tmp / "nginx.conf"
        conf.write_text(
            f"""
load_module {STREAM_MODULE};
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {self.log} info;
events {{ worker_connections 64; }}
stream {{
    log_format pp 'proxy_protocol_addr=$proxy_protocol_addr:$proxy_protocol_port remote_addr=$remote_addr';
    access_log {self.access_log} pp;
    server {{
        listen 127.0.0.1:{self.port} proxy_protocol;
        return "$proxy_protocol_addr\\n";
    }}
}}
"""
        )
        self.argv = [str(NGINX), "-p", str(tmp), "-e", str(self.log), "-c", str(conf)]


@pytest.fixture
async def nginx(tmp_path: Path) -> AsyncIterator[Nginx]:
    peer = Nginx(tmp_path)
    proc = start(peer.argv, tmp_path / "nginx.out")
    try:
        await wait_listening(peer.port, proc, peer.log)
        yield peer
    finally:
        stop(proc)


@pytest.fixture
async def portway(nginx: Nginx) -> AsyncIterator[TCPStream]:
    trusted = ProxyProtocolPolicy("required", (ipaddress.ip_network("127.0.0.1"),), 2.0)
    acl = AccessControl(Acl(default="allow", deny=["ip:127.0.0.49"]), logging.getLogger("test.acl.interop"))
    stream = TCPStream(
        "tcp4",
        "127.0.0.1:0",
        f"127.0.0.1:{nginx.port}",
        name="interop",
        proxy_protocol=trusted,
        relay_proxy_protocol=2,
        access=acl,
    )
    await stream.listen_and_serve()
    yield stream
    await stream.close()


@pytest.fixture
async def haproxy(tmp_path: Path, portway: TCPStream) -> AsyncIterator[dict[str, int]]:
    assert portway.local_addr is not None
    ports = {"send-proxy": free_port(), "send-proxy-v2": free_port()}
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(
        "global\n    maxconn 64\n"
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 5s\n    timeout server 5s\n"
        + "".join(
            f"listen {option}\n    bind 127.0.0.1:{port}\n"
            f"    server s 127.0.0.1:{portway.local_addr[1]} {option}\n"
            for option, port in ports.items()
        )
    )
    log = tmp_path / "haproxy.out"
    proc = start([str(HAPROXY), "-db", "-f", str(conf)], log)
    try:
        for port in ports.values():
            await wait_listening(port, proc, log)
        yield ports
    finally:
        stop(proc)


async def ask(port: int, source: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        return await asyncio.wait_for(reader.read(-1), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("option", "client"), [("send-proxy", "127.0.0.41"), ("send-proxy-v2", "127.0.0.42")]
)
async def test_nginx_sees_the_client_behind_haproxy_and_portway(
    haproxy: dict[str, int], nginx: Nginx, option: str, client: str
) -> None:
    assert await ask(haproxy[option], client) == f"{client}\n".encode()
    # nginx's own log line, written when the session ends (readiness probes add lines of their
    # own): the client address came through both hops, while nginx's socket peer was portway.
    wanted = f"proxy_protocol_addr={client}:"
    lines: list[str] = []
    for _ in range(200):
        if nginx.access_log.exists():
            lines = [x for x in nginx.access_log.read_text().splitlines() if x.startswith(wanted)]
            if lines:
                break
        await asyncio.sleep(0.025)
    assert len(lines) == 1 and lines[0].endswith(" remote_addr=127.0.0.1"), lines


async def test_acl_behind_haproxy_judges_the_real_client(haproxy: dict[str, int]) -> None:
    assert await ask(haproxy["send-proxy-v2"], "127.0.0.49") == b""  # denied by portway's ACL
    assert await ask(haproxy["send-proxy-v2"], "127.0.0.48") == b"127.0.0.48\n"


async def test_direct_client_is_refused_in_required_mode(portway: TCPStream) -> None:
    assert portway.local_addr is not None
    assert await ask(portway.local_addr[1], "127.0.0.43") == b""
