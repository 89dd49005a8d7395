"""The admin listener: ``GET /metrics``, ``GET /api/status`` and the status page, over HTTP/1.1.

Two layers, as everywhere in portway: `AdminApp.respond` decides (path, method, token -> status,
headers, body) with no I/O and is tested with plain values; `AdminServer` is the thin asyncio edge.

Why h11 and not aiohttp: three read-only GET endpoints need a correct HTTP/1.1 parser, not a web
framework; h11 is a sans-I/O parser with a bound on incomplete headers built in (a client cannot
make us buffer more than `MAX_HEADER_BYTES`), it adds one small pure-Python package, and the loop
stays ours. The bounds below are what keep a scanner or a slowloris from holding the listener:
- `HEADER_TIMEOUT`: a request's head must arrive within this, and an idle keep-alive connection
  is closed after it;
- `MAX_HEADER_BYTES`: a longer request head is answered 431 and closed;
- `MAX_CONNECTIONS`: past this many open admin connections, new ones are closed at once;
- request bodies are never read: no endpoint takes one (405/404 and close).

Authentication: with ``token_file``, every endpoint but the page itself requires
``Authorization: Bearer <token>`` (``/metrics`` too unless ``metrics_public``). The page is
static HTML with no data in it; it reads ``?token=`` once, keeps it in sessionStorage and sends it
as the bearer token to ``/api/status``, so the token never sits in a URL the browser re-requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import h11

from portway.addr import parse_hostport
from portway.errors import BindError, ConfigError

__all__ = [
    "AdminApp",
    "AdminServer",
    "Response",
    "is_loopback_host",
    "load_page",
    "read_token_file",
]

log = logging.getLogger("portway.admin")

HEADER_TIMEOUT = 10.0
MAX_HEADER_BYTES = 8192
MAX_CONNECTIONS = 64

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
_GET = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


def _text(status: int, message: str, *extra: tuple[str, str]) -> Response:
    body = (message + "\n").encode()
    return Response(status, body, [("Content-Type", "text/plain; charset=utf-8"), *extra])


def load_page() -> bytes:
    """The status page, shipped as package data."""
    return resources.files("portway").joinpath("admin_page.html").read_bytes()


def read_token_file(path: str) -> str:
    """The bearer token (first line, stripped), or a `ConfigError` naming ``admin.token_file``."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read {path}: {reason}", field="admin.token_file") from None
    if not token:
        raise ConfigError(f"{path} is empty; it must hold the bearer token", field="admin.token_file")
    return token


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AdminApp:
    """What each request gets: pure, no sockets (the three producers are called per request)."""

    def __init__(
        self,
        *,
        metrics: Callable[[], bytes],
        status: Callable[[], bytes],
        page: bytes | None = None,
        token: str | None = None,
        metrics_public: bool = False,
    ) -> None:
        self.metrics = metrics
        self.status = status
        self.page = page if page is not None else load_page()
        self.token = token
        self.metrics_public = metrics_public

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.token is None:
            return True
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self.token.encode())

    def respond(self, method: str, target: str, headers: dict[str, str]) -> Response:
        path = urlsplit(target).path
        if path not in ("/", "/metrics", "/api/status"):
            return _text(404, "not found")
        if method not in _GET:
            return _text(405, "method not allowed", ("Allow", "GET, HEAD"))
        if path == "/":
            return Response(
                200,
                self.page,
                [
                    ("Content-Type", "text/html; charset=utf-8"),
                    (
                        "Content-Security-Policy",
                        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                        "connect-src 'self'; img-src data:",
                    ),
                ],
            )
        public = path == "/metrics" and self.metrics_public
        if not public and not self._authorized(headers):
            return _text(401, "a bearer token is required", ("WWW-Authenticate", 'Bearer realm="portway"'))
        try:
            if path == "/metrics":
                return Response(200, self.metrics(), [("Content-Type", PROMETHEUS_TEXT)])
            return Response(200, self.status(), [("Content-Type", "application/json")])
        except Exception:
            log.exception("admin: cannot produce %s", path)
            return _text(500, "internal error")


class AdminServer:
    """The asyncio edge: one listener, h11 per connection, the bounds of the module docstring."""

    def __init__(self, app: AdminApp, listen: str) -> None:
        self.app = app
        self.listen = listen
        self.local_addr: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        hp = parse_hostport(self.listen)
        host = hp.host or None  # ":9108": every address (the config allowed it explicitly)
        try:
            self._server = await asyncio.start_server(
                self._serve_client, host, hp.port, reuse_address=True, limit=MAX_HEADER_BYTES
            )
        except OSError as exc:
            raise BindError(f"admin: cannot listen on {self.listen}: {exc.strerror or exc}") from None
        sock = self._server.sockets[0].getsockname()
        self.local_addr = (sock[0], sock[1])
        log.info("admin listening", extra={"listen": f"{self.url}", "action": "start"})

    @property
    def url(self) -> str:
        assert self.local_addr is not None
        host, port = self.local_addr
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._conns.add(task)
        try:
            await self._converse(reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, h11.LocalProtocolError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        while True:
            try:
                async with asyncio.timeout(HEADER_TIMEOUT):
                    event = await _next_request(conn, reader)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                await _send(writer, conn, _text(status, "bad request"), head_only=False, close=True)
                return
            if event is None:
                return
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            method = event.method.decode("ascii", "replace")
            response = self.app.respond(method, event.target.decode("latin-1"), headers)
            # A request with a body (no endpoint takes one) is answered and the connection closed.
            has_body = "content-length" in headers and headers["content-length"] != "0"
            close = has_body or "transfer-encoding" in headers or conn.our_state is h11.MUST_CLOSE
            await _send(writer, conn, response, head_only=method == "HEAD", close=close)
            if close or conn.our_state is h11.MUST_CLOSE:
                return
            # A bodiless request's end is already parsed: consume it so both sides are DONE.
            if not isinstance(conn.next_event(), h11.EndOfMessage):
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return


async def _next_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    """The next request's head, or None when the client closed between requests."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(4096)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None
        raise h11.RemoteProtocolError("unexpected event", error_status_hint=400)


async def _send(
    writer: asyncio.StreamWriter, conn: h11.Connection, response: Response, *, head_only: bool, close: bool
) -> None:
    headers = [
        *response.headers,
        ("Content-Length", str(len(response.body))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
    ]
    if close:
        headers.append(("Connection", "close"))
    try:
        reason = HTTPStatus(response.status).phrase.encode()
        data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    except h11.LocalProtocolError:
        # The client's half was unparseable: h11 will not frame a response; write a bare one.
        bare = f"HTTP/1.1 {response.status} Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        writer.write(bare.encode())
        await asyncio.wait_for(writer.drain(), HEADER_TIMEOUT)
        return
    body = b"" if head_only else response.body
    writer.write(data + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    await asyncio.wait_for(writer.drain(), HEADER_TIMEOUT)


class AdminThread:
    """An `AdminServer` on a loop of its own in a thread, for a process that runs no loop."""

    def __init__(self, make_server: Callable[[], AdminServer]) -> None:
        self.make_server = make_server
        self.server: AdminServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="portway-admin", daemon=True)

    def start(self) -> None:
        """Returns once listening; raises what `AdminServer.start` raised."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            self.server = self.make_server()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stopped.wait()
            await self.server.stop()

        asyncio.run(main())

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(5)
