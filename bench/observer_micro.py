"""Micro-benchmark: what the observers add to one connection, on the loop and on the writer thread.

    .venv/bin/python bench/observer_micro.py

Runs the events one TCP connection reports (accepted, dialed, closed) through the metrics
observer alone and through metrics + access log (a `Fanout`), and renders access log lines, a few
hundred thousand times; prints microseconds per connection. Compare with the proxy's own cost per
connection (1 / new connections per second per core, ~118 us at 8,500/s): that ratio is what the
admin listener (metrics) and the access log cost. The end-to-end figure (`run.py` with `admin:`
on and off) needs the data plane to report events.
"""

from __future__ import annotations

import tempfile
import timeit

from portway.accesslog import AccessLog, render_json, render_text
from portway.events import ConnectionRecord, Fanout, Observer
from portway.metrics import MetricsObserver, local_registry, render

RECORD = ConnectionRecord("web", "tcp", ("127.0.0.1", 40000), "127.0.0.1:80", 1.0, 0.1, 1000, 2000, "normal")


def per_connection(observer: Observer, n: int = 200_000) -> float:
    def one() -> None:
        observer.accepted("web", "tcp")
        observer.dialed("web", "127.0.0.1:80", 0.0003)
        observer.closed(RECORD)

    return min(timeit.repeat(one, number=n, repeat=5)) / n * 1e6


def main() -> None:
    metrics = MetricsObserver()
    with tempfile.NamedTemporaryFile() as f:
        log = AccessLog(f.name, "json")
        log.start()
        print(f"metrics on the loop:            {per_connection(metrics):.2f} us/connection")
        print(f"metrics + access log on the loop: {per_connection(Fanout([metrics, log])):.2f} us/connection")
        log.stop()
    for fn in (render_json, render_text):
        cost = min(timeit.repeat(lambda fn=fn: fn(RECORD), number=100_000, repeat=3)) / 100_000 * 1e6
        print(f"{fn.__name__} on the writer thread: {cost:.2f} us/line")
    registry = local_registry(metrics.snapshot)
    scrape = min(timeit.repeat(lambda: render(registry), number=200, repeat=3)) / 200 * 1e3
    print(f"one scrape (1 route): {scrape:.2f} ms")


if __name__ == "__main__":
    main()
