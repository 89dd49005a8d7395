"""Load generators, one function per scenario. Each returns a flat dict of figures.

Every generator runs on the load CPU and stops by itself (a fixed duration or byte count).
Efficiency figures divide the proxy's CPU-seconds (measured around the call by run.py) by work
done: per GiB for bulk, per 10k connections for connection churn, per 1M requests or queries.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peers import DNS, ECHO, HTTP, HTTPS, IPERF, PROXY_TCP, PROXY_UDP
from procs import LOAD_CPU, pinned, tree_memory, tree_pids

HERE = Path(__file__).resolve().parent

#: scenario -> (backend port the proxy forwards TCP to, needs UDP)
SCENARIOS: dict[str, tuple[int, bool]] = {
    "bulk": (IPERF, False),
    "bulk-R": (IPERF, False),
    "crr": (HTTP, False),
    # New TLS connections (one request each) passed through: what an SNI route is for.
    "crr-tls": (HTTPS, False),
    "rr": (HTTP, False),
    "udp32": (DNS, True),
    "udp1000": (DNS, True),
    "idle": (ECHO, False),
    "syscalls": (HTTP, False),
}
#: Connections the ``syscalls`` scenario makes under strace (a count, not a duration: the
#: figures are per connection and deterministic, unlike anything timed under strace).
SYSCALL_CONNS = 2000
_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*(\w+)\s*$")


def _run(cmd: list[str], timeout: float) -> str:
    return subprocess.run(pinned(LOAD_CPU, cmd), capture_output=True, text=True, timeout=timeout).stdout


def iperf(port: int, secs: float, reverse: bool) -> dict[str, Any]:
    cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{secs:g}", "-J"] + (
        ["-R"] if reverse else []
    )
    doc = json.loads(_run(cmd, secs + 30))
    if "error" in doc:
        raise RuntimeError(f"iperf3: {doc['error']}")
    end = doc["end"]["sum_received"]
    return {"gbit_s": round(end["bits_per_second"] / 1e9, 2), "gib": round(end["bytes"] / 2**30, 3)}


def wrk(port: int, secs: float, close: bool, conns: int = 32, tls: bool = False) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{secs:g}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    # TLS: https://localhost/ so that wrk sends SNI "localhost" (an SNI route matches on it).
    url = f"https://localhost:{port}/" if tls else f"http://127.0.0.1:{port}/"
    out = _run([*cmd, url], secs + 30)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise RuntimeError(f"wrk output not understood: {out[-300:]!r}")
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99_ms = None
    if p99:
        p99_ms = float(p99.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    return {
        "req_s": round(float(rps.group(1))),
        "requests": int(total.group(1)),
        "p99_ms": p99_ms,
        "errors": (errors.group(1) if errors else "") + (f" non2xx {non2xx.group(1)}" if non2xx else ""),
    }


def dnsperf(port: int, secs: float, clients: int, tmp: Path) -> dict[str, Any]:
    """dnsperf with ``clients`` sockets (``-c``): each is a distinct UDP session for the proxy.

    dnsperf opens at most 256 sockets per thread (checked with /proc/PID/fd: ``-c 1000`` alone
    gives 256), so ``-T`` is raised to reach the requested number of distinct source ports."""
    queries = tmp / "queries.txt"
    queries.write_text("bench.test A\n" * 100)
    cmd = [
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-d",
        str(queries),
        "-l",
        f"{secs:g}",
        "-c",
        str(clients),
        "-T",
        str(max(1, -(-clients // 256))),
        "-q",
        str(max(100, clients)),
        "-t",
        "2",
    ]
    out = _run(cmd, secs + 30)
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    if not qps:
        raise RuntimeError(f"dnsperf output not understood: {out[-300:]!r}")
    done = re.search(r"Queries completed:\s+(\d+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    return {
        "qps": round(float(qps.group(1))),
        "queries": int(done.group(1)) if done else 0,
        "lost": int(lost.group(1)) if lost else None,
        "clients": clients,
    }


def idle(port: int, proxy_pid: int, n: int) -> dict[str, Any]:
    """Hold ``n`` proxied connections (each verified by a one-byte echo); report the proxy
    tree's RSS and open descriptors per connection."""
    r0, p0, f0 = tree_memory(proxy_pid)
    holder = subprocess.Popen(
        pinned(LOAD_CPU, [sys.executable, str(HERE / "idle_hold.py"), str(port), str(n)]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        line = holder.stdout.readline().strip()
        time.sleep(0.5)  # let lazily freed buffers settle before reading RSS
        r1, p1, f1 = tree_memory(proxy_pid)
    finally:
        holder.stdin.close()
        try:
            holder.wait(60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
    held = int(line.split()[1]) if line.startswith("held") else 0
    return {
        "held": held,
        "rss_kib_per_conn": round((r1 - r0) / held, 2) if held else None,
        "pss_kib_per_conn": round((p1 - p0) / held, 2) if held else None,
        "fds_per_conn": round((f1 - f0) / held, 2) if held else None,
        "rss_mib": round(r1 / 1024, 1),
        "note": line if "failed" in line else "",
    }


def syscalls(port: int, proxy_pid: int, tmp: Path, n: int = SYSCALL_CONNS) -> dict[str, Any]:
    """System calls the proxy makes per short connection: ``strace -c -f`` on its whole process
    tree while ``n`` sequential HTTP/1.0 requests with ``Connection: close`` go through it."""
    if shutil.which("strace") is None:
        return {"skipped": "strace is not installed"}
    out = tmp / "strace.txt"
    attach = [a for pid in tree_pids(proxy_pid) for a in ("-p", str(pid))]
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-q", "-o", str(out), *attach], stderr=subprocess.DEVNULL
    )
    time.sleep(1.0)  # attaching is asynchronous; nothing here is timed
    request = b"GET / HTTP/1.0\r\nHost: bench\r\nConnection: close\r\n\r\n"
    done = 0
    for _ in range(n):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(request)
                while s.recv(65536):
                    pass
            done += 1
        except OSError:
            pass
    time.sleep(0.5)  # let the proxy finish closing the last connection
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=30)
    calls: dict[str, int] = {}
    failed = 0
    for line in out.read_text().splitlines():
        m = _STRACE_ROW.match(line)
        if m and m.group(3) != "total":
            calls[m.group(3)] = int(m.group(1))
            failed += int(m.group(2) or 0)
    if not done:
        return {"skipped": "no connection got through"}
    r: dict[str, Any] = {
        "conns": done,
        "syscalls_per_conn": round(sum(calls.values()) / done, 2),
        "failed_per_conn": round(failed / done, 2),
    }
    for name, count in sorted(calls.items(), key=lambda kv: -kv[1]):
        if count / done >= 0.01:
            r[f"n_{name}"] = round(count / done, 2)
    return r


def run(scenario: str, secs: float, tmp: Path, proxy_pid: int | None, idle_n: int) -> dict[str, Any]:
    """Run one scenario against the proxy (or straight at the backend when ``proxy_pid`` is None)."""
    direct = proxy_pid is None
    tcp = SCENARIOS[scenario][0] if direct else PROXY_TCP
    udp = DNS if direct else PROXY_UDP
    if scenario in ("bulk", "bulk-R"):
        return iperf(tcp, secs, reverse=scenario == "bulk-R")
    if scenario in ("crr", "rr", "crr-tls"):
        return wrk(tcp, secs, close=scenario != "rr", tls=scenario == "crr-tls")
    if scenario in ("udp32", "udp1000"):
        return dnsperf(udp, secs, clients=32 if scenario == "udp32" else 1000, tmp=tmp)
    if scenario == "idle":
        assert proxy_pid is not None
        return idle(tcp, proxy_pid, idle_n)
    if scenario == "syscalls":
        if proxy_pid is None:
            return {"skipped": "no proxy to trace"}
        return syscalls(tcp, proxy_pid, tmp)
    raise ValueError(f"unknown scenario {scenario!r}")


def efficiency(scenario: str, r: dict[str, Any]) -> None:
    """Add the noise-robust CPU-per-work figures to a scenario result in place."""
    cpu = r.get("proxy_cpu_s")
    if cpu is None:
        return
    if scenario in ("bulk", "bulk-R") and r.get("gib"):
        r["cpu_s_per_gib"] = round(cpu / r["gib"], 3)
    elif scenario in ("crr", "crr-tls") and r.get("requests"):
        r["cpu_s_per_10k_conn"] = round(cpu / r["requests"] * 1e4, 3)
    elif scenario == "rr" and r.get("requests"):
        r["cpu_s_per_1m_req"] = round(cpu / r["requests"] * 1e6, 2)
    elif scenario.startswith("udp") and r.get("queries"):
        r["cpu_s_per_1m_q"] = round(cpu / r["queries"] * 1e6, 2)
