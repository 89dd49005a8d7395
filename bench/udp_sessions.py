"""UDP session cost: memory per session, and no growth per datagram once sessions exist.

Starts portway (a udp4 route to a UDP echo target), opens N client sockets (N distinct client
addresses, so N sessions), sends one datagram from each, reads the proxy's RSS, then sends
ROUNDS more datagrams from every client and reads RSS again. A relay that allocates per
datagram (a task, a buffer copy kept around) grows in the second phase; portway must not.

    .venv/bin/python bench/udp_sessions.py --sessions 10000 --rounds 20

Prints one JSON line. The soft limit of open files (20,000 here) bounds N: this process holds N
client sockets and the proxy N session sockets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import tree_memory, wait_tcp

HERE = Path(__file__).resolve().parent


def echo_target() -> tuple[subprocess.Popen[bytes], int]:
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('127.0.0.1',0))\n"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_RCVBUF,8<<20)\n"
        "print(s.getsockname()[1],flush=True)\n"
        "while True:\n d,a=s.recvfrom(65535);s.sendto(d,a)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def exchange(clients: list[socket.socket], payload: bytes, timeout: float = 30.0) -> int:
    """Send one datagram from every client and collect the replies; returns how many came back."""
    sel = selectors.DefaultSelector()
    for c in clients:
        sel.register(c, selectors.EVENT_READ)
    got = 0
    batch = 256
    deadline = time.monotonic() + timeout
    for i in range(0, len(clients), batch):
        for c in clients[i : i + batch]:
            c.send(payload)
        want = min(batch, len(clients) - i)
        seen = 0
        while seen < want and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                try:
                    while True:
                        key.fileobj.recv(65535)  # type: ignore[union-attr]
                        seen += 1
                except BlockingIOError:
                    pass
        got += seen
    sel.close()
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.sessions + 200)), hard))

    target, target_port = echo_target()
    tmp = Path(tempfile.mkdtemp(prefix="pw-udp-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        tcp_port = probe.getsockname()[1]
    # The TCP route only tells us when portway listens; its target is a socket that never accepts.
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        udp_port = probe.getsockname()[1]
    config = tmp / "p.yml"
    config.write_text(
        "routes:\n"
        "  u:\n    scheme: udp4\n    host: 127.0.0.1\n    bind: 127.0.0.1\n"
        f"    port: {udp_port}:{target_port}\n"
        f"    udp_max_sessions: {args.sessions + 10}\n"
        "  probe:\n    scheme: tcp4\n    host: 127.0.0.1\n    bind: 127.0.0.1\n"
        f"    port: {tcp_port}:{sink.getsockname()[1]}\n"
    )
    portway = os.environ.get("PORTWAY_BIN", str(HERE.parent / ".venv" / "bin" / "portway"))
    proxy = subprocess.Popen([portway, "serve", "-c", str(config), "--log-level", "warning"])
    clients: list[socket.socket] = []
    try:
        assert wait_tcp(tcp_port), "portway did not start"
        base_rss, _, base_fds = tree_memory(proxy.pid)
        for _ in range(args.sessions):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.connect(("127.0.0.1", udp_port))
            c.setblocking(False)
            clients.append(c)
        payload = b"x" * args.size
        first = exchange(clients, payload)
        rss1, _, fds1 = tree_memory(proxy.pid)
        replies = 0
        for _ in range(args.rounds):
            replies += exchange(clients, payload)
        rss2, _, fds2 = tree_memory(proxy.pid)
        datagrams = 2 * args.rounds * args.sessions
        print(
            json.dumps(
                {
                    "sessions": args.sessions,
                    "first_round_replies": first,
                    "later_replies": replies,
                    "kib_per_session": round((rss1 - base_rss) / args.sessions, 2),
                    "fds_per_session": round((fds1 - base_fds) / args.sessions, 2),
                    "rss_mib_after_sessions": round(rss1 / 1024, 1),
                    "rss_growth_kib_over_rounds": rss2 - rss1,
                    "bytes_growth_per_datagram": round((rss2 - rss1) * 1024 / datagrams, 4),
                    "datagrams_relayed_after": datagrams,
                    "fd_growth": fds2 - fds1,
                }
            )
        )
    finally:
        for c in clients:
            c.close()
        proxy.terminate()
        proxy.wait(10)
        target.terminate()
        target.wait()


if __name__ == "__main__":
    main()
