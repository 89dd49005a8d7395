"""Real key-value stores for the provider tests: a three-member etcd cluster and a redis-server.

Both listen on free 127.0.0.1 ports and keep their data in a temporary directory. They are
started with plain (blocking) code because the fixtures that own them are module-scoped: one
cluster serves every test of a module, which keeps the suite fast.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

from tests.ports import free_port

START_TIMEOUT_S = 20.0


def require(binary: str, package: str) -> str:
    found = shutil.which(binary)
    if found is None:
        pytest.skip(f"{binary} is missing (Debian package {package})")
    return found


@dataclass
class EtcdMember:
    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def up(self) -> bool:
        return self.process is not None and self.process.poll() is None and not self.paused


def _post(
    url: str,
    body: dict[str, Any],
    timeout: float = 2.0,
    *,
    context: ssl.SSLContext | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = token
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=timeout, context=context) as reply:
        data: dict[str, Any] = json.loads(reply.read())
        return data


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


@dataclass(frozen=True)
class TLSFiles:
    """A private CA, a server certificate for 127.0.0.1, and a client certificate, made with openssl."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, root: Path) -> TLSFiles:
        openssl = require("openssl", "openssl")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], check=True, capture_output=True, cwd=root)

        run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
        # etcd's JSON gateway dials its own gRPC port with the server certificate: it needs clientAuth too.
        leaves = (
            ("server", "serverAuth,clientAuth", "subjectAltName=IP:127.0.0.1\n"),
            ("client", "clientAuth", ""),
        )
        for name, usage, san in leaves:
            ext = root / f"{name}.ext"
            ext.write_text(
                f"{san}extendedKeyUsage={usage}\nkeyUsage=critical,digitalSignature\n"
                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
            )
            run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=test-{name}")
            run(
                "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", str(ext),
            )  # fmt: skip
        files = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
        return cls(*(root / f for f in files))

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


class EtcdCluster:
    """etcd members on loopback (three by default); `put`/`delete`/`compact` go to whichever answers.

    With `tls`, clients must connect over HTTPS with a certificate signed by its CA.
    """

    def __init__(self, root: Path, *, size: int = 3, tls: TLSFiles | None = None) -> None:
        self.binary = require("etcd", "etcd-server")
        self.tls = tls
        self.context = tls.client_context() if tls else None
        #: Sent with every call once `enable_auth` has run.
        self.token: str | None = None
        token = f"portway-test-{uuid.uuid4().hex[:8]}"
        scheme = "https" if tls else "http"
        self.members = [
            EtcdMember(
                f"m{i}",
                f"{scheme}://127.0.0.1:{free_port()}",
                f"http://127.0.0.1:{free_port()}",
                root / f"m{i}",
            )
            for i in range(size)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.args = [
                self.binary,
                "--name", m.name,
                "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.client_url,
                "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url,
                "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", initial,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", token,
                "--log-level", "error",
                "--logger", "zap",
            ]  # fmt: skip
            if tls is not None:
                m.args += ["--cert-file", str(tls.server_cert), "--key-file", str(tls.server_key)]
                m.args += ["--trusted-ca-file", str(tls.ca), "--client-cert-auth"]
        self.log = root / "etcd.log"

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self) -> None:
        for m in self.members:
            self.start_member(m, wait=False)
        for m in self.members:
            self.wait_healthy(m)

    def start_member(self, m: EtcdMember, *, wait: bool = True) -> None:
        with self.log.open("ab") as out:
            m.process = subprocess.Popen(m.args, stdout=out, stderr=subprocess.STDOUT)
        if wait:
            self.wait_healthy(m)

    def wait_healthy(self, m: EtcdMember) -> None:
        """Until the member serves a linearizable read (which needs a leader and a quorum)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert m.process is not None
            if m.process.poll() is not None:
                raise RuntimeError(f"etcd member {m.name} exited: {self.log.read_text()[-2000:]}")
            try:
                _post(f"{m.client_url}/v3/kv/range", {"key": _b64("h")}, timeout=1.0, context=self.context)
                return
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member {m.name} did not become healthy") from None
                time.sleep(0.05)  # a process coming up: there is no event to wait for

    def member(self, endpoint: str) -> EtcdMember:
        return next(m for m in self.members if m.client_url == endpoint)

    def kill(self, m: EtcdMember) -> None:
        assert m.process is not None
        m.process.kill()  # SIGKILL works on a stopped process too
        m.process.wait()
        m.paused = False

    def pause(self, m: EtcdMember) -> None:
        """SIGSTOP: its connections stay open but nothing moves, like a member frozen mid-watch."""
        assert m.process is not None
        m.process.send_signal(signal.SIGSTOP)
        m.paused = True

    def revive(self) -> None:
        """Start every member that is not running (same data dir: it rejoins), wait for all to serve."""
        down = [m for m in self.members if m.process is None or m.process.poll() is not None]
        for m in down:
            self.start_member(m, wait=False)
        for m in down:
            self.wait_healthy(m)

    def kill_all(self) -> None:
        for m in self.members:
            if m.process is not None and m.process.poll() is None:
                self.kill(m)

    def stop(self) -> None:
        for m in self.members:
            if m.process is not None and m.process.poll() is None:
                m.process.send_signal(signal.SIGCONT)
                m.process.kill()
                m.process.wait()

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Ask each running member in turn; a member just restarted may refuse for a moment."""
        last: Exception | None = None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            for m in self.members:
                if not m.up:
                    continue
                try:
                    return _post(f"{m.client_url}{path}", body, context=self.context, token=self.token)
                except (OSError, urllib.error.URLError) as exc:
                    last = exc
            time.sleep(0.05)  # between rounds: an election in progress has no event to wait for
        raise RuntimeError(f"no etcd member answered {path}: {last}")

    def put(self, key: str, value: str | bytes) -> int:
        reply = self._call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(reply["header"]["revision"])

    def followers_first(self) -> list[str]:
        """The endpoints with the raft leader last: pausing or killing the first member then needs
        no election, so the test's own writes go through at once."""
        status = self._call("/v3/maintenance/status", {})
        leader = status["leader"]
        ids = {}
        for m in self.members:
            if m.up:
                url = f"{m.client_url}/v3/maintenance/status"
                reply = _post(url, {}, context=self.context, token=self.token)
                ids[m.client_url] = reply["header"]["member_id"]
        return sorted(self.endpoints, key=lambda e: ids.get(e) == leader)

    def delete(self, key: str) -> int:
        reply = self._call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(reply["header"]["revision"])

    def compact(self, revision: int) -> None:
        self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def enable_auth(self, root_password: str) -> None:
        """Turn authentication on (etcd needs a root user first); later calls log in as root."""
        self._call("/v3/auth/user/add", {"name": "root", "password": root_password})
        self._call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self._call("/v3/auth/enable", {})
        login = self._call("/v3/auth/authenticate", {"name": "root", "password": root_password})
        self.token = str(login["token"])

    def add_reader(self, user: str, password: str, prefix: str) -> None:
        """A user that may only read keys under `prefix`: what a portway instance needs."""
        end = bytearray(prefix.encode())
        end[-1] += 1
        perm = {"permType": "READ", "key": _b64(prefix), "range_end": _b64(bytes(end))}
        self._call("/v3/auth/role/add", {"name": f"{user}-role"})
        self._call("/v3/auth/role/grant", {"name": f"{user}-role", "perm": perm})
        self._call("/v3/auth/user/add", {"name": user, "password": password})
        self._call("/v3/auth/user/grant", {"user": user, "role": f"{user}-role"})


class RedisServer:
    """One redis-server on a free loopback port, no persistence."""

    def __init__(self, root: Path) -> None:
        self.binary = require("redis-server", "redis-server")
        self.port = free_port()
        self.root = root
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root)]
        args += ["--save", "", "--appendonly", "no"]
        with (self.root / "redis.log").open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.root / 'redis.log').read_text()[-2000:]}")
            try:
                if self.command("PING"):
                    return
            except (OSError, redis.ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)  # a process coming up: there is no event to wait for

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def command(self, *args: str | bytes) -> Any:
        """One command on a fresh connection (the server may have been restarted since the last)."""
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2) as client:
            return client.execute_command(*args)


class LogWatch(logging.Handler):
    """Counts and awaits log records whose message contains a given text (on the loop's thread)."""

    def __init__(self, logger: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(logger)
        self.messages: list[str] = []
        self._waiters: list[tuple[str, asyncio.Future[None]]] = []

    def __enter__(self) -> LogWatch:
        self.logger.addHandler(self)
        self.old_level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        for text, waiter in self._waiters:
            if text in message and not waiter.done():
                waiter.set_result(None)

    def count(self, text: str) -> int:
        return sum(text in m for m in self.messages)

    async def wait(self, text: str, within: float = 5.0) -> None:
        if self.count(text):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((text, waiter))
        async with asyncio.timeout(within):
            await waiter


class Followed(Protocol):
    async def next_snapshot(self) -> None: ...


async def until(provider: Followed, predicate: Callable[[], bool], within: float = 2.0) -> None:
    """Return once `predicate()` holds, checking after each snapshot the provider applies."""
    async with asyncio.timeout(within):
        while not predicate():
            await provider.next_snapshot()
