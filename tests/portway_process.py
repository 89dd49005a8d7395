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
    """`portway serve` with JSON logs, read continuously so a chatty proxy never blocks on its pipe.

    `started` maps route name -> its "route started" record; `wait_for` awaits a log event.
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.records: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.started: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Condition()
        self._eof = False
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def serve(
        cls,
        config: Path,
        loop_kind: str,
        *extra: str,
        preexec_fn: Any = None,
        env: dict[str, str] | None = None,
        grace: float | None = 3.0,
    ) -> PortwayProcess:
        """`grace` is passed as ``--grace`` (None: the file's grace_period, 10s unless written)."""
        grace_flag = ["--grace", str(grace)] if grace is not None else []
        proc = await asyncio.create_subprocess_exec(
            *PORTWAY,
            "serve",
            "-c",
            str(config),
            "--log-format",
            "json",
            "--loop",
            loop_kind,
            *grace_flag,
            *extra,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=preexec_fn,
            env={**os.environ, **(env or {})},
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while True:
            line = await self.proc.stderr.readline()
            async with self._changed:
                if not line:
                    self._eof = True
                    self._changed.notify_all()
                    return
                text = line.decode(errors="replace").rstrip("\n")
                self.raw.append(text)
                try:
                    record: dict[str, Any] = json.loads(text)
                except ValueError:
                    record = {"event": "<not json>", "text": text}
                self.records.append(record)
                if record.get("event") == "route started":
                    self.started[record["route"]] = record
                self._changed.notify_all()

    async def wait_for(self, event: str, timeout: float = 10.0, after: int = 0) -> dict[str, Any]:
        """The first record with this event (from index `after` on), waiting for it if need be."""

        def find() -> dict[str, Any] | None:
            for record in self.records[after:]:
                if record.get("event") == event:
                    return record
            if self._eof:
                raise EOFError(f"portway exited before logging {event!r}: {self.raw[-5:]}")
            return None

        async def wait() -> dict[str, Any]:
            async with self._changed:
                found = await self._changed.wait_for(find)
                assert found is not None
                return found

        return await asyncio.wait_for(wait(), timeout)

    def children(self) -> list[int]:
        """The pids of the supervisor's children (with workers: the control plane and the workers)."""
        pid = self.proc.pid
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def port_of(self, route: str) -> int:
        listen: str = self.started[route]["listen"]
        return int(listen.rsplit(":", 1)[1])

    async def stop(self, timeout: float = 10.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = await asyncio.wait_for(self.proc.wait(), timeout)
            await asyncio.wait_for(self._reader, timeout)
            return status
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            self._reader.cancel()


def route_yaml(name: str, *, scheme: str, port: str, host: str = "127.0.0.1", bind: str = "127.0.0.1") -> str:
    """One route of a config file, indented to sit under `routes:`."""
    return f"  {name}:\n    scheme: {scheme}\n    host: {host}\n    bind: {bind}\n    port: {port}\n"


async def run_cli(*args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *PORTWAY, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
