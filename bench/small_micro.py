"""Small messages: is `recv_into` + `send` cheaper than the pump's two splices? (issue 12)

One process relays messages of SIZE bytes from one loopback TCP connection to another, either
with the pump's two `splice` calls through a pipe or with `recv_into` + `send`, and reports the
process CPU time per message round (sender, relay and receiver all included, so only the
difference between the two lines matters). Run it pinned, e.g.:

    taskset -c 1 .venv/bin/python bench/small_micro.py 64 512 4096 16384
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable

N = 20000
FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


def pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        c = socket.create_connection(lsock.getsockname())
        s, _ = lsock.accept()
    for x in (c, s):
        x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c, s


def main(sizes: list[int]) -> None:
    a1, a2 = pair()
    b1, b2 = pair()
    a2.setblocking(False)
    b1.setblocking(False)
    r, w = os.pipe2(os.O_NONBLOCK)
    buf = memoryview(bytearray(16384))
    sink = bytearray(65536)

    def via_splice() -> None:
        got = os.splice(a2.fileno(), w, 262144, flags=FLAGS)
        os.splice(r, b1.fileno(), got, flags=FLAGS)

    def via_copy() -> None:
        got = a2.recv_into(buf)
        b1.send(buf[:got])

    relays: list[tuple[str, Callable[[], None]]] = [("splice", via_splice), ("copy", via_copy)]
    for size in sizes:
        msg = b"x" * size
        for name, relay in relays * 2:
            t0 = time.process_time()
            for _ in range(N):
                a1.send(msg)
                while True:
                    try:
                        relay()
                        break
                    except BlockingIOError:
                        pass
                got = 0
                while got < size:
                    got += b2.recv_into(sink)
            dt = time.process_time() - t0
            print(f"{name:6} {size:6} bytes  {dt / N * 1e6:6.2f} us CPU per message round")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [64, 512, 4096, 16384])
