"""A real Prometheus server (Debian's `prometheus`), started by a test to scrape portway's admin
listener every second, and queried through its HTTP API.

Synchronous on purpose: Prometheus does not care which event loop the test runs, so these tests run
once (the admin listener in its own thread) rather than once per loop.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.ports import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class Prometheus:
    def __init__(self, workdir: Path, target: str, *, token: str | None = None) -> None:
        if not os.access(PROMETHEUS, os.X_OK):
            pytest.skip("the prometheus binary is missing (Debian package `prometheus`)")
        self.workdir = workdir
        self.target = target
        self.token = token
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        auth = f"    authorization:\n      credentials: {self.token}\n" if self.token else ""
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: portway\n"
            f"{auth}    static_configs:\n      - targets: ['{self.target}']\n"
        )
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of `expr` (an empty list while Prometheus has no such series yet)."""
        try:
            doc = self._get("/api/v1/query", {"query": expr})
        except OSError:  # not listening yet
            return []
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def wait_value(self, expr: str, want: float, timeout: float = 20.0) -> float:
        """Poll until `expr` (a single series) equals `want` in a scrape; returns what it last saw."""
        deadline = time.monotonic() + timeout
        seen = float("nan")
        while time.monotonic() < deadline:
            result = self.query(expr)
            if len(result) == 1:
                seen = float(result[0]["value"][1])
                if seen == want:
                    return seen
            time.sleep(0.2)  # polling another process's API: there is no event to await
        return seen

    def wait_scrapes(self, count: int, timeout: float = 20.0) -> None:
        """Return once Prometheus has scraped `count` more times (the `up` sample's time moves)."""
        deadline = time.monotonic() + timeout
        last, seen = None, -1
        while seen < count and time.monotonic() < deadline:
            result = self.query("timestamp(up)")
            stamp = result[0]["value"][1] if result else None
            if stamp != last:
                last, seen = stamp, seen + 1
            time.sleep(0.1)
        assert seen >= count, "Prometheus stopped scraping"

    def target_health(self) -> str:
        try:
            doc = self._get("/api/v1/targets", {})
        except OSError:
            return "down"
        targets = doc["data"]["activeTargets"]
        return str(targets[0]["health"]) if targets else "unknown"
