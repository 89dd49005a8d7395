"""ACLs on real TCP and UDP listeners: clients bind distinct 127.0.0.x sources to be told apart."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from portway.access import AccessControl
from portway.acl import Acl, DenyLog
from portway.config.load import load_config_text
from portway.errors import ConfigError
from portway.geoip import GeoIpDatabase
from portway.server import Server
from portway.stream import TCPStream, UDPStream
from tests.mmdb_factory import write_city_mmdb
from tests.targets import TCPEchoTarget, UDPClient, UDPEchoTarget

# Admission runs in each TCP engine: both must honour every rule.
pytestmark = pytest.mark.usefixtures("both_tcp_engines")


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def access(acl: Acl, *, log_allowed: bool = False) -> tuple[AccessControl, Lines]:
    lines = Lines()
    logger = logging.getLogger(f"test.acl.{id(lines)}")
    logger.handlers[:] = [lines]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return AccessControl(acl, logger, log_allowed=log_allowed), lines


async def tcp_roundtrip(stream: TCPStream, source: str, data: bytes = b"hi") -> bytes:
    """What comes back for `data` sent from `source`; b"" when the proxy closed the connection."""
    assert stream.local_addr is not None
    reader, writer = await asyncio.open_connection(*stream.local_addr, local_addr=(source, 0))
    try:
        writer.write(data)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(-1), 5)
    except OSError:  # reset: denied connections are aborted
        return b""
    finally:
        writer.close()


async def test_tcp_acl_from_several_sources(tcp_echo: TCPEchoTarget) -> None:
    control, lines = access(
        Acl(default="deny", allow=["cidr:127.0.0.0/28"], deny=["ip:127.0.0.6"]), log_allowed=True
    )
    stream = TCPStream("tcp4", "127.0.0.1:0", tcp_echo.addr, name="acl", access=control)
    await stream.listen_and_serve()
    try:
        assert await tcp_roundtrip(stream, "127.0.0.5") == b"hi"
        assert await tcp_roundtrip(stream, "127.0.0.6") == b""  # explicit deny beats the allow cidr
        assert await tcp_roundtrip(stream, "127.0.0.66") == b""  # default deny
        assert await tcp_roundtrip(stream, "127.0.0.66") == b""  # a repeat: counted, not logged
        assert await tcp_roundtrip(stream, "127.0.0.7") == b"hi"
        assert tcp_echo.accepted == 2  # denied connections never dialed
        assert lines.lines == [
            "allowed 127.0.0.5 (allow cidr:127.0.0.0/28)",
            "denied 127.0.0.6 (deny ip:127.0.0.6)",
            "denied 127.0.0.66 (default deny)",
            "allowed 127.0.0.7 (allow cidr:127.0.0.0/28)",
        ]
    finally:
        await stream.close()
    # Closing the last stream of an ACL flushes the aggregated repeats.
    assert "denied 127.0.0.66 x 2" in lines.lines[-1]


async def test_tcp_country_and_time_zone_rules(tmp_path: Path, tcp_echo: TCPEchoTarget) -> None:
    path = tmp_path / "city.mmdb"
    write_city_mmdb(path)
    with GeoIpDatabase(path) as geo:
        control, _ = access(
            Acl(default="deny", allow=["country:GB", "tz:Asia/Shanghai"], deny=["country:us"], geo=geo)
        )
        stream = TCPStream("tcp4", "127.0.0.1:0", tcp_echo.addr, access=control, log_connections=False)
        await stream.listen_and_serve()
        try:
            assert await tcp_roundtrip(stream, "127.0.0.9") == b"hi"  # GB
            assert await tcp_roundtrip(stream, "127.0.1.9") == b""  # US: denied
            assert await tcp_roundtrip(stream, "127.0.2.9") == b"hi"  # Asia/Shanghai
            assert await tcp_roundtrip(stream, "127.0.3.9") == b""  # unknown: default
        finally:
            await stream.close()


async def test_udp_denied_source_gets_no_session_and_no_reply(udp_echo: UDPEchoTarget) -> None:
    control, _ = access(Acl(default="allow", deny=["ip:127.0.0.66"]))
    stream = UDPStream("udp4", "127.0.0.1:0", udp_echo.addr, access=control)
    await stream.listen_and_serve()
    assert stream.local_addr is not None
    denied = await UDPClient.connect(*stream.local_addr, local="127.0.0.66")
    allowed = await UDPClient.connect(*stream.local_addr, local="127.0.0.65")
    try:
        for i in range(5):
            denied.send(b"denied %d" % i)
        allowed.send(b"allowed")
        # The listener handles datagrams in arrival order, so once the allowed one has come back
        # the denied ones were already dropped.
        assert await allowed.recv() == b"allowed"
        assert len(stream.sessions) == 1
        assert udp_echo.received == 1
        assert denied.inbox.empty()
    finally:
        denied.close()
        allowed.close()
        await stream.close()


async def test_flood_of_distinct_denied_sources_stays_bounded(udp_echo: UDPEchoTarget) -> None:
    acl = Acl(default="deny", allow=["ip:127.0.0.2"], cache_size=32)
    control, lines = access(acl)
    control.denials = DenyLog(60, max_addresses=16)
    stream = UDPStream("udp4", "127.0.0.1:0", udp_echo.addr, access=control)
    await stream.listen_and_serve()
    assert stream.local_addr is not None
    flood = [
        await UDPClient.connect(*stream.local_addr, local=f"127.1.{i // 250}.{i % 250 + 1}")
        for i in range(300)
    ]
    allowed = await UDPClient.connect(*stream.local_addr, local="127.0.0.2")
    try:
        for client in flood:
            client.send(b"x")
        allowed.send(b"sync")
        assert await allowed.recv() == b"sync"
        assert acl.cache_len == 32
        assert len(stream.sessions) == 1
        assert len(lines.lines) == 16  # one line per tracked address, the rest only counted
    finally:
        for client in flood:
            client.close()
        allowed.close()
        await stream.close()
    assert lines.lines[-1] == "denied 284 more attempts not itemised (deny log full)"


async def test_server_applies_global_and_route_acls_and_logs_to_a_file(
    tmp_path: Path, tcp_echo: TCPEchoTarget
) -> None:
    log_path = tmp_path / "acl.log"
    config = load_config_text(
        f"""
acl:
  default: allow
  deny: [ip:127.0.0.66]
  log: {{path: {log_path}}}
routes:
  open:
    host: 127.0.0.1
    bind: 127.0.0.1
    port: 0:{tcp_echo.port}
  closed:
    host: 127.0.0.1
    bind: 127.0.0.1
    port: 0:{tcp_echo.port}
    acl: {{default: deny, allow_local: false, allow: [ip:127.0.0.66]}}
""",
        "acl.yml",
    )
    server = Server(config)
    await server.start()
    try:
        open_route, closed_route = server.streams["open"], server.streams["closed"]
        assert isinstance(open_route, TCPStream) and isinstance(closed_route, TCPStream)
        assert await tcp_roundtrip(open_route, "127.0.0.66") == b""
        assert await tcp_roundtrip(open_route, "127.0.0.65") == b"hi"
        # The route's ACL replaces the global one entirely.
        assert await tcp_roundtrip(closed_route, "127.0.0.66") == b"hi"
        assert await tcp_roundtrip(closed_route, "127.0.0.65") == b""
    finally:
        await server.stop()
    text = log_path.read_text()
    assert "denied 127.0.0.66 (deny ip:127.0.0.66)" in text
    assert "route=open" in text and "denied 127.0.0.65" not in text  # the route ACL logs elsewhere


async def test_missing_geoip_database_is_a_startup_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mmdb"
    config = load_config_text(
        f"routes:\n  r:\n    port: 0:1\n    acl: {{allow: [country:GB], geoip: {{database: {missing}}}}}\n",
        "geo.yml",
    )
    with pytest.raises(
        ConfigError, match=r"route 'r', field 'acl': GeoIP database .*nope\.mmdb.* does not exist"
    ):
        await Server(config).start()
