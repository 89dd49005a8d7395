"""Process plumbing for the bench: CPU pinning, /proc accounting, readiness, clean shutdown.

Everything here reads /proc directly so the figures mean the same for every proxy: CPU time is
user+system of the proxy's whole process tree (workers included), RSS and descriptors likewise.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")
TWO_CPUS = (os.cpu_count() or 1) >= 2
#: The proxy gets CPU 1 to itself; BENCH_PROXY_CPUS=0,1 lets it use both (to show workers
#: scaling; it then shares CPU 0 with the load, so compare runs made the same way only).
PROXY_CPU: int | str = os.environ.get("BENCH_PROXY_CPUS", "1")
LOAD_CPU = 0


def pinned(cpu: int | str, cmd: Sequence[str]) -> list[str]:
    """Prefix ``cmd`` with taskset when there are two CPUs to separate proxy from load."""
    return ["taskset", "-c", str(cpu), *cmd] if TWO_CPUS else list(cmd)


def tree_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return out


def tree_cpu_s(pid: int) -> float:
    """utime+stime of ``pid``, its live descendants and their reaped children, in seconds."""
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def tree_rss_kib_fds(pid: int) -> tuple[int, int]:
    """Summed VmRSS (KiB) and open descriptors of the process tree."""
    rss, _, fds = tree_memory(pid)
    return rss, fds


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(RSS KiB, PSS KiB, fds) summed over the tree. RSS double-counts pages shared between
    processes (fork-per-connection peers like socat); PSS splits them fairly."""
    rss = pss = fds = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                rss += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            with open(f"/proc/{p}/smaps_rollup") as f:
                pss += next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (OSError, StopIteration):
            pass
    return rss, pss, fds


def wait_tcp(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection((host, port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def spawn(
    cmd: Sequence[str], cpu: int | str, env: dict[str, str] | None = None, quiet: bool = True
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` pinned to ``cpu`` in its own session, so stop() can signal the whole group."""
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(
        pinned(cpu, cmd), env={**os.environ, **(env or {})}, stdout=out, stderr=out, start_new_session=True
    )


def stop(p: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL after 5 s. Only ever signals groups this bench started."""
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    except ProcessLookupError:
        pass
