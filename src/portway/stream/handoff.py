"""Connections a shared listener hands to the route it chose, on either engine, TLS or not.

The `portway.stream.shared.SharedListener` has accepted the socket, read the PROXY header (so
it knows the real client) and consumed the first bytes while peeking. `serve_accepted` continues
the normal lifecycle of the chosen route's `TCPStream` from there: the route's ACL and limits,
pick a target, dial, send the consumed bytes first, relay. Passthrough stays on the splice
engine (zero-copy after the peek); TLS termination runs on the transport engine.

TLS termination uses `ssl.MemoryBIO` + `SSLObject` rather than `loop.start_tls`: the bytes the
listener already consumed (the ClientHello it peeked at) are simply written into the incoming
BIO, the handshake runs in the same protocol callbacks as the relay, and there is no second
transport to wire up. The cost is one user-space copy in and out of OpenSSL per chunk
(docs/shared-ports.md has the figure per GiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

from portway.stream.base import Address
from portway.stream.tcp import TCPStream, _abort, _AdmittingClient, _Client, _close, _write, _write_eof
from portway.stream.tcp_splice import SpliceConn

__all__ = ["serve_accepted"]

#: Plaintext read from OpenSSL per call: one TLS record is at most 16 KiB.
_READ = 64 * 1024


def serve_accepted(
    stream: TCPStream,
    sock: socket.SocketType,
    peer: Any,
    *,
    initial: bytes,
    client: Address,
    local: Address | None,
) -> None:
    """`stream` takes over `sock` (accepted and peeked by a shared listener; it owns it now)."""
    if stream.tls is None and stream.uses_splice_engine():
        SpliceConn(stream, sock, peer).start_handed(client, local, initial)
        return
    factory = _TLSClient if stream.tls is not None else _HandedClient
    # The acceptor hands out the C-level socket type; asyncio's transports want socket.socket.
    full = socket.socket(sock.family, sock.type, 0, sock.detach())

    async def adopt() -> None:
        try:
            await stream.loop.connect_accepted_socket(lambda: factory(stream, client, local, initial), full)
        except OSError:
            full.close()

    task = stream.loop.create_task(adopt())
    _adopting.add(task)
    task.add_done_callback(_adopting.discard)


#: Adoptions in progress (a task nobody references may be collected before it runs).
_adopting: set[asyncio.Task[None]] = set()


class _HandedClient(_AdmittingClient):
    """The transport engine's client for a handed-over connection: admission is past the header."""

    __slots__ = ("handed",)

    def __init__(self, stream: TCPStream, client: Address, local: Address | None, initial: bytes) -> None:
        super().__init__(stream)
        self.handed = (client, local, initial)

    def _accepted(self, transport: asyncio.BaseTransport) -> None:
        super()._accepted(transport)
        client, local, _ = self.handed
        if local is None:  # the listener only asks when a PROXY header may replace it
            sockname = transport.get_extra_info("sockname")
            local = (sockname[0], sockname[1]) if sockname else None
        self.client, self.local = client, local

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._accepted(transport)
        initial = self.handed[2]
        if initial:
            _Client.data_received(self, initial)  # not dialed yet: this only queues
        self._admit()


class _TLSClient(_HandedClient):
    """Terminates TLS: ciphertext from the client goes through an `SSLObject`, plaintext on."""

    __slots__ = ("early", "incoming", "outgoing", "tls")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._accepted(transport)
        initial = self.handed[2]
        assert self.stream.tls is not None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        # The context current when accepted: a certificate reload never touches this connection.
        self.tls: ssl.SSLObject | None = self.stream.tls.context.wrap_bio(
            self.incoming, self.outgoing, server_side=True
        )
        #: What the target sent before the handshake finished (a server-speaks-first service).
        self.early: list[bytes] | None = []
        self._admit()
        if initial and not self.closed and self.transport is not None and not self.transport.is_closing():
            self.data_received(initial)

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        tls = self.tls
        if tls is None:
            return
        try:
            if self.early is not None:
                tls.do_handshake()
                early, self.early = self.early, None
                for chunk in early:
                    tls.write(chunk)
            while chunk := tls.read(_READ):
                _Client.data_received(self, chunk)
            self._clear_eof()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify: the client is done sending
            self._clear_eof()
        except ssl.SSLError as exc:
            self._flush()  # the alert, so the client learns why
            self._failed(exc)
            return
        self._flush()

    def _clear_eof(self) -> None:
        if not self.client_eof:
            _Client.eof_received(self)

    def _failed(self, exc: ssl.SSLError) -> None:
        self.tls = None
        self.stream.refused(self.client, f"TLS handshake failed: {exc.reason or exc}")
        self.reason = "error"
        _close(self.transport)
        _abort(self.target)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            _write(self.transport, data)

    def target_data(self, data: bytes) -> None:
        self.idle = 0
        self.down += len(data)
        tls = self.tls
        if tls is None:
            return
        if self.early is not None:
            self.early.append(data)
            return
        try:
            tls.write(data)
        except ssl.SSLError as exc:
            self._failed(exc)
            return
        self._flush()

    def target_eof_received(self) -> None:
        self.target_eof = True
        tls = self.tls
        if tls is not None and self.early is None:
            with contextlib.suppress(ssl.SSLError):
                tls.unwrap()  # queues our close_notify; the client's reply is not awaited
            self._flush()
        _write_eof(self.transport)
        self._maybe_finish()
