"""Log lines: the pre-rendered connection line must read exactly like a formatted record."""

from __future__ import annotations

import io
import json
import logging

import pytest

from portway.logs import BatchingHandler, BurstLog, ConnectionLog, ConsoleFormatter, JSONFormatter

FIELDS = {"route": "ssh", "protocol": "tcp4->tcp4", "listen": "0.0.0.0:2222", "dst": "10.0.0.3:22"}


def _record(client: str) -> logging.LogRecord:
    record = logging.LogRecord("portway.tcp", logging.INFO, __file__, 1, "accepted", (), None)
    for key, value in {**FIELDS, "client": client, "action": "accept"}.items():
        setattr(record, key, value)
    return record


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_connection_line_matches_the_formatter(fmt: str) -> None:
    out = io.StringIO()
    handler = BatchingHandler(out, fmt)  # type: ignore[arg-type]
    fast = ConnectionLog(handler, "portway.tcp", "accepted", {**FIELDS, "action": "accept"})
    fast.log("127.0.0.1:5555")  # no running loop: written at once
    record = _record("127.0.0.1:5555")
    fast_line = out.getvalue().rstrip("\n")
    if fmt == "json":
        slow, quick = json.loads(JSONFormatter().format(record)), json.loads(fast_line)
        slow.pop("ts")
        quick.pop("ts")
        assert quick == slow
    else:
        record.created = 0
        slow_line = ConsoleFormatter().format(record)
        assert fast_line.split(" ", 1)[1] == slow_line.split(" ", 1)[1]  # equal but for the time


async def test_batching_handler_writes_once_per_batch_and_errors_at_once() -> None:
    out = io.StringIO()
    handler = BatchingHandler(out, "console")  # type: ignore[arg-type]
    logger = logging.getLogger("portway.test-batching")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.info("one")
    logger.info("two")
    assert out.getvalue() == ""  # waiting for the batch
    logger.error("boom")  # flushes what came before, in order
    lines = [line.split()[-1] for line in out.getvalue().splitlines()]
    assert lines == ["one", "two", "boom"]


def test_burst_log_counts_what_it_suppresses() -> None:
    now = [0.0]
    burst = BurstLog(10.0, clock=lambda: now[0])
    assert burst.hit() == (True, 0)
    assert burst.hit() == (False, 0)
    assert burst.hit() == (False, 0)
    now[0] = 10.0
    assert burst.hit() == (True, 2)
