"""Active health probes: the I/O edge that feeds `Balancer.probe_result`.

Each probe opens its own socket, does one check within ``timeout`` seconds (the whole check, not
each step), always closes the socket, and returns ``(ok, reason)`` where the reason is a short
human string for the state-change log line. Probes never raise for anything the network does.
They use only ``loop.sock_*`` calls, so they behave the same on uvloop and stock asyncio, and a
new socket per probe means a late reply or ICMP error from an earlier probe can never be
mistaken for this one's.

What each kind of check can and cannot detect:

- **TCP, connect only**: the port accepts connections (host up, something listening, accept queue
  not full). Cannot see a server that accepts and then hangs, or answers garbage.
- **TCP with send/expect**: also that the service answers the probe correctly within the timeout;
  catches a hung server (accepts, never answers) and a wrong reply. ``expect`` as bytes must be a
  prefix of the reply; as a compiled regex it must match (``search``) within the first
  `REPLY_LIMIT` bytes.
- **UDP with expect**: a real request datagram (``send``) and a reply that matches, within the
  timeout: the only UDP check that proves the service works. Silence is "down".
- **UDP without expect** (nginx's rule): a datagram (``send``, or an empty one) goes out and the
  target is down only if an ICMP port unreachable comes back (``ECONNREFUSED`` on the connected
  socket); silence, or any reply, is "up". This detects "host up, nothing bound to the port" (a
  crashed or stopped server). It cannot detect a hung server, a dead host (no ICMP at all), or
  anything behind a firewall that drops datagrams or ICMP, and hosts rate-limit ICMP errors, so it
  is a cheap liveness hint, not proof.
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket

__all__ = [
    "REPLY_LIMIT",
    "Expect",
    "compile_expect_regex",
    "first_probe_in",
    "format_escapes",
    "next_probe_in",
    "parse_escapes",
    "probe_tcp",
    "probe_udp",
]

Expect = bytes | re.Pattern[bytes]

#: Bytes of a TCP reply read while looking for `expect`: bounds a probe's memory whatever the target sends.
REPLY_LIMIT = 4096

#: Largest UDP datagram a reply can be.
_DATAGRAM_MAX = 65535

_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\", "0": b"\0"}
_HEX = frozenset("0123456789abcdefABCDEF")


def parse_escapes(text: str) -> bytes:
    """The bytes of a config ``send``/``expect`` string: UTF-8, with \\r \\n \\t \\\\ \\0 \\xHH.

    Anything else after a backslash is refused rather than kept literally, so a typo such as
    ``\\R`` cannot silently change the bytes on the wire.
    """
    if "\\" not in text:
        return text.encode()
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        j = text.find("\\", i)
        if j < 0:
            out += text[i:].encode()
            break
        out += text[i:j].encode()
        if j + 1 >= n:
            raise ValueError(f"lone backslash at the end of {text!r} (write \\\\ for a backslash)")
        c = text[j + 1]
        if c in _ESCAPES:
            out += _ESCAPES[c]
            i = j + 2
        elif c == "x":
            digits = text[j + 2 : j + 4]
            if len(digits) != 2 or not set(digits) <= _HEX:
                raise ValueError(f"\\x at position {j} of {text!r} needs two hex digits, got {digits!r}")
            out.append(int(digits, 16))
            i = j + 4
        else:
            raise ValueError(
                f"unknown escape \\{c} at position {j} of {text!r} (known: \\r \\n \\t \\\\ \\0 \\xHH)"
            )
    return bytes(out)


def format_escapes(data: bytes) -> str:
    """The inverse of `parse_escapes`: printable ASCII as is, everything else escaped (for logs, docs)."""
    out: list[str] = []
    for b in data:
        if b == 0x5C:
            out.append("\\\\")
        elif b == 0x0D:
            out.append("\\r")
        elif b == 0x0A:
            out.append("\\n")
        elif b == 0x09:
            out.append("\\t")
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)


def compile_expect_regex(text: str) -> re.Pattern[bytes]:
    """An ``expect_regex`` value as a bytes pattern; the regex syntax does its own escapes (\\d, \\r)."""
    try:
        return re.compile(text.encode())
    except re.error as exc:
        raise ValueError(f"bad regular expression {text!r}: {exc}") from None


def first_probe_in(interval: float, u: float) -> float:
    """Seconds until a target's first probe, for `u` uniform in [0, 1): a random phase in the interval.

    Starting every target's checks at once (at startup or after a reload) would send a burst of
    probes each interval, to the targets and through the prober's own event loop.
    """
    return interval * u


def next_probe_in(interval: float, u: float, spread: float = 0.2) -> float:
    """Seconds until the next probe: `interval` within +-spread/2, for `u` uniform in [0, 1).

    The jitter keeps phases from drifting back into step (probes that take their timeout would
    otherwise all slip by the same amount); the mean stays exactly `interval`.
    """
    return interval * (1.0 + spread * (u - 0.5))


def _describe(exc: OSError) -> str:
    known = {
        errno.ECONNREFUSED: "connection refused",
        errno.ECONNRESET: "connection reset",
        errno.EHOSTUNREACH: "host unreachable",
        errno.ENETUNREACH: "network unreachable",
        errno.EADDRNOTAVAIL: "address not available",
        errno.EPIPE: "connection closed while sending",
    }
    return known.get(exc.errno or 0) or exc.strerror or type(exc).__name__


def _shown(data: bytes) -> str:
    return format_escapes(data[:32]) + ("..." if len(data) > 32 else "")


def _judge(expect: Expect, reply: bytes) -> bool | None:
    """True/False once `reply` decides the check, None while more bytes could still decide it."""
    if isinstance(expect, bytes):
        if len(reply) >= len(expect):
            return reply.startswith(expect)
        return None if expect.startswith(reply) else False
    if expect.search(reply):
        return True
    return None


async def probe_tcp(
    family: int,
    addr: tuple[str, int],
    timeout: float,
    send: bytes = b"",
    expect: Expect | None = None,
) -> tuple[bool, str]:
    """Connect to `addr` (an IP literal), optionally send `send` and check the reply against `expect`."""
    loop = asyncio.get_running_loop()
    stage = "connecting"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, addr)
            if send:
                stage = "sending"
                await loop.sock_sendall(sock, send)
            if expect is None:
                return True, "connected"
            stage = "waiting for reply"
            reply = b""
            while True:
                verdict = _judge(expect, reply)
                if verdict is not None:
                    return (
                        (True, "reply matched")
                        if verdict
                        else (False, f"reply did not match: {_shown(reply)}")
                    )
                if len(reply) >= REPLY_LIMIT:
                    return False, f"reply did not match in {REPLY_LIMIT} bytes: {_shown(reply)}"
                data = await loop.sock_recv(sock, REPLY_LIMIT - len(reply))
                if not data:
                    if not reply:
                        return False, "connection closed without a reply"
                    return False, f"connection closed before the reply matched: {_shown(reply)}"
                reply += data
    except TimeoutError:
        return False, f"timeout {stage}"
    except OSError as exc:
        return False, _describe(exc)
    finally:
        sock.close()


async def probe_udp(
    family: int,
    addr: tuple[str, int],
    timeout: float,
    send: bytes = b"",
    expect: Expect | None = None,
) -> tuple[bool, str]:
    """Send one datagram (`send`, or an empty one) to `addr`; see the module docstring for the verdicts.

    With `expect`, the first reply decides (a connected socket only receives from `addr`).
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect(addr)  # no packet: it fixes the peer, so ICMP errors for it reach this socket
        try:
            sock.send(
                send
            )  # direct: a datagram socket's buffer is almost never full, and b"" must go out too
        except BlockingIOError:
            await loop.sock_sendall(sock, send)
        try:
            async with asyncio.timeout(timeout):
                reply = await loop.sock_recv(sock, _DATAGRAM_MAX)
        except TimeoutError:
            if expect is None:
                return True, "no reply and no ICMP unreachable"
            return False, "timeout waiting for reply"
        if expect is None:
            return True, "replied"
        if _judge(expect, reply):
            return True, "reply matched"
        return False, f"reply did not match: {_shown(reply)}"
    except ConnectionRefusedError:
        return False, "port unreachable (ICMP)"
    except OSError as exc:
        return False, _describe(exc)
    finally:
        sock.close()
