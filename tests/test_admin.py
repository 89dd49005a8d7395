"""admin.py: the decisions (pure), then the real listener against well-behaved, garbage and slow
clients on loopback; and the `admin:` config rules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from portway import admin as admin_mod
from portway.admin import AdminApp, AdminServer, read_token_file
from portway.config.load import load_config_text
from portway.errors import BindError, ConfigError
from tests.polling import eventually

TOKEN = "s3cret-token"


def app(token: str | None = TOKEN, metrics_public: bool = False) -> AdminApp:
    return AdminApp(
        metrics=lambda: b"portway_up 1\n",
        status=lambda: b'{"routes":[]}',
        page=b"<html>page</html>",
        token=token,
        metrics_public=metrics_public,
    )


AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("method", "target", "headers", "status"),
    [
        ("GET", "/", {}, 200),  # the page is static; its data needs the token
        ("GET", "/?token=x", {}, 200),
        ("GET", "/metrics", {}, 401),
        ("GET", "/metrics", {"authorization": "Bearer wrong"}, 401),
        ("GET", "/metrics", {"authorization": f"Basic {TOKEN}"}, 401),
        ("GET", "/metrics", AUTH, 200),
        ("GET", "/api/status", {}, 401),
        ("GET", "/api/status", AUTH, 200),
        ("HEAD", "/api/status", AUTH, 200),
        ("POST", "/api/status", AUTH, 405),
        ("DELETE", "/", {}, 405),
        ("GET", "/nope", AUTH, 404),
        ("POST", "/nope", {}, 404),
        ("GET", "/metrics/../etc/passwd", AUTH, 404),
    ],
)
def test_decisions(method: str, target: str, headers: dict[str, str], status: int) -> None:
    assert app().respond(method, target, headers).status == status


def test_405_says_what_is_allowed_and_401_asks_for_bearer() -> None:
    assert ("Allow", "GET, HEAD") in app().respond("PUT", "/metrics", {}).headers
    assert ("WWW-Authenticate", 'Bearer realm="portway"') in app().respond("GET", "/metrics", {}).headers


def test_metrics_public_opens_only_metrics() -> None:
    a = app(metrics_public=True)
    assert a.respond("GET", "/metrics", {}).status == 200
    assert a.respond("GET", "/api/status", {}).status == 401


def test_no_token_means_open_and_a_failing_producer_is_a_500() -> None:
    def broken() -> bytes:
        raise RuntimeError("boom")

    a = AdminApp(metrics=broken, status=lambda: b"{}", page=b"", token=None)
    assert a.respond("GET", "/api/status", {}).status == 200
    assert a.respond("GET", "/metrics", {}).status == 500


def test_the_shipped_page_is_self_contained() -> None:
    page = admin_mod.load_page().decode()
    assert "api/status" in page and "sessionStorage" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<script src" not in page and "<link" not in page


# -- the real listener


@pytest.fixture
async def server() -> AsyncIterator[AdminServer]:
    s = AdminServer(app(), "127.0.0.1:0")
    await s.start()
    yield s
    await s.stop()


async def talk(s: AdminServer, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert s.local_addr is not None
    reader, writer = await asyncio.open_connection(*s.local_addr)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


def get(path: str, *extra: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: x", *extra, "", ""]).encode()


async def test_keep_alive_serves_several_requests(server: AdminServer) -> None:
    reader, writer = await talk(server, get("/metrics", f"Authorization: Bearer {TOKEN}") + get("/"))
    status, headers, body = await response(reader)
    assert (status, body) == (200, b"portway_up 1\n")
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    status, headers, body = await response(reader)
    assert (status, body) == (200, b"<html>page</html>")
    assert headers["cache-control"] == "no-store"
    writer.close()


async def test_head_has_no_body(server: AdminServer) -> None:
    reader, writer = await talk(
        server,
        b"HEAD /api/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n",
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    # The length GET would have; no body follows: the next response starts right after the head.
    assert b"content-length: 13\r\n" in head.lower()
    writer.write(get("/"))
    status, _, body = await response(reader)
    assert (status, body) == (200, b"<html>page</html>")
    writer.close()


async def test_garbage_gets_400_and_the_listener_lives_on(server: AdminServer) -> None:
    reader, writer = await talk(server, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n")
    status, _, _ = await response(reader)
    assert status == 400
    assert await closed(reader)
    writer.close()
    reader, writer = await talk(server, get("/"))
    assert (await response(reader))[0] == 200
    writer.close()


async def test_oversized_head_is_refused(server: AdminServer) -> None:
    reader, writer = await talk(server, get("/", "X-Filler: " + "a" * 20000))
    status, _, _ = await response(reader)
    assert status == 431
    assert await closed(reader)
    writer.close()


async def test_a_body_is_never_read_and_the_connection_closes(server: AdminServer) -> None:
    reader, writer = await talk(
        server, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    )
    status, headers, _ = await response(reader)
    assert status == 405 and headers["connection"] == "close"
    assert await closed(reader)
    writer.close()


async def test_a_slow_client_is_cut_off_and_others_are_served_meanwhile(
    server: AdminServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_mod, "HEADER_TIMEOUT", 0.3)
    slow_reader, slow_writer = await talk(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes
    reader, writer = await talk(server, get("/"))
    assert (await response(reader))[0] == 200
    writer.close()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await closed(slow_reader)
    assert 0.2 < loop.time() - started < 3
    slow_writer.close()


async def test_connections_past_the_cap_are_closed_at_once(
    server: AdminServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_mod, "MAX_CONNECTIONS", 2)
    held = [await talk(server, b"GET / HTTP/1.1\r\n") for _ in range(2)]

    async def both_held() -> bool:
        return len(server._conns) == 2

    await eventually(both_held)
    reader, writer = await talk(server, get("/"))
    assert await closed(reader)
    writer.close()
    for _, w in held:
        w.close()


async def test_a_port_in_use_is_a_bind_error(server: AdminServer) -> None:
    assert server.local_addr is not None
    other = AdminServer(app(), f"127.0.0.1:{server.local_addr[1]}")
    with pytest.raises(BindError, match=r"admin: cannot listen on 127\.0\.0\.1:\d+"):
        await other.start()


# -- config


def test_a_public_bind_needs_a_token_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text("admin:\n  listen: 0.0.0.0:9108\n", "p.yml")
    assert info.value.field == "admin.listen" and info.value.line == 2
    assert "token_file" in str(info.value) and "allow_insecure" in str(info.value)
    with pytest.raises(ConfigError, match=r"admin\.listen"):
        load_config_text("admin:\n  listen: ':9108'\n", "p.yml")  # all addresses
    ok = load_config_text("admin:\n  listen: 0.0.0.0:9108\n  token_file: /t\n", "p.yml")
    assert ok.admin is not None and ok.admin.token_file == "/t"
    ok = load_config_text("admin:\n  allow_insecure: true\n  listen: '[::]:9108'\n", "p.yml")
    assert ok.admin is not None and ok.admin.allow_insecure
    ok = load_config_text("admin:\n  listen: '[::1]:9108'\n", "p.yml")
    assert ok.admin is not None and ok.admin.listen == "[::1]:9108"


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("admin:\n  listen: nope\n", "admin.listen", "expected host:port"),
        ("admin:\n  listen: example.com:9108\n", "admin.listen", "not an IP address"),
        ("admin:\n  token_file: /t\n", "admin.listen", "is required"),
        ("access_log:\n  path: /x\n  format: xml\n", "access_log.format", "'json' or 'text'"),
        ("access_log:\n  format: json\n", "access_log.path", "is required"),
        ("access_log:\n  path: ''\n", "access_log.path", "is empty"),
    ],
)
def test_config_errors_name_the_field(text: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "p.yml")
    assert info.value.field == field and message in info.value.message


def test_token_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"field 'admin.token_file': cannot read .*: No such file"):
        read_token_file(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token_file(str(empty))
    good = tmp_path / "token"
    good.write_text(TOKEN + "\n")
    assert read_token_file(str(good)) == TOKEN


async def test_ipv6_loopback() -> None:
    s = AdminServer(app(token=None), "[::1]:0")
    await s.start()
    try:
        assert s.url.startswith("http://[::1]:")
        reader, writer = await talk(s, get("/api/status"))
        assert (await response(reader))[:1] == (200,)
        writer.close()
    finally:
        await s.stop()
