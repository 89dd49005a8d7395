"""Logging: stdlib `logging` with a console and a JSON-lines formatter.

Why stdlib rather than structlog: the hot path only ever asks `isEnabledFor`, which is a cached
integer compare in stdlib logging, and records carry structured fields through `extra=`; the
two formatters below are all we need, with no extra dependency to keep in step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

LogFormat = Literal["console", "json"]

# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

#: Field order for console lines: the ones the issue tracker and grep care about come first.
_ORDER = ("route", "action", "protocol", "listen", "dst", "client")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class ConsoleFormatter(logging.Formatter):
    """``2026-11-24T20:50:01 INFO  route started  route=ssh protocol=tcp4->tcp4 listen=...``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        fields = _fields(record)
        ordered = [k for k in _ORDER if k in fields] + sorted(k for k in fields if k not in _ORDER)
        kv = " ".join(f"{k}={_console_value(fields[k])}" for k in ordered)
        line = f"{ts} {record.levelname:<5} {record.getMessage()}"
        if kv:
            line += "  " + kv
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _console_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (" " in text or not text) else text


class JSONFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes lines in batches, and takes pre-rendered connection lines.

    A proxy logs every accepted connection; one `write` per line is a syscall per connection.
    Lines are collected and written once per batch (at most `FLUSH_DELAY` later, at once for
    warnings and errors, which also keeps their order with what came before). Lines from other
    threads (the Docker watcher) are written at once.
    """

    FLUSH_DELAY = 0.05
    MAX_BATCH = 512

    def __init__(self, stream: Any, fmt: LogFormat) -> None:
        super().__init__(stream)
        self.fmt = fmt
        self.setFormatter(JSONFormatter() if fmt == "json" else ConsoleFormatter())
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._add(line, urgent=record.levelno >= logging.WARNING)

    def write_line(self, line: str) -> None:
        """Add a pre-rendered line (see `ConnectionLog`)."""
        with self.lock:  # type: ignore[union-attr]
            self._add(line, urgent=False)

    def _add(self, line: str, *, urgent: bool) -> None:
        self._lines.append(line)
        if urgent or len(self._lines) >= self.MAX_BATCH:
            self._write()
            return
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._write()
                return
            self._timer = loop.call_later(self.FLUSH_DELAY, self._flush_soon)

    def _flush_soon(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._timer = None
            self._write()

    def _write(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or a broken pipe must never take the proxy down

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()


class ConnectionLog:
    """INFO lines for accepted connections, rendered once per stream and finished per client.

    Building a LogRecord, copying the fields and formatting them costs more than the rest of
    accepting a connection; the fields are the same for every connection of a stream, so the
    line is pre-rendered and only the timestamp and client are filled in. Used only while
    `setup_logging` installed a `BatchingHandler` and INFO is enabled; otherwise streams log
    through `logging` as usual.
    """

    __slots__ = ("_console_tail", "_handler", "_json", "_json_prefix")

    def __init__(self, handler: BatchingHandler, logger: str, message: str, fields: dict[str, str]) -> None:
        self._handler = handler
        self._json = handler.fmt == "json"
        ordered = [k for k in _ORDER if k in fields and k != "client"]
        ordered += sorted(k for k in fields if k not in _ORDER)
        kv = " ".join(f"{k}={_console_value(fields[k])}" for k in ordered)
        #: Everything of a console line after its timestamp, up to the client.
        self._console_tail = f" INFO  {message}  {kv} client="
        head = {"level": "info", "logger": logger, "event": message, **fields}
        self._json_prefix = json.dumps(head, default=str)[1:-1]

    def log(self, client: str) -> None:
        now = time.time()
        if self._json:
            line = f'{{"ts": {now:.6f}, {self._json_prefix}, "client": "{client}"}}'
        else:
            line = f"{_console_time(now)}{self._console_tail}{client}"
        self._handler.write_line(line)


_last_second = -1
_last_stamp = ""


def _console_time(now: float) -> str:
    global _last_second, _last_stamp
    second = int(now)
    if second != _last_second:
        _last_second, _last_stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
    return _last_stamp


def connection_log(logger: logging.Logger, message: str, fields: dict[str, str]) -> ConnectionLog | None:
    """A fast per-connection logger for `fields`, or None to log through `logger` as usual."""
    if not logger.isEnabledFor(logging.INFO):
        return None
    root = logging.getLogger("portway")
    handlers = root.handlers
    if len(handlers) != 1 or not isinstance(handlers[0], BatchingHandler):
        return None
    return ConnectionLog(handlers[0], logger.name, message, fields)


def setup_logging(level: str = "info", fmt: LogFormat = "console") -> None:
    root = logging.getLogger("portway")
    root.handlers[:] = [BatchingHandler(sys.stderr, fmt)]
    root.setLevel(level.upper())
    root.propagate = False


class BurstLog:
    """Log the first event of a burst, count the rest, and report the count when it resumes.

    A flood (EMFILE on every accept, a full UDP session table, denied scans) must not turn into
    a log flood that costs more CPU than the traffic itself.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._window_start = float("-inf")
        self._suppressed = 0

    def hit(self) -> tuple[bool, int]:
        """(log now?, how many were suppressed since the last logged one)."""
        now = self.clock()
        if now - self._window_start >= self.interval:
            self._window_start = now
            suppressed, self._suppressed = self._suppressed, 0
            return True, suppressed
        self._suppressed += 1
        return False, 0


class LoopErrorLog:
    """Routes the event loop's own error reports into our logs, rate-limited.

    Stock asyncio reports "socket.accept() out of system resource" every time it retries accept
    while descriptors are exhausted (it backs off a second between tries): one log line per
    burst is useful, one per second for the whole outage is noise.
    """

    def __init__(self) -> None:
        self._exhausted = BurstLog(30.0)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "event loop error"))
        exc = context.get("exception")
        if "out of system resource" in message:
            emit, suppressed = self._exhausted.hit()
            if emit:
                logging.getLogger("portway").error(
                    "accept failed: out of file descriptors; backing off",
                    extra={"action": "accept", "error": str(exc), "suppressed": suppressed},
                )
            return
        logging.getLogger("portway").error(
            message, extra={"action": "loop", "error": repr(exc) if exc else None}
        )
