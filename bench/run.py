"""portway's L4 benchmark: portway against HAProxy, nginx stream and socat on loopback.

    bench/setup.sh                                   # once: Debian peers, backends, load generators
    .venv/bin/python bench/run.py                    # everything, 5 s per scenario, 3 repetitions
    .venv/bin/python bench/run.py --proxies portway,haproxy --scenarios bulk,crr --duration 3 --reps 1

See bench/README.md for what each scenario measures and how to read the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios
from peers import OPT_IN, proxies, start_backends, start_proxy
from procs import TWO_CPUS, stop, tree_cpu_s

HERE = Path(__file__).resolve().parent

#: (scenario, figure, label, higher is better) - the columns of the table and the chart panels.
COLUMNS: list[tuple[str, str, str, bool]] = [
    ("bulk", "gbit_s", "bulk Gbit/s", True),
    ("bulk", "cpu_s_per_gib", "bulk CPU-s/GiB", False),
    ("bulk-R", "gbit_s", "bulk-R Gbit/s", True),
    ("bulk-R", "cpu_s_per_gib", "bulk-R CPU-s/GiB", False),
    ("crr", "req_s", "new conn/s", True),
    ("crr", "cpu_s_per_10k_conn", "CPU-s/10k conn", False),
    ("crr-tls", "req_s", "new TLS conn/s", True),
    ("crr-tls", "cpu_s_per_10k_conn", "CPU-s/10k TLS conn", False),
    ("rr", "req_s", "keep-alive req/s", True),
    ("rr", "cpu_s_per_1m_req", "CPU-s/1M req", False),
    ("udp32", "qps", "UDP qps (32)", True),
    ("udp32", "cpu_s_per_1m_q", "CPU-s/1M q (32)", False),
    ("udp1000", "qps", "UDP qps (1000)", True),
    ("udp1000", "cpu_s_per_1m_q", "CPU-s/1M q (1000)", False),
    ("syscalls", "syscalls_per_conn", "syscalls/conn", False),
    ("syscalls", "failed_per_conn", "failed syscalls/conn", False),
    ("idle", "rss_kib_per_conn", "idle KiB/conn", False),
    ("idle", "pss_kib_per_conn", "idle PSS KiB/conn", False),
    ("idle", "fds_per_conn", "idle fds/conn", False),
]


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric figure across repetitions; other fields from the last run."""
    out: dict[str, Any] = dict(runs[-1])
    for key in runs[-1]:
        values = [
            r[key] for r in runs if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
        ]
        if values and len(values) == len(runs):
            out[key] = round(statistics.median(values), 3)
    out["reps"] = len(runs)
    return out


def measure_once(name: str, scenario: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    dst, needs_udp = scenarios.SCENARIOS[scenario]
    if name == "direct":
        if scenario == "idle":
            return {"skipped": "no proxy to measure"}
        r = scenarios.run(scenario, args.duration, tmp, None, args.idle_n)
        r["proxy_cpu_s"] = None
        return r
    proxy = proxies(args.workers)[name]
    if needs_udp and not proxy.udp:
        return {"skipped": f"{name} does not proxy UDP"}
    idle_n = min(args.idle_n, proxy.idle_cap or args.idle_n)
    p = start_proxy(proxy, tmp, dst)
    try:
        time.sleep(0.3)
        c0, t0 = tree_cpu_s(p.pid), time.monotonic()
        r = scenarios.run(scenario, args.duration, tmp, p.pid, idle_n)
        r["proxy_cpu_s"] = round(tree_cpu_s(p.pid) - c0, 3)
        r["wall_s"] = round(time.monotonic() - t0, 2)
        if p.poll() is not None:
            r["note"] = f"proxy exited with status {p.returncode}"
    finally:
        stop(p)
        time.sleep(0.3)
    scenarios.efficiency(scenario, r)
    return r


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each proxy's figure divided by the best *peer's* (portway and direct excluded), per column.
    >1 is better for throughput columns, <1 is better for cost columns."""
    out: dict[str, dict[str, float]] = {name: {} for name in results}
    for scen, fig, label, higher in COLUMNS:
        peer_values = [
            r[scen][fig]
            for name, r in results.items()
            if not name.startswith(("portway", "direct"))
            and isinstance(r.get(scen, {}).get(fig), int | float)
        ]
        if not peer_values:
            continue
        best = max(peer_values) if higher else min(peer_values)
        if not best:
            continue
        for name, r in results.items():
            v = r.get(scen, {}).get(fig)
            if isinstance(v, int | float):
                out[name][label] = round(v / best, 2)
    return out


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def print_table(results: dict[str, dict[str, Any]], rat: dict[str, dict[str, float]]) -> str:
    names = list(results)
    lines = []
    head = f"{'figure':20}" + "".join(f"{n:>18}" for n in names)
    lines += [head, "-" * len(head)]
    for scen, fig, label, higher in COLUMNS:
        if not any(fig in results[n].get(scen, {}) for n in names):
            continue
        cells = []
        for n in names:
            v = results[n].get(scen, {}).get(fig)
            ratio = rat[n].get(label)
            cells.append(f"{fmt(v)} ({ratio:.2f}x)" if v is not None and ratio is not None else fmt(v))
        lines.append(f"{label + (' ^' if higher else ' v'):20}" + "".join(f"{c:>18}" for c in cells))
    lines.append("(ratio = value / best peer's value; ^ higher is better, v lower is better)")
    text = "\n".join(lines)
    print(text)
    return text


def chart(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [
        c
        for c in COLUMNS
        if any(isinstance(r.get(c[0], {}).get(c[1]), int | float) for r in results.values())
    ]
    if not cols:
        return
    ncol = 4
    nrow = (len(cols) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3 * nrow), squeeze=False)
    names = list(results)
    for ax, (scen, figname, label, higher) in zip(axes.flat, cols, strict=False):
        vals = [results[n].get(scen, {}).get(figname) for n in names]
        xs = [n for n, v in zip(names, vals, strict=True) if isinstance(v, int | float)]
        ys = [v for v in vals if isinstance(v, int | float)]
        colors = ["tab:red" if n == "portway" else ("tab:gray" if n == "direct" else "tab:blue") for n in xs]
        ax.bar(xs, ys, color=colors)
        ax.set_title(label + (" (higher better)" if higher else " (lower better)"), fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    for ax in list(axes.flat)[len(cols) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    from peers import portway_bin

    return {
        "portway": first_line([portway_bin(), "--version"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "socat": first_line(["socat", "-V"])[:60],
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def main() -> None:
    known = ["direct", *proxies()]
    # Run only when named: nginx-hc and portway-nohc answer one question (what half-close
    # costs a short connection), and every proxy in the default list adds minutes to `make bench`.
    default = [n for n in known if n not in OPT_IN]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxies", default=",".join(default), help=f"comma list from {known}")
    ap.add_argument(
        "--scenarios",
        default=",".join(scenarios.SCENARIOS),
        help=f"comma list from {list(scenarios.SCENARIOS)}",
    )
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per timed scenario")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the table quotes medians")
    ap.add_argument("--idle-n", type=int, default=int(os.environ.get("IDLE_N", "5000")))
    ap.add_argument("--workers", type=int, default=None, help="portway worker processes (config 'workers:')")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    names = [n for n in args.proxies.split(",") if n]
    scens = [s for s in args.scenarios.split(",") if s]
    for n in names:
        if n not in known:
            ap.error(f"unknown proxy {n!r} (known: {known})")
    for s in scens:
        if s not in scenarios.SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    if not TWO_CPUS:
        print("warning: one CPU - proxy and load share it; compare ratios only", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="portway-bench-"))
    backends = start_backends(tmp)
    results: dict[str, dict[str, Any]] = {}
    try:
        results = {name: {} for name in names}
        for scen in scens:
            # Repetitions take turns (A B C, A B C, ...) rather than running back to back: the
            # machine's load drifts over minutes, and the ratios must not inherit that drift.
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for _ in range(args.reps):
                for name in names:
                    done = runs[name]
                    if done and ("skipped" in done[-1] or "error" in done[-1]):
                        continue
                    try:
                        r = measure_once(name, scen, args, tmp)
                    except Exception as exc:  # one broken scenario must not sink the whole run
                        r = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    done.append(r)
            for name in names:
                ok = [r for r in runs[name] if "error" not in r and "skipped" not in r]
                results[name][scen] = median_of(ok) | {"runs": runs[name]} if ok else runs[name][-1]
                shown = {k: v for k, v in results[name][scen].items() if k != "runs"}
                print(f"{name:8} {scen:8} {json.dumps(shown)}", flush=True)
    finally:
        for b in backends:
            stop(b)

    rat = ratios(results)
    print()
    table = print_table(results, rat)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    doc = {
        "when": stamp,
        "cpus": os.cpu_count(),
        "pinned": TWO_CPUS,
        "duration_s": args.duration,
        "reps": args.reps,
        "idle_n": args.idle_n,
        "workers": args.workers,
        "versions": versions(),
        "results": results,
        "ratios_vs_best_peer": rat,
        "table": table,
    }
    (args.out / f"bench-{stamp}.json").write_text(json.dumps(doc, indent=1))
    (args.out / "latest.json").write_text(json.dumps(doc, indent=1))
    chart(results, args.out / "latest.png")
    print(f"\nwrote {args.out / 'latest.json'} and {args.out / 'latest.png'}")


if __name__ == "__main__":
    main()
