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


def setup_logging(level: str = "info", fmt: LogFormat = "console") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger("portway")
    root.handlers[:] = [handler]
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
