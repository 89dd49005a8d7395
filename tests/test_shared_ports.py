"""Shared ports on real loopback sockets: routing by SNI, ALPN and protocol on one listener,
passthrough to real `openssl s_server` targets, and TLS termination.

What each test proves is in its name and docstring; every TCP test runs on both engines and
both loops. Targets: `openssl s_server -rev` (a TLS server answering each line reversed, one
certificate per server) and `Tagged` (a plain server that greets with its tag, then echoes),
so a reply says which route took the connection and that the bytes arrived intact both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from portway.config.load import load_config_text
from portway.errors import ConfigError
from portway.server import Server
from tests.hellos import records, unframe
from tests.polling import eventually
from tests.ports import free_port
from tests.tls_material import Authority, Pair

pytestmark = pytest.mark.usefixtures("both_tcp_engines")

HOSTS = ("a.example.com", "b.example.com", "x.w.example.com")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority(directory, "test-ca")
    clients = Authority(directory, "client-ca")
    return {
        "dir": directory,
        "ca": ca,
        "a": ca.issue("a.example.com"),
        "b": ca.issue("b.example.com"),
        "w": ca.issue("*.w.example.com"),
        "term": ca.issue("term.example.com"),
        "term2": ca.issue("other.example.com"),
        "client_ca": clients,
        "client": clients.issue("client-1", client=True),
        "rogue": ca.issue("rogue-client", client=True),
    }


@pytest.fixture(scope="module")
def s_servers(pki: dict[str, Any]) -> Iterator[dict[str, int]]:
    """One `openssl s_server -rev` per certificate, on free loopback ports."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (the TLS targets are openssl s_server)")
    procs: list[subprocess.Popen[bytes]] = []
    ports: dict[str, int] = {}
    for name in ("a", "b", "w"):
        pair: Pair = pki[name]
        port = free_port()
        cmd = ["openssl", "s_server", "-quiet", "-rev", "-accept", f"127.0.0.1:{port}"]
        cmd += ["-cert", pair.cert, "-key", pair.key]
        quiet = subprocess.DEVNULL
        procs.append(subprocess.Popen(cmd, stdin=quiet, stdout=quiet, stderr=quiet))
        ports[name] = port
    deadline = time.monotonic() + 10
    for port in ports.values():
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "openssl s_server did not start"
            time.sleep(0.02)
    yield ports
    for proc in procs:
        proc.terminate()
        proc.wait()


class Tagged:
    """Greets every connection with `tag` + newline, then echoes; records what it received."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.received: list[bytes] = []

    async def start(self) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(self.tag + b"\n")
            got = b""
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    got += data
                    writer.write(data)
                    await writer.drain()
            self.received.append(got)
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.close()


@pytest.fixture
async def tagged() -> AsyncIterator[dict[str, Tagged]]:
    targets = {tag: Tagged(tag.encode()) for tag in ("web", "ssh", "plain", "term")}
    for t in targets.values():
        await t.start()
    yield targets
    for t in targets.values():
        t.stop()


@contextlib.asynccontextmanager
async def serving(text: str) -> AsyncIterator[Server]:
    server = Server(load_config_text(text, "shared.yml"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def passthrough_yaml(port: int, s_servers: dict[str, int], tagged: dict[str, Tagged], extra: str = "") -> str:
    return f"""
routes:
  a:
    port: {port}:{s_servers["a"]}
    host: 127.0.0.1
    peek_timeout: 0.5s
    match: {{sni: [a.example.com]}}
  b:
    port: {port}:{s_servers["b"]}
    host: 127.0.0.1
    peek_timeout: 0.5s
    match: {{sni: [B.Example.com]}}
  w:
    port: {port}:{s_servers["w"]}
    host: 127.0.0.1
    peek_timeout: 0.5s
    match: {{sni: ["*.w.example.com"]}}
  ssh:
    port: {port}:{tagged["ssh"].port}
    host: 127.0.0.1
    peek_timeout: 0.5s
    match: {{protocol: ssh}}
  web:
    port: {port}:{tagged["web"].port}
    host: 127.0.0.1
    peek_timeout: 0.5s
{extra}"""


def client_context(pki: dict[str, Any]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"].path)
    return ctx


async def tls_exchange(port: int, name: str, ctx: ssl.SSLContext, payload: bytes) -> tuple[str, bytes]:
    """(the CN of the certificate the server showed, its answer to `payload`) over real TLS."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
    try:
        cert = writer.get_extra_info("peercert")
        cn = dict(x[0] for x in cert["subject"])["commonName"]
        writer.write(payload)
        answer = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
        return cn, answer
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


# --- passthrough ----------------------------------------------------------------------------


async def test_sni_routes_to_the_server_with_that_certificate(
    pki: dict[str, Any], s_servers: dict[str, int], tagged: dict[str, Tagged]
) -> None:
    """Each name reaches the s_server holding its certificate (the client verifies the chain and
    the name end to end: portway never touched the TLS), and bytes come back intact."""
    port = free_port()
    ctx = client_context(pki)
    async with serving(passthrough_yaml(port, s_servers, tagged)):
        for name, cn in (("a.example.com", "a.example.com"), ("b.example.com", "b.example.com"),
                         ("x.w.example.com", "*.w.example.com")):  # fmt: skip
            payload = f"hello {name} ".encode() * 300 + b"\n"  # several records
            got_cn, answer = await tls_exchange(port, name, ctx, payload)
            assert got_cn == cn
            assert answer == payload[:-1][::-1] + b"\n"


async def test_openssl_s_client_servername(
    pki: dict[str, Any], s_servers: dict[str, int], tagged: dict[str, Tagged]
) -> None:
    """A different TLS stack as client: `openssl s_client -servername` sees the right chain."""
    port = free_port()
    async with serving(passthrough_yaml(port, s_servers, tagged)):
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "b.example.com",
            "-CAfile", pki["ca"].path, "-verify_return_error", "-quiet",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(b"portway\n")
        try:
            assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"yawtrop\n"
        finally:
            proc.kill()
            err = await proc.stderr.read()
            await proc.wait()
        assert b"CN = b.example.com" in err


async def test_ssh_and_tls_on_one_port(
    pki: dict[str, Any], s_servers: dict[str, int], tagged: dict[str, Tagged]
) -> None:
    """An SSH identification goes to the ssh route (a socket speaking the banner back; sshd
    would need privilege separation set up), TLS to its SNI route, on the same port."""
    port = free_port()
    async with serving(passthrough_yaml(port, s_servers, tagged)):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        banner = b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n"
        writer.write(banner)
        assert await asyncio.wait_for(reader.readline(), 5) == b"ssh\n"
        assert await reader.readexactly(len(banner)) == banner
        writer.close()
        assert (await tls_exchange(port, "a.example.com", client_context(pki), b"x\n"))[0] == "a.example.com"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """A real OpenSSH server on a free loopback port with a throwaway host key: (port, key).

    sshd insists on its privilege separation directory /run/sshd; rather than create it on the
    host, sshd runs in a private mount namespace with a tmpfs on /run (needs root and unshare)."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"  # sbin is often not on a user's PATH
    missing = [b for b in ("ssh", "ssh-keygen", "unshare") if shutil.which(b) is None]
    missing += [] if os.path.exists(sshd_bin) else ["sshd"]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (the SSH test runs a real sshd and ssh)")
    if os.geteuid() != 0:
        pytest.skip("sshd needs root here (a private mount namespace for /run/sshd)")
    directory = tmp_path_factory.mktemp("sshd")
    key = directory / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    port = free_port()
    script = (
        "mount -t tmpfs none /run && mkdir -m 755 /run/sshd && exec "
        f"{sshd_bin} -D -e -f /dev/null -h {key} -p {port} -o ListenAddress=127.0.0.1 "
        "-o PidFile=none -o UsePAM=no"
    )
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.skip("sshd did not start in a private mount namespace")
        time.sleep(0.02)
    yield port, (directory / "host_key.pub").read_text().split()[1]
    proc.terminate()
    proc.wait()


async def test_real_sshd_and_tls_on_one_port(
    pki: dict[str, Any],
    s_servers: dict[str, int],
    tagged: dict[str, Tagged],
    sshd: tuple[int, str],
    tmp_path: Path,
) -> None:
    """`ssh` through the shared port completes the key exchange with the real sshd and verifies
    its host key (then fails to log in, as no key is offered), while TLS on the same port still
    reaches its s_server. (ssh-keyscan would not do: it waits for the server's banner, a
    server-speaks-first client, so it lands on the fallback after peek_timeout.)"""
    port = free_port()
    sshd_port, host_key = sshd
    text = passthrough_yaml(port, s_servers, tagged).replace(
        f"{port}:{tagged['ssh'].port}", f"{port}:{sshd_port}"
    )
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} ssh-ed25519 {host_key}\n")
    async with serving(text):
        proc = await asyncio.create_subprocess_exec(
            "ssh", "-F", "/dev/null", "-p", str(port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}",
            "-o", "HostKeyAlgorithms=ssh-ed25519", "-o", "IdentitiesOnly=yes", "-o", "IdentityFile=/dev/null",
            "nobody@127.0.0.1", "true",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 15)
        assert b"Permission denied" in err, err
        assert b"verification failed" not in err
        assert (await tls_exchange(port, "a.example.com", client_context(pki), b"x\n"))[0] == "a.example.com"


async def _tls_by_hand(port: int, name: str | None, pki: dict[str, Any], cuts: list[int] | None,
                       one_byte: bool) -> str:  # fmt: skip
    """A TLS client over a raw socket whose ClientHello is sent re-framed into records cut at
    `cuts` and/or one byte per segment; returns the CN the server showed."""
    loop = asyncio.get_running_loop()
    ctx = client_context(pki)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    try:
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        if cuts is not None:
            hello = records(unframe(hello), cuts)
        if one_byte:
            for i in range(len(hello)):
                await loop.sock_sendall(sock, hello[i : i + 1])
                await asyncio.sleep(0)
        else:
            await loop.sock_sendall(sock, hello)
        while True:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            assert data, "closed during the handshake"
            incoming.write(data)
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await loop.sock_sendall(sock, outgoing.read())
        await loop.sock_sendall(sock, outgoing.read())
        cert = tls.getpeercert()
        assert cert is not None
        return str(dict(x[0] for x in cert["subject"])["commonName"])
    finally:
        sock.close()


@pytest.mark.parametrize(("cuts", "one_byte"), [(None, True), ([40], False), ([3, 90], True)])
async def test_client_hello_split_into_segments_and_records(
    pki: dict[str, Any], s_servers: dict[str, int], tagged: dict[str, Tagged], cuts: list[int] | None,
    one_byte: bool,
) -> None:  # fmt: skip
    """One byte per TCP segment, and the hello re-framed across two or three TLS records: the
    peek still finds the name, and the target completes the handshake on exactly those bytes."""
    port = free_port()
    async with serving(passthrough_yaml(port, s_servers, tagged)):
        assert await _tls_by_hand(port, "b.example.com", pki, cuts, one_byte) == "b.example.com"


async def _first_line(port: int, send: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if send:
            writer.write(send)
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


async def test_no_sni_garbage_and_server_speaks_first_go_to_the_fallback(
    pki: dict[str, Any], s_servers: dict[str, int], tagged: dict[str, Tagged]
) -> None:
    """Unknown names, a hello without SNI, non-TLS bytes: the fallback. A client that sends
    nothing (SMTP, MySQL) reaches the fallback after peek_timeout (0.5s here), not before."""
    port = free_port()
    async with serving(passthrough_yaml(port, s_servers, tagged)):
        from tests.hellos import real_hello

        assert await _first_line(port, real_hello(None)) == b"web\n"
        assert await _first_line(port, real_hello("nobody.example.com")) == b"web\n"
        assert await _first_line(port, b"hello there\r\n") == b"web\n"
        started = time.monotonic()
        assert await _first_line(port, b"") == b"web\n"
        assert 0.4 < time.monotonic() - started < 3
    # What the fallback received is byte for byte what the client sent.
    assert real_hello(None) in tagged["web"].received


async def _closed_without_reply(port: int, send: bytes) -> float:
    """Seconds until portway closed a connection that got no byte back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(send)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(100), 5) == b""
        return time.monotonic() - started
    finally:
        writer.close()


async def test_without_fallback_unmatched_malformed_and_trickling_clients_are_closed(
    s_servers: dict[str, int], tagged: dict[str, Tagged], caplog: pytest.LogCaptureFixture
) -> None:
    """No fallback: a hello naming no route is closed at once; a malformed hello is closed
    even with nothing else wrong; a hello trickled past peek_timeout is closed when it fires.
    A failure is logged with the listener and the reason (one line per burst per listener)."""
    from tests.hellos import real_hello

    caplog.set_level(logging.INFO, logger="portway")
    port = free_port()
    text = passthrough_yaml(port, s_servers, tagged).split("  web:")[0]
    text = text.replace("peek_timeout: 0.5s", "peek_timeout: 0.8s")
    async with serving(text):
        assert await _closed_without_reply(port, real_hello("nobody.example.com")) < 0.6  # not the timeout
        assert "no route matches sni 'nobody.example.com'" in caplog.text
        bad = bytearray(real_hello("a.example.com"))
        bad[9:12] = b"\x00\x00\x02"  # the handshake claims 2 bytes inside a longer record
        assert await _closed_without_reply(port, bytes(bad)) < 0.6
        assert any(getattr(r, "listen", "").endswith(f":{port}") for r in caplog.records)
    async with serving(text):  # a fresh listener, so its first failure is logged at once
        assert await _closed_without_reply(port, real_hello("a.example.com")[:20]) >= 0.75
        assert "(peek_timeout)" in caplog.text


async def test_proxy_header_then_hello_acl_on_the_real_client(
    pki: dict[str, Any], s_servers: dict[str, int], tagged: dict[str, Tagged]
) -> None:
    """A PROXY header first, then the ClientHello: the global ACL judges the client the header
    names (before any route is chosen), and the relayed header carries that client."""
    port = free_port()
    extra = """acl:
  default: allow
  allow_local: false
  deny: ["cidr:10.0.0.0/8"]
entrypoint:
  proxy_protocol: {mode: required, trusted_proxies: [127.0.0.1]}
"""
    text = passthrough_yaml(port, s_servers, tagged, extra)
    relay = "    relay_proxy_protocol_header: true\n    proxy_protocol_version: 1\n"
    text = text.replace("    peek_timeout: 0.5s\n", "    peek_timeout: 0.5s\n" + relay)
    from tests.hellos import real_hello

    async with serving(text):
        hello = real_hello("nobody.example.com")
        allowed = b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 443\r\n" + hello
        assert await _first_line(port, allowed) == b"web\n"
        denied = b"PROXY TCP4 10.1.2.3 127.0.0.1 4000 443\r\n" + hello
        assert await _closed_without_reply(port, denied) < 2
    assert any(r.startswith(b"PROXY TCP4 192.0.2.7 ") and r.endswith(hello) for r in tagged["web"].received)
    assert not any(b"10.1.2.3" in r for r in tagged["web"].received)


# --- termination ----------------------------------------------------------------------------


def term_yaml(port: int, target: int, pki: dict[str, Any], tls: str) -> str:
    return f"""
routes:
  term:
    port: {port}:{target}
    host: 127.0.0.1
    tls:
{tls}
"""


async def test_termination_serves_a_verified_chain_and_plaintext_to_the_target(
    pki: dict[str, Any], tagged: dict[str, Tagged]
) -> None:
    """A real client verifies the chain and name; the target gets plaintext; with two
    certificates the SNI picks one."""
    port = free_port()
    term, other = pki["term"], pki["term2"]
    tls = (f"      cert: {term.cert}\n      key: {term.key}\n      certificates:\n"
           f"        - {{cert: {other.cert}, key: {other.key}}}")  # fmt: skip
    async with serving(term_yaml(port, tagged["term"].port, pki, tls)):
        ctx = client_context(pki)
        for name in ("term.example.com", "other.example.com"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
            cn = dict(x[0] for x in writer.get_extra_info("peercert")["subject"])["commonName"]
            assert cn == name
            assert await asyncio.wait_for(reader.readline(), 5) == b"term\n"  # server speaks first
            payload = os.urandom(200_000)
            writer.write(payload)
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
            writer.close()
    await eventually(lambda: _true(len(tagged["term"].received) == 2))
    assert len(tagged["term"].received[0]) == 200_000  # plaintext, not TLS records


async def _true(value: bool) -> bool:
    return value


async def _handshake_and_read(port: int, ctx: ssl.SSLContext) -> None:
    name = "term.example.com"
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
    try:
        await asyncio.wait_for(reader.readexactly(5), 5)  # TLS 1.3: refused after the handshake
    finally:
        writer.close()


async def test_mtls_accepts_a_client_certificate_and_refuses_others(
    pki: dict[str, Any], tagged: dict[str, Tagged]
) -> None:
    port = free_port()
    term = pki["term"]
    tls = f"      cert: {term.cert}\n      key: {term.key}\n      client_ca: {pki['client_ca'].path}"
    async with serving(term_yaml(port, tagged["term"].port, pki, tls)):
        good = client_context(pki)
        good.load_cert_chain(pki["client"].cert, pki["client"].key)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=good, server_hostname="term.example.com"
        )
        assert await asyncio.wait_for(reader.readline(), 5) == b"term\n"
        writer.close()
        for cert in (None, pki["rogue"]):  # none, or one from a CA the route does not trust
            bad = client_context(pki)
            if cert is not None:
                bad.load_cert_chain(cert.cert, cert.key)
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await _handshake_and_read(port, bad)


async def test_certificate_rotated_on_disk_while_a_connection_stays_up(
    pki: dict[str, Any], tagged: dict[str, Tagged], tmp_path: Path
) -> None:
    """New connections get the new certificate once the file changes; a connection opened
    before keeps working; a bad file later changes nothing."""
    port = free_port()
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(pki["term"].cert, cert)
    shutil.copy(pki["term"].key, key)
    tls = f"      cert: {cert}\n      key: {key}"
    ctx = client_context(pki)
    ctx.check_hostname = False
    async with serving(term_yaml(port, tagged["term"].port, pki, tls)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="x")
        assert await asyncio.wait_for(reader.readline(), 5) == b"term\n"
        for src, dst in ((pki["term2"].key, key), (pki["term2"].cert, cert)):  # as certbot does: rename over
            shutil.copy(src, str(dst) + ".new")
            os.replace(str(dst) + ".new", dst)

        async def rotated() -> bool:
            _, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="x")
            cn = dict(x[0] for x in w.get_extra_info("peercert")["subject"])["commonName"]
            w.close()
            return bool(cn == "other.example.com")

        await eventually(rotated, timeout=10, step=0.1)
        writer.write(b"still here")
        assert await asyncio.wait_for(reader.readexactly(10), 5) == b"still here"
        writer.close()
        # A key that does not belong to the certificate: the reload is refused, nothing changes.
        stream = server.streams["term"]
        certs = cast(Any, stream).tls
        before = certs.context
        shutil.copy(pki["a"].key, key)
        assert certs.reload() is False
        assert certs.context is before


async def test_relay_re_encrypts_to_a_verified_target(pki: dict[str, Any], s_servers: dict[str, int]) -> None:
    """tls.relay: the client's TLS ends at portway, a new session verified against `ca` goes
    to the target (s_server with a.example.com's certificate)."""
    port = free_port()
    term = pki["term"]
    tls = (f"      cert: {term.cert}\n      key: {term.key}\n      relay: true\n"
           f"      ca: {pki['ca'].path}")  # fmt: skip
    text = term_yaml(port, s_servers["a"], pki, tls).replace("host: 127.0.0.1", "host: localhost")
    text = text.replace("term:\n", "term:\n    scheme: tcp4\n")
    # The target is dialed as "localhost" but shows a.example.com's certificate: verification
    # must refuse it (the client sees the connection end), and `verify: false` must accept it.
    async with serving(text):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(pki), server_hostname="term.example.com"
        )
        writer.write(b"abc\n")
        assert await asyncio.wait_for(reader.read(10), 5) == b""  # target failed verification
        writer.close()
    text = text.replace(f"      ca: {pki['ca'].path}", "      verify: false")
    async with serving(text):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(pki), server_hostname="term.example.com"
        )
        writer.write(b"abc\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"cba\n"
        writer.close()


# --- configuration ----------------------------------------------------------------------------


def test_bad_certificate_names_route_and_file(pki: dict[str, Any], tmp_path: Path) -> None:
    from portway.certificates import ServerCertificates

    with pytest.raises(ConfigError, match=r"route 'r'.*key does not belong"):
        ServerCertificates("r", [(pki["a"].cert, pki["b"].key)])
    with pytest.raises(ConfigError, match=r"route 'r'.*missing\.crt"):
        ServerCertificates("r", [(str(tmp_path / "missing.crt"), pki["b"].key)])


async def test_reload_rebuilds_a_changed_shared_listener_and_keeps_live_connections(
    pki: dict[str, Any], s_servers: dict[str, int], tagged: dict[str, Tagged]
) -> None:
    """Adding a route to a shared listener rebuilds the group; a connection handed to a route
    before the reload keeps flowing while it drains; new connections see the new route."""
    port = free_port()
    text = passthrough_yaml(port, s_servers, tagged)
    async with serving(text) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"SSH-2.0-x\r\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"ssh\n"
        added = (
            text
            + f"""  plain:
    port: {port}:{tagged["plain"].port}
    host: 127.0.0.1
    peek_timeout: 0.5s
    match: {{protocol: http}}
"""
        )
        assert await server.apply(load_config_text(added, "shared.yml")) == {}
        assert await _first_line(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b"plain\n"
        writer.write(b"more")
        sent = b"SSH-2.0-x\r\nmore"
        assert await asyncio.wait_for(reader.readexactly(len(sent)), 5) == sent
        writer.close()


async def test_a_route_acl_replaces_the_global_one_on_a_shared_port(tagged: dict[str, Tagged]) -> None:
    """As on a plain route, a route's own ACL replaces the global one: the global ACL denies
    loopback, the fallback route's own ACL admits it, the ssh route (global ACL) refuses it."""
    port = free_port()
    text = f"""
acl: {{default: allow, allow_local: false, deny: ["cidr:127.0.0.0/8"]}}
routes:
  ssh:
    port: {port}:{tagged["ssh"].port}
    host: 127.0.0.1
    match: {{protocol: ssh}}
  web:
    port: {port}:{tagged["web"].port}
    host: 127.0.0.1
    acl: {{default: allow}}
"""
    async with serving(text):
        assert await _first_line(port, b"hello\r\n") == b"web\n"
        assert await _closed_without_reply(port, b"SSH-2.0-x\r\n") < 2
    assert tagged["ssh"].received == []


class Records:
    """An observer that keeps every closed connection's record."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def accepted(self, route: str, protocol: str) -> None:
        pass

    def dialed(self, route: str, target: str, seconds: float) -> None:
        pass

    def closed(self, record: Any) -> None:
        self.records.append(record)

    def datagram_dropped(self, route: str, reason: str) -> None:
        pass


async def test_observer_sees_peek_timeout_under_the_listener_and_routed_ones_under_their_route(
    s_servers: dict[str, int], tagged: dict[str, Tagged]
) -> None:
    from tests.hellos import real_hello

    port = free_port()
    text = passthrough_yaml(port, s_servers, tagged).split("  web:")[0].replace("0.5s", "0.3s")
    records = Records()
    server = Server(load_config_text(text, "shared.yml"), observer=records)
    await server.start()
    try:
        await _closed_without_reply(port, real_hello("a.example.com")[:20])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"SSH-2.0-x\r\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"ssh\n"
        writer.close()
        await eventually(lambda: _true(len(records.records) == 2))
    finally:
        await server.stop()
    by_reason = {r.reason: r for r in records.records}
    assert by_reason["peek_timeout"].route == f"[::]:{port}"  # the listener: no route took it
    assert by_reason["normal"].route == "ssh"


async def test_reload_removing_routes_from_a_shared_listener(
    s_servers: dict[str, int], tagged: dict[str, Tagged]
) -> None:
    """Removing an SNI route sends its name to the fallback; removing every match leaves a plain
    route on the port, which still serves (and no longer waits for a peek)."""
    from tests.hellos import real_hello

    port = free_port()
    text = passthrough_yaml(port, s_servers, tagged)
    async with serving(text) as server:
        without_a = text.replace(text[text.index("  a:\n") : text.index("  b:\n")], "")
        assert await server.apply(load_config_text(without_a, "shared.yml")) == {}
        assert await _first_line(port, real_hello("a.example.com")) == b"web\n"
        only_web = "routes:\n" + text[text.index("  web:\n") :]
        assert await server.apply(load_config_text(only_web, "shared.yml")) == {}
        assert not server.listeners
        started = time.monotonic()
        assert await _first_line(port, b"") == b"web\n"  # no peek: the greeting comes at once
        assert time.monotonic() - started < 0.45  # peek_timeout would be 0.5s
