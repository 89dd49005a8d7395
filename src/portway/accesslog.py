"""The access log: one line per finished TCP connection and per ended UDP session.

Off the data path: `AccessLog.closed` only appends the record to a bounded deque (O(1), no
formatting, no syscall); a writer thread renders and writes whatever has gathered every
`FLUSH_INTERVAL` seconds, in one ``write`` per batch. A slow or full disk therefore blocks or fails
only that thread: once `MAX_PENDING` records wait, new ones are dropped and counted
(``portway_access_log_dropped_total``) instead of growing memory or stalling a connection; lines
lost to a failing write are counted the same way.

Rotation follows nginx's convention: logrotate renames the file, then sends SIGUSR1, and the
writer reopens the path before its next batch (`reopen` is safe to call from a signal handler).
Each batch is a single ``O_APPEND`` write of whole lines, so workers sharing one file never
interleave within a line.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import threading
import time
from typing import Literal

from portway.addr import format_hostport
from portway.errors import ConfigError
from portway.events import ConnectionRecord, Protocol_

__all__ = ["AccessLog", "AccessLogFormat", "render_json", "render_text"]

AccessLogFormat = Literal["json", "text"]

#: Records waiting for the writer: ~64k records is ~20 MB at worst, seconds of a connection flood.
MAX_PENDING = 65536
#: Lines reach the file at most this late.
FLUSH_INTERVAL = 0.2


#: (second, its text): one tuple, so the writer threads of two logs never mix halves of two.
_stamp: tuple[int, str] = (-1, "")


def _iso(ts: float) -> str:
    """RFC 3339 UTC with milliseconds; the seconds part is formatted once per second."""
    global _stamp
    whole = int(ts)
    second, text = _stamp
    if whole != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _stamp = (whole, text)
    return f"{text}.{int((ts - whole) * 1000):03d}Z"


_quoted: dict[str, str] = {}


def _json_str(text: str) -> str:
    """`json.dumps(text)`, remembered: routes and targets are few (cleared if they are not)."""
    q = _quoted.get(text)
    if q is None:
        if len(_quoted) > 4096:
            _quoted.clear()
        q = _quoted[text] = json.dumps(text)
    return q


def render_json(r: ConnectionRecord) -> str:
    """One JSON object; built by hand (the field set is fixed) at a third of `json.dumps`' cost."""
    client = format_hostport(r.client[0], r.client[1])  # an IP and a port: nothing to escape
    target = "null" if r.target is None else _json_str(r.target)
    line = (
        f'{{"time":"{_iso(r.started + r.duration)}","route":{_json_str(r.route)},'
        f'"protocol":"{r.protocol}","client":"{client}","target":{target},'
        f'"duration":{round(r.duration, 6)!r},"bytes_client_to_target":{r.bytes_client_to_target},'
        f'"bytes_target_to_client":{r.bytes_target_to_client},'
    )
    if r.protocol == "udp":
        line += (
            f'"datagrams_client_to_target":{r.datagrams_client_to_target},'
            f'"datagrams_target_to_client":{r.datagrams_target_to_client},'
        )
    return line + f'"reason":"{r.reason}"}}'


def _text_value(text: str) -> str:
    if not text or any(c in text for c in ' ="\\') or not text.isprintable():
        return _json_str(text)
    return text


def render_text(r: ConnectionRecord) -> str:
    """``time=... route=ssh protocol=tcp client=... target=... duration=... ... reason=normal``"""
    target = "-" if r.target is None else _text_value(r.target)
    line = (
        f"time={_iso(r.started + r.duration)} route={_text_value(r.route)} protocol={r.protocol} "
        f"client={format_hostport(r.client[0], r.client[1])} target={target} "
        f"duration={round(r.duration, 6)!r} bytes_client_to_target={r.bytes_client_to_target} "
        f"bytes_target_to_client={r.bytes_target_to_client} "
    )
    if r.protocol == "udp":
        line += (
            f"datagrams_client_to_target={r.datagrams_client_to_target} "
            f"datagrams_target_to_client={r.datagrams_target_to_client} "
        )
    return line + f"reason={r.reason}"


class AccessLog:
    """An `events.Observer` writing the access log from a thread of its own."""

    def __init__(self, path: str, fmt: AccessLogFormat = "json") -> None:
        self.path = path
        self.render = render_json if fmt == "json" else render_text
        self._pending: collections.deque[ConnectionRecord] = collections.deque()
        # Two counters, each written by one thread only, so neither needs a lock.
        self._dropped_full = 0
        self._dropped_write = 0
        self._fd = -1
        self._reopen = False
        self._stopping = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def dropped(self) -> int:
        return self._dropped_full + self._dropped_write

    def start(self) -> None:
        """Open the file (a `ConfigError` naming ``access_log.path`` if it cannot be) and start writing."""
        try:
            self._fd = self._open()
        except OSError as exc:
            raise ConfigError(f"cannot open {self.path}: {exc.strerror}", field="access_log.path") from None
        self._thread = threading.Thread(target=self._run, name="portway-access-log", daemon=True)
        self._thread.start()

    def _open(self) -> int:
        if self.path == "-":
            return 1
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    # -- the Observer protocol

    def accepted(self, route: str, protocol: Protocol_) -> None:
        pass

    def dialed(self, route: str, target: str, seconds: float) -> None:
        pass

    def closed(self, record: ConnectionRecord) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._dropped_full += 1
            return
        self._pending.append(record)

    def datagram_dropped(self, route: str, reason: str) -> None:
        pass

    # -- control

    def reopen(self) -> None:
        """Reopen the path before the next batch (logrotate's SIGUSR1); signal-handler safe."""
        self._reopen = True
        self._wake.set()

    def flush(self, timeout: float = 5.0) -> None:
        """Wake the writer now (for tests and shutdown); returns once the queue is empty or `timeout`."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while (self._pending or self._wake.is_set()) and time.monotonic() < deadline:
            time.sleep(0.005)

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is pending (for at most `timeout`) and close the file."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._fd > 2:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1

    # -- the writer thread

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            if self._reopen:
                self._reopen = False
                self._do_reopen()
            self._write_pending()
            self._wake.clear()
            if self._stopping:
                self._write_pending()
                return

    def _do_reopen(self) -> None:
        if self.path == "-":
            return
        try:
            fd = self._open()
        except OSError:
            return  # keep writing to the old file rather than lose lines; retried on the next SIGUSR1
        old, self._fd = self._fd, fd
        with contextlib.suppress(OSError):
            os.close(old)

    def _write_pending(self) -> None:
        pending = self._pending
        while pending:
            batch: list[str] = []
            count = 0
            while pending and count < 4096:
                record = pending.popleft()
                count += 1
                try:
                    batch.append(self.render(record))
                except (ValueError, TypeError):
                    self._dropped_write += 1
            if not batch:
                continue
            data = ("\n".join(batch) + "\n").encode("utf-8", "backslashreplace")
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except OSError:
                self._dropped_write += len(batch)  # disk full, file gone: count, never raise
