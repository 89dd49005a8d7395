"""Backends the proxies forward to, and the proxies themselves (portway and its Debian peers).

Every proxy gets the same job: a TCP listener on 127.0.0.1:PROXY_TCP forwarding to one backend
port, and (where the proxy can) a UDP listener on 127.0.0.1:PROXY_UDP forwarding to dnsmasq.
Each proxy is configured the way its documentation recommends for one core: HAProxy
``nbthread 1``, nginx ``worker_processes 1``, socat one process per connection (its only mode),
portway one worker unless ``--workers`` says otherwise.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from procs import LOAD_CPU, PROXY_CPU, spawn, stop, wait_tcp

HERE = Path(__file__).resolve().parent
#: BENCH_PORT_OFFSET moves every port, so two benches can run on one machine at once.
_OFF = int(os.environ.get("BENCH_PORT_OFFSET", "0"))
IPERF, HTTP, DNS, ECHO, HTTPS = 15201 + _OFF, 15280 + _OFF, 15353 + _OFF, 15400 + _OFF, 15443 + _OFF
PROXY_TCP, PROXY_UDP = 16000 + _OFF, 16053 + _OFF
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


@dataclass
class Proxy:
    """How to run one proxy forwarding TCP to ``dst`` (and UDP to dnsmasq when ``udp``)."""

    name: str
    command: Callable[[Path, int], list[str]]  # (workdir, tcp target port) -> argv
    udp: bool
    env: dict[str, str] = field(default_factory=dict)
    idle_cap: int | None = None  # most idle connections worth holding (process-per-conn peers)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def portway_bin(env: str = "PORTWAY_BIN") -> str:
    return os.environ.get(env) or str(HERE.parent / ".venv" / "bin" / "portway")


#: Port of the bench's admin listener in the ``portway-admin`` variant.
ADMIN = 16090 + _OFF


def _portway(
    workers: int | None, variant: str = "", env: str = "PORTWAY_BIN"
) -> Callable[[Path, int], list[str]]:
    """portway's config; ``variant`` ``pool`` forwards TCP to a pool of three targets (three
    ports of the same nginx for the HTTP scenarios), ``admin`` turns the admin listener and
    metrics on: both must cost what the plain route costs, within noise. ``sni``: the TCP route
    sits on a shared listener, chosen by SNI (``localhost``, what wrk sends for
    https://localhost/), beside a fallback route to the same backend that takes everything else
    (plain HTTP included): every connection pays the peek. ``nohc``: the route has
    ``half_close: false``, the semantics of nginx's default (the like-for-like pair to
    ``nginx``, as ``portway`` is to ``nginx-hc``)."""

    def cmd(tmp: Path, dst: int) -> list[str]:
        head = f"workers: {workers}\n" if workers else ""
        if variant == "admin":
            head += f"admin:\n  listen: 127.0.0.1:{ADMIN}\n"
        target = "host: 127.0.0.1"
        if variant == "pool":
            ports = (dst, dst + 1, dst + 2) if dst == HTTP else (dst,)
            target = "targets:" + "".join(f"\n      - 127.0.0.1:{p}" for p in ports)
        extra = ""  # route t's lines after its port, and any route beside it
        if variant == "nohc":
            extra = "    half_close: false\n"
        if variant == "sni":
            extra = f"""    match: {{sni: [localhost]}}
  fallback:
    scheme: tcp4
    host: 127.0.0.1
    bind: 127.0.0.1
    port: {PROXY_TCP}:{dst}
"""
        cfg = f"""{head}routes:
  t:
    scheme: tcp4
    {target}
    bind: 127.0.0.1
    port: {PROXY_TCP}:{dst}
{extra}  u:
    scheme: udp4
    host: 127.0.0.1
    bind: 127.0.0.1
    port: {PROXY_UDP}:{DNS}
"""
        # At its default log level, an INFO line per accepted connection (the method;
        # the peers' configs log nothing per connection, so that line is portway's cost alone).
        return [portway_bin(env), "serve", "-c", str(_write(tmp / "portway.yaml", cfg))]

    return cmd


def _haproxy(tmp: Path, dst: int) -> list[str]:
    cfg = f"""global
  maxconn 9000  # fds needed ~2x+: must stay under the 20000 open-files limit
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
listen t
  bind 127.0.0.1:{PROXY_TCP}
  server s1 127.0.0.1:{dst}
"""
    return ["haproxy", "-db", "-f", str(_write(tmp / "haproxy.cfg", cfg))]


def _nginx(tmp: Path, dst: int, half_close: bool = False) -> list[str]:
    # proxy_half_close (nginx 1.21.4+, off by default): forward a FIN and keep relaying the
    # other way, as portway, HAProxy and the Go peer always do. Off, nginx closes both sides at
    # the first FIN: a short connection then ends without waiting for the client's own FIN.
    tcp_extra = " proxy_half_close on;" if half_close else ""
    cfg = f"""load_module {NGINX_STREAM_MODULE};
daemon off; pid {tmp}/nginx-stream.pid; error_log {tmp}/nginx-stream.err; worker_processes 1;
worker_rlimit_nofile 20000;
events {{ worker_connections 16000; }}
stream {{
  server {{ listen 127.0.0.1:{PROXY_TCP}; proxy_pass 127.0.0.1:{dst};{tcp_extra} }}
  server {{ listen 127.0.0.1:{PROXY_UDP} udp; proxy_pass 127.0.0.1:{DNS}; proxy_timeout 30s; }}
}}
"""
    return ["nginx", "-c", str(_write(tmp / "nginx-stream.conf", cfg))]


def _socat(tmp: Path, dst: int) -> list[str]:
    return [
        "socat",
        f"TCP4-LISTEN:{PROXY_TCP},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
        f"TCP4:127.0.0.1:{dst}",
    ]


def _goproxy(binary: str) -> Callable[[Path, int], list[str]]:
    def cmd(tmp: Path, dst: int) -> list[str]:
        return [
            binary,
            "-tcp",
            f"127.0.0.1:{PROXY_TCP}",
            "-udp",
            f"127.0.0.1:{PROXY_UDP}",
            "-dst",
            f"127.0.0.1:{dst}",
        ]

    return cmd


#: Known but left out of run.py's default list (named with --proxies to run).
OPT_IN = frozenset({"nginx-hc", "portway-nohc"})


def proxies(workers: int | None = None) -> dict[str, Proxy]:
    """All known proxies. ``goproxy`` appears only when GOPROXY_BIN names a built binary taking
    ``-tcp ADDR -udp ADDR -dst ADDR`` (the bench never builds or fetches it itself)."""
    table = {
        "portway": Proxy("portway", _portway(workers), udp=True),
        # The same route behind a shared listener that routes by SNI (docs/shared-ports.md).
        "portway-sni": Proxy("portway-sni", _portway(workers, "sni"), udp=True),
        "portway-pool": Proxy("portway-pool", _portway(workers, "pool"), udp=True),
        "portway-admin": Proxy("portway-admin", _portway(workers, "admin"), udp=True),
        "portway-nohc": Proxy("portway-nohc", _portway(workers, "nohc"), udp=True),
        # The same build on its pure-Python core (what runs where the C extension was not built):
        # the compiled core's gain, measured in one run.
        "portway-python": Proxy("portway-python", _portway(workers), udp=True, env={"PORTWAY_FASTPATH": "0"}),
        "haproxy": Proxy("haproxy", _haproxy, udp=False),
        "nginx": Proxy("nginx", _nginx, udp=True),
        # nginx with the half-close semantics portway keeps: the like-for-like peer for short
        # connections (bench/README.md, "Issue 12, seventh round").
        "nginx-hc": Proxy("nginx-hc", functools.partial(_nginx, half_close=True), udp=True),
        # One process per connection: thousands of idle socat processes measure fork, not relaying.
        "socat": Proxy("socat", _socat, udp=False, idle_cap=500),
    }
    if os.environ.get("PORTWAY_BIN_B"):
        # A second build of portway in the same run (before/after a change): ratios from one run.
        table["portway-b"] = Proxy("portway-b", _portway(workers, env="PORTWAY_BIN_B"), udp=True)
    go = os.environ.get("GOPROXY_BIN")
    if go:
        table["goproxy"] = Proxy("goproxy", _goproxy(go), udp=True, env={"GOMAXPROCS": "1"})
    return table


def start_proxy(proxy: Proxy, tmp: Path, dst: int) -> subprocess.Popen[bytes]:
    if wait_tcp(PROXY_TCP, timeout=0.01):
        # Another bench on this machine: its proxy would be measured instead of ours.
        raise RuntimeError(f"port {PROXY_TCP} is taken already: set BENCH_PORT_OFFSET")
    p = spawn(proxy.command(tmp, dst), PROXY_CPU, env=proxy.env)
    if not wait_tcp(PROXY_TCP, timeout=20) or p.poll() is not None:
        stop(p)
        raise RuntimeError(f"{proxy.name} did not listen on {PROXY_TCP} (is it installed?)")
    return p


def start_backends(tmp: Path) -> list[subprocess.Popen[bytes]]:
    """iperf3 server, nginx HTTP, dnsmasq and a TCP echo server, all on the load CPU."""
    cert, key = tmp / "https.crt", tmp / "https.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    http = f"""daemon off; pid {tmp}/nginx-http.pid; error_log {tmp}/nginx-http.err; worker_processes 1;
worker_rlimit_nofile 20000;
events {{ worker_connections 16000; }}
http {{ access_log off;
  server {{ listen 127.0.0.1:{HTTP} backlog=4096; listen 127.0.0.1:{HTTP + 1} backlog=4096;
    listen 127.0.0.1:{HTTP + 2} backlog=4096; keepalive_requests 10000000;
    location / {{ return 200 "hello world\\n"; }} }}
  server {{ listen 127.0.0.1:{HTTPS} ssl backlog=4096; ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_session_tickets off; ssl_session_cache off;
    location / {{ return 200 "hello world\\n"; }} }} }}
"""
    procs = [
        spawn(["iperf3", "-s", "-p", str(IPERF), "-B", "127.0.0.1"], LOAD_CPU),
        spawn(["nginx", "-c", str(_write(tmp / "nginx-http.conf", http))], LOAD_CPU),
        spawn(
            [
                "dnsmasq",
                "--no-daemon",
                f"--port={DNS}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--address=/bench.test/10.1.2.3",
                f"--pid-file={tmp}/dnsmasq.pid",
                "--user=root",
                "--cache-size=1000",
                "--dns-forward-max=10000",
            ],
            LOAD_CPU,
        ),
        spawn([sys.executable, str(HERE / "echo_server.py"), str(ECHO)], LOAD_CPU),
    ]
    for port in (IPERF, HTTP, ECHO, HTTPS):
        if not wait_tcp(port):
            for p in procs:
                stop(p)
            raise RuntimeError(f"backend on port {port} did not start")
    return procs
