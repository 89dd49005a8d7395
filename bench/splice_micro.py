"""Micro-benchmark: CPU cost of moving bulk TCP through one relay process, by relay technique.

    .venv/bin/python bench/splice_micro.py                      # all modes, 4 GiB each, 3 reps
    .venv/bin/python bench/splice_micro.py --modes splice,transport --gib 2 --reps 1
    .venv/bin/python bench/splice_micro.py --go-bin /tmp/goproxy  # add the Go io.Copy peer
    .venv/bin/python bench/splice_micro.py --idle 5000           # RSS/fds per idle connection

Modes (each relay is a uvloop process on CPU 1; iperf3 client and server on CPU 0):

* ``splice``    - portway.stream.splice.SplicePump on raw sockets (own accept loop)
* ``copy``      - the pump's portable fallback (recv_into + send)
* ``transport`` - uvloop transports + Protocol: data_received -> peer.write, pause/resume
* ``go``        - an external binary taking ``-tcp ADDR -dst ADDR`` (the Go io.Copy peer)

The relay is started as ``splice_micro.py serve MODE LISTEN_PORT TARGET_PORT``. Figures are
CPU-seconds of the relay process per GiB relayed (iperf3 -n, forward and reverse).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from procs import LOAD_CPU, PROXY_CPU, spawn, stop, tree_cpu_s, tree_rss_kib_fds, wait_tcp  # noqa: E402

IPERF_PORT, ECHO_PORT, RELAY_PORT = 15301, 15302, 16100


def load_splice() -> ModuleType:
    """Import the pump; by file path when the package around it is mid-edit and not importable."""
    try:
        import portway.stream.splice as mod

        return mod
    except ImportError:
        path = HERE.parent / "src/portway/stream/splice.py"
        spec = importlib.util.spec_from_file_location("portway_splice_standalone", path)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


# --------------------------------------------------------------------------- relays (serve)


async def serve_pump(listen: int, target: int, use_splice: bool) -> None:
    splice = load_splice()
    loop = asyncio.get_running_loop()
    pipe_size = int(os.environ.get("SPLICE_PIPE_SIZE", "0"))
    pool = splice.PipePool(pipe_size=pipe_size) if pipe_size else None
    lsock = socket.create_server(("127.0.0.1", listen), backlog=4096)
    lsock.setblocking(False)

    async def handle(client: socket.socket) -> None:
        upstream = socket.socket()
        upstream.setblocking(False)
        try:
            await loop.sock_connect(upstream, ("127.0.0.1", target))
        except OSError:
            client.close()
            upstream.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def done(exc: BaseException | None) -> None:
            client.close()
            upstream.close()

        splice.start_pump(loop, client, upstream, done, use_splice=use_splice, pool=pool)

    tasks: set[asyncio.Task[None]] = set()
    while True:
        client, _ = await loop.sock_accept(lsock)
        t = loop.create_task(handle(client))
        tasks.add(t)
        t.add_done_callback(tasks.discard)


class Relay(asyncio.Protocol):
    """One side of a transport relay; ``peer`` is the other side's Relay."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Relay | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.peer is None:  # upstream still connecting (uvloop may read before pause takes)
            self.pending.append(data)
            return
        assert self.peer.transport is not None
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write_eof()
        return True  # keep the other direction open (half-close)

    def pause_writing(self) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve_transport(listen: int, target: int) -> None:
    loop = asyncio.get_running_loop()
    connecting: set[asyncio.Task[None]] = set()

    class Downstream(Relay):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            assert self.transport is not None
            self.transport.pause_reading()
            task = loop.create_task(self.connect())
            connecting.add(task)
            task.add_done_callback(connecting.discard)

        async def connect(self) -> None:
            assert self.transport is not None
            try:
                _, up = await loop.create_connection(Relay, "127.0.0.1", target)
            except OSError:
                self.transport.close()
                return
            if self.transport.is_closing():  # client left while we were connecting
                up.transport.close()  # type: ignore[union-attr]
                return
            up.peer, self.peer = self, up
            for data in self.pending:
                up.transport.write(data)  # type: ignore[union-attr]
            self.pending.clear()
            self.transport.resume_reading()

    server = await loop.create_server(Downstream, "127.0.0.1", listen, backlog=4096)
    await server.serve_forever()


def serve(mode: str, listen: int, target: int) -> None:
    import uvloop

    coro = (
        serve_transport(listen, target)
        if mode == "transport"
        else serve_pump(listen, target, mode == "splice")
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


# --------------------------------------------------------------------------- measurement


def relay_cmd(mode: str, go_bin: str | None, target: int) -> list[str]:
    if mode == "go":
        assert go_bin, "--go-bin is required for mode go"
        return [go_bin, "-tcp", f"127.0.0.1:{RELAY_PORT}", "-dst", f"127.0.0.1:{target}"]
    return [sys.executable, str(Path(__file__).resolve()), "serve", mode, str(RELAY_PORT), str(target)]


def bulk_once(mode: str, go_bin: str | None, gib: float, reverse: bool) -> dict[str, Any]:
    relay = spawn(relay_cmd(mode, go_bin, IPERF_PORT), PROXY_CPU, env={"GOMAXPROCS": "1"})
    try:
        if not wait_tcp(RELAY_PORT):
            raise RuntimeError(f"relay {mode} did not listen")
        time.sleep(0.2)
        c0 = tree_cpu_s(relay.pid)
        cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(RELAY_PORT), "-n", f"{int(gib * 1024)}M", "-J"]
        if reverse:
            cmd.append("-R")
        out = subprocess.run(
            ["taskset", "-c", str(LOAD_CPU), *cmd], capture_output=True, text=True, timeout=30 + 30 * gib
        ).stdout
        cpu = tree_cpu_s(relay.pid) - c0
    finally:
        stop(relay)
    end = json.loads(out)["end"]["sum_received"]
    got = end["bytes"] / 2**30
    return {
        "gib": round(got, 3),
        "gbit_s": round(end["bits_per_second"] / 1e9, 2),
        "cpu_s": round(cpu, 2),
        "cpu_s_per_gib": round(cpu / got, 3),
    }


def idle_once(mode: str, go_bin: str | None, n: int) -> dict[str, Any]:
    relay = spawn(relay_cmd(mode, go_bin, ECHO_PORT), PROXY_CPU, env={"GOMAXPROCS": "1"})
    try:
        if not wait_tcp(RELAY_PORT):
            raise RuntimeError(f"relay {mode} did not listen")
        time.sleep(0.5)
        r0, f0 = tree_rss_kib_fds(relay.pid)
        holder = subprocess.Popen(
            [sys.executable, str(HERE / "idle_hold.py"), str(RELAY_PORT), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdin is not None
        line = holder.stdout.readline().strip()
        time.sleep(0.5)
        r1, f1 = tree_rss_kib_fds(relay.pid)
        holder.stdin.close()
        holder.wait(60)
    finally:
        stop(relay)
    held = int(line.split()[1])
    return {
        "held": held,
        "rss_kib_per_conn": round((r1 - r0) / max(held, 1), 2),
        "fds_per_conn": round((f1 - f0) / max(held, 1), 2),
        "note": line,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="splice,copy,transport,go")
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--go-bin", default=os.environ.get("GOPROXY_BIN"))
    ap.add_argument("--idle", type=int, default=0, help="also hold N idle connections per mode")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "splice_micro.json")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m != "go" or args.go_bin]

    backends = [
        spawn(["iperf3", "-s", "-p", str(IPERF_PORT), "-B", "127.0.0.1"], LOAD_CPU),
        spawn([sys.executable, str(HERE / "echo_server.py"), str(ECHO_PORT)], LOAD_CPU),
    ]
    results: dict[str, Any] = {}
    try:
        wait_tcp(IPERF_PORT)
        wait_tcp(ECHO_PORT)
        for mode in modes:
            row: dict[str, Any] = {}
            for reverse in (False, True):
                runs = [bulk_once(mode, args.go_bin, args.gib, reverse) for _ in range(args.reps)]
                key = "bulk-R" if reverse else "bulk"
                row[key] = {
                    "runs": runs,
                    "cpu_s_per_gib": statistics.median(r["cpu_s_per_gib"] for r in runs),
                    "gbit_s": statistics.median(r["gbit_s"] for r in runs),
                }
            if args.idle:
                row["idle"] = idle_once(mode, args.go_bin, args.idle)
            results[mode] = row
            print(
                mode,
                json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in row.items()}),
                flush=True,
            )
    finally:
        for b in backends:
            stop(b)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"gib": args.gib, "reps": args.reps, "results": results}, indent=1))
    print(
        f"\n{'mode':10} {'fwd CPU-s/GiB':>14} {'rev CPU-s/GiB':>14} {'fwd Gbit/s':>11} {'rev Gbit/s':>11}"
        f" {'idle KiB/conn':>14} {'fds/conn':>9}"
    )
    nan = float("nan")
    for mode, row in results.items():
        idle = row.get("idle", {})
        print(
            f"{mode:10} {row['bulk']['cpu_s_per_gib']:>14.3f} {row['bulk-R']['cpu_s_per_gib']:>14.3f}"
            f" {row['bulk']['gbit_s']:>11.2f} {row['bulk-R']['gbit_s']:>11.2f}"
            f" {idle.get('rss_kib_per_conn', nan):>14.2f} {idle.get('fds_per_conn', nan):>9.2f}"
        )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
