"""Running `portway` as a real subprocess, as a user would, and reading its JSON log lines."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

PORTWAY = [sys.executable, "-m", "portway"]


class PortwayProcess:
    """`portway serve` with JSON logs; `started` maps route name -> its "route started" record."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.records: list[dict[str, Any]] = []
        self.started: dict[str, dict[str, Any]] = {}

    @classmethod
    async def serve(
        cls, config: Path, loop_kind: str, *extra: str, preexec_fn: Any = None, env: dict[str, str] | None = None
    ) -> PortwayProcess:
        proc = await asyncio.create_subprocess_exec(
            *PORTWAY, "serve", "-c", str(config), "--log-format", "json", "--loop", loop_kind, *extra,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, preexec_fn=preexec_fn,
            env={**os.environ, **(env or {})},
        )
        return cls(proc)

    async def next_record(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stderr is not None
        line = await asyncio.wait_for(self.proc.stderr.readline(), timeout)
        if not line:
            raise EOFError("portway exited")
        record: dict[str, Any] = json.loads(line)
        self.records.append(record)
        if record.get("event") == "route started":
            self.started[record["route"]] = record
        return record

    async def wait_for(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            record = await self.next_record(max(0.1, deadline - loop.time()))
            if record.get("event") == event:
                return record

    def port_of(self, route: str) -> int:
        listen: str = self.started[route]["listen"]
        return int(listen.rsplit(":", 1)[1])

    async def stop(self, timeout: float = 10.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            assert self.proc.stderr is not None
            rest = await asyncio.wait_for(self.proc.stderr.read(), timeout)
            for line in rest.splitlines():
                self.records.append(json.loads(line))
            return await asyncio.wait_for(self.proc.wait(), timeout)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


async def run_cli(*args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *PORTWAY, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
