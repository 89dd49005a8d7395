"""CPU-seconds per GiB that TLS termination costs portway, against plain splice passthrough.

    PORTWAY_BIN=... python bench/tls_cost.py --mib 512

portway runs as its own process with two routes to one discard server: `plain` (splice
passthrough) and `tls` (terminated with a throwaway certificate, plaintext to the target). A
client pushes the same bytes through each; the figure is portway's CPU time (user+system, from
/proc) divided by GiB moved. The client's own TLS cost is not counted.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peers import portway_bin  # noqa: E402
from procs import tree_cpu_s, wait_tcp  # noqa: E402

PLAIN, TLS = 16200, 16201


def discard_server() -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=drain, args=(conn,), daemon=True).start()

    def drain(conn: socket.socket) -> None:
        with conn:
            while conn.recv(1 << 20):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return int(srv.getsockname()[1])


def push(port: int, total: int, ctx: ssl.SSLContext | None) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    conn: socket.socket = ctx.wrap_socket(sock, server_hostname="localhost") if ctx else sock
    chunk = os.urandom(256 * 1024)
    sent = 0
    while sent < total:
        conn.sendall(chunk)
        sent += len(chunk)
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="portway-tls-"))
    cert, key = tmp / "c.pem", tmp / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    sink = discard_server()
    cfg = tmp / "portway.yml"
    common = "    scheme: tcp4\n    bind: 127.0.0.1\n    host: 127.0.0.1\n"
    cfg.write_text(
        f"routes:\n  plain:\n{common}    port: {PLAIN}:{sink}\n"
        f"  tls:\n{common}    port: {TLS}:{sink}\n    tls: {{cert: {cert}, key: {key}}}\n"
    )
    proc = subprocess.Popen([portway_bin(), "serve", "-c", str(cfg), "--log-level", "warning"])
    try:
        assert wait_tcp(PLAIN) and wait_tcp(TLS), "portway did not start"
        ctx = ssl.create_default_context(cafile=str(cert))
        total = args.mib * 2**20
        for name, port, context in (("plain (splice)", PLAIN, None), ("tls terminated", TLS, ctx)):
            c0, t0 = tree_cpu_s(proc.pid), time.monotonic()
            push(port, total, context)
            time.sleep(0.5)  # let the proxy finish relaying what is buffered
            cpu, wall = tree_cpu_s(proc.pid) - c0, time.monotonic() - t0
            gib = total / 2**30
            print(f"{name:16} {cpu / gib:6.2f} CPU-s/GiB  ({gib / wall * 8:.2f} Gbit/s wall, {gib:.2f} GiB)")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
