"""accesslog.py: one line per finished connection or session, off the data path, rotatable, and
never failing a connection when the disk does (drops are counted instead)."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway import accesslog
from portway.accesslog import AccessLog, render_text
from portway.errors import ConfigError
from portway.events import ConnectionRecord
from portway.metrics import MetricsObserver, local_registry, render
from tests.test_metrics import samples, value


def rec(reason: str = "normal", protocol: str = "tcp", **kw: object) -> ConnectionRecord:
    fields: dict[str, object] = {
        "route": "web",
        "protocol": protocol,
        "client": ("203.0.113.7", 51000),
        "target": "127.0.0.1:8080",
        "started": 1_764_000_000.25,
        "duration": 1.5,
        "bytes_client_to_target": 11,
        "bytes_target_to_client": 22,
        "reason": reason,
    }
    fields.update(kw)
    return ConnectionRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "access.log"


@pytest.fixture
def access(log_path: Path) -> Iterator[AccessLog]:
    log = AccessLog(str(log_path), "json")
    log.start()
    yield log
    log.stop()


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_lines_carry_every_field_and_reason(access: AccessLog, log_path: Path) -> None:
    access.closed(rec())
    access.closed(rec("acl_denied", target=None, bytes_client_to_target=0, bytes_target_to_client=0))
    access.closed(rec("dial_refused", bytes_client_to_target=0, bytes_target_to_client=0))
    access.closed(
        rec(
            "idle_timeout",
            protocol="udp",
            client=("::1", 5353),
            datagrams_client_to_target=3,
            datagrams_target_to_client=2,
        )
    )
    access.flush()
    got = lines(log_path)
    assert [g["reason"] for g in got] == ["normal", "acl_denied", "dial_refused", "idle_timeout"]
    assert got[0] == {
        "time": "2025-11-24T16:00:01.750Z",
        "route": "web",
        "protocol": "tcp",
        "client": "203.0.113.7:51000",
        "target": "127.0.0.1:8080",
        "duration": 1.5,
        "bytes_client_to_target": 11,
        "bytes_target_to_client": 22,
        "reason": "normal",
    }
    assert got[1]["target"] is None
    assert got[3]["client"] == "[::1]:5353"
    assert (got[3]["datagrams_client_to_target"], got[3]["datagrams_target_to_client"]) == (3, 2)
    assert "datagrams_client_to_target" not in got[0]


def test_text_format_quotes_what_needs_it() -> None:
    line = render_text(rec(route="my route", target=None))
    assert line.startswith('time=2025-11-24T16:00:01.750Z route="my route" protocol=tcp ')
    assert "target=- " in line and line.endswith(" reason=normal")


def test_writes_happen_on_the_writer_thread(log_path: Path) -> None:
    """`closed` does no I/O: the line appears only once the writer thread has run."""
    writers: list[str] = []
    original = os.write

    def spy(fd: int, data: object) -> int:
        writers.append(threading.current_thread().name)
        return original(fd, data)  # type: ignore[arg-type]

    log = AccessLog(str(log_path), "json")
    log.start()
    try:
        os.write = spy  # type: ignore[assignment]
        log.closed(rec())
        assert writers == []
        log.flush()
    finally:
        os.write = original
        log.stop()
    assert writers == ["portway-access-log"]
    assert len(lines(log_path)) == 1


def test_sigusr1_reopens_after_rotation(access: AccessLog, log_path: Path) -> None:
    previous = signal.signal(signal.SIGUSR1, lambda *_: access.reopen())
    try:
        access.closed(rec("normal"))
        access.flush()
        rotated = log_path.with_suffix(".log.1")
        log_path.rename(rotated)  # logrotate's move; the writer still holds the old file
        access.closed(rec("client_reset"))
        access.flush()
        os.kill(os.getpid(), signal.SIGUSR1)
        access.closed(rec("target_reset"))
        access.flush()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert [g["reason"] for g in lines(rotated)] == ["normal", "client_reset"]
    assert [g["reason"] for g in lines(log_path)] == ["target_reset"]


def test_a_full_disk_drops_and_counts_never_raises() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    log = AccessLog("/dev/full", "json")
    log.start()
    metrics = MetricsObserver()
    metrics.access_log_dropped = lambda: log.dropped
    try:
        for _ in range(5):
            log.closed(rec())
        log.flush()
    finally:
        log.stop()
    assert log.dropped == 5
    parsed = samples(render(local_registry(metrics.snapshot)))
    assert value(parsed, "portway_access_log_dropped_total") == 5


def test_a_stalled_writer_bounds_the_queue(monkeypatch: pytest.MonkeyPatch, log_path: Path) -> None:
    """A disk that does not answer: records beyond MAX_PENDING are dropped and counted, at once."""
    monkeypatch.setattr(accesslog, "MAX_PENDING", 10)
    log = AccessLog(str(log_path), "json")  # not started: nothing drains, like a writer stuck in write()
    for _ in range(25):
        log.closed(rec())
    assert log.dropped == 15
    assert len(log._pending) == 10


def test_an_unopenable_path_is_a_config_error(tmp_path: Path) -> None:
    log = AccessLog(str(tmp_path / "missing-dir" / "access.log"))
    with pytest.raises(ConfigError, match=r"field 'access_log.path': cannot open .*missing-dir"):
        log.start()


def test_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    log = AccessLog("-", "text")
    log.start()
    log.closed(rec())
    log.flush()
    log.stop()
    assert "route=web" in capfd.readouterr().out


@given(
    route=st.text(min_size=1, max_size=30),
    target=st.one_of(st.none(), st.text(max_size=30)),
    protocol=st.sampled_from(["tcp", "udp"]),
    duration=st.floats(0, 1e6, allow_nan=False),
    counts=st.tuples(*[st.integers(0, 2**63)] * 4),
)
def test_json_lines_always_parse_back(
    route: str, target: str | None, protocol: str, duration: float, counts: tuple[int, int, int, int]
) -> None:
    """Any route or target name (quotes, newlines, unicode) yields one valid JSON line."""
    r = rec(
        route=route,
        target=target,
        protocol=protocol,
        duration=duration,
        bytes_client_to_target=counts[0],
        bytes_target_to_client=counts[1],
        datagrams_client_to_target=counts[2],
        datagrams_target_to_client=counts[3],
    )
    line = accesslog.render_json(r)
    assert "\n" not in line
    got = json.loads(line)
    assert (got["route"], got["target"], got["protocol"]) == (route, target, protocol)
    assert got["bytes_target_to_client"] == counts[1]
    assert ("datagrams_target_to_client" in got) == (protocol == "udp")
    text = render_text(r)
    assert "\n" not in text and text.endswith(" reason=normal")
